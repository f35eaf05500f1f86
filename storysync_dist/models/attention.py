"""StorySync attention processors for diffusers ``Attention`` modules (UNet-style self- and
cross-attention), installed with ``set_attn_processor``; no model class is copied.

- :class:`StorySyncSelfAttnProcessor` on self-attentions: BLI (Eq. 12) on all of them (or on the
  shared ones, ``bli_layers: shared``) at the steps of ``bli_schedule``, masked cross-image sharing
  (Eq. 5-8, 13) and RFH (Eq. 9-11) on the shared layers;
- :class:`SubjectMapProcessor` on the cross-attentions of the mask layers: the stock output plus
  the subject-token attention maps (Eq. 2).
A layer with nothing to do at a step runs diffusers' own ``AttnProcessor2_0``, so with every
mechanism off the pipeline is bit-for-bit stock. Used by the UNet and Kandinsky 3 families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..core.layout import interpolate_layout
from ..core.masks import subject_attention
from ..core.sharing import cross_image_tokens, gather_shared_tokens, pad_token_sets, shared_attention
from ..core.state import CONSISTENT, ROLE_ANCHORS, VANILLA, StorySyncState, layer_id

__all__ = ["StorySyncSelfAttnProcessor", "SubjectMapProcessor"]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class StorySyncSelfAttnProcessor:
    """Self-attention with BLI (Eq. 12, on the queries or the output: ``bli_target``), and with
    sharing (Eq. 5-8, 13) + RFH (Eq. 9-11) when ``shares``."""

    def __init__(self, name: str, state: StorySyncState, shares: bool) -> None:
        self.name = name
        self.state = state
        self.shares = shares
        self.layer = layer_id(name)
        self.stock = AttnProcessor2_0()

    def _active(self, num_tokens: int) -> bool:
        st, cfg = self.state, self.state.config
        if st.bli_weight(self.shares) is not None or st.injects(num_tokens):
            return True
        return self.shares and st.sharing_ready and (cfg.share_attention or cfg.harmonize)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if self.shares:
            self.state.enter_shared_layer(self.name)  # current masks are fixed at the first one
        plain = (
            encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and hidden_states.ndim == 3
        )
        if plain and self.state.injection is not None and self.state.pass_index == 0:
            self.state.injection.note_self_attention(hidden_states.shape[1])  # finds the finest resolution
        if not plain or not self._active(hidden_states.shape[1]):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        st, cfg = self.state, self.state.config
        if hidden_states.shape[0] != st.batch_size:
            raise RuntimeError(f"{self.name}: batch {hidden_states.shape[0]} != planned {st.batch_size}")

        num_tokens = hidden_states.shape[1]
        heads = attn.heads
        query = _split_heads(attn.to_q(hidden_states), heads)
        key = _split_heads(attn.to_k(hidden_states), heads)
        value = _split_heads(attn.to_v(hidden_states), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        lam = st.bli_weight(self.shares)  # None: no BLI in this layer at this step
        if lam is not None and cfg.bli_target == "query":
            # Eq. 12 on the queries (Figure 2): the consistent branch attends, to its own and the
            # shared keys at full weight, with queries moved towards the vanilla branch's.
            for g in st.guidance_branches:
                c, v = st.rows(g, CONSISTENT), st.rows(g, VANILLA)
                query[c] = interpolate_layout(query[c], query[v], lam)

        sharing = self.shares and st.sharing_ready and (cfg.share_attention or cfg.harmonize)
        masks = st.masks(num_tokens) if sharing else None
        shared_rows = [st.rows(g, CONSISTENT) for g in st.shared_guidance] if sharing else []

        out = F.scaled_dot_product_attention(query, key, value)  # stock attention for every row
        if sharing and cfg.share_attention:
            for branch, rows in enumerate(shared_rows):
                k_sh, v_sh, valid, lengths = self._shared_tokens(attn, hidden_states, key, value, rows, branch, masks)
                if k_sh is None:
                    continue  # nothing to share with any image here: the stock output stands
                out[rows] = shared_attention(query[rows], key[rows], value[rows], k_sh, v_sh, valid, lengths)
        features = _merge_heads(out).to(query.dtype)  # R, the RFH features

        if sharing and st.role == ROLE_ANCHORS and st.step < st.num_steps:
            st.record_anchor_layer(
                self.name,
                num_tokens,
                torch.stack([hidden_states[rows] for rows in shared_rows]),
                torch.stack([features[rows] for rows in shared_rows]),
                masks,
            )
        if sharing and cfg.harmonize:
            features = self._harmonize(features, shared_rows, masks)

        out = attn.to_out[1](attn.to_out[0](features))
        if lam is not None and cfg.bli_target == "output":
            for g in st.guidance_branches:
                c, v = st.rows(g, CONSISTENT), st.rows(g, VANILLA)
                out[c] = interpolate_layout(out[c], out[v], lam)  # Eq. 12, on the output
        if st.injects(num_tokens):
            out = st.inject(self.name, out)  # ConsiStory's pass 2 (core/consistory.py)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _shared_tokens(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rows: slice,
        branch: int,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[int]]:
        """Keys/values each consistent image shares with (padded), Eq. 5-8 and 13.

        Returns ``(B, H, M, d)`` keys and values, the ``(B, M)`` validity of each slot (False on
        padding; None when there is none) and the B host-side lengths, or three Nones (and the
        lengths) when no image has a single token to share with at this layer and step: the subject masks are empty (a small layer, an early step) or dropout removed every
        key. An image whose own set is empty while others' are not gets only padding, which
        ``shared_attention`` masks out, so it attends to its own tokens alone.
        """
        st = self.state
        heads = attn.heads
        sets_k: list[torch.Tensor] = []
        sets_v: list[torch.Tensor] = []
        if st.role == ROLE_ANCHORS:
            if st.num_images < 2:
                return None, None, None, []
            k_img, v_img = _merge_heads(key[rows]), _merge_heads(value[rows])  # (A, N, C)
            for i, keep in enumerate(st.anchor_share_keeps(self.layer, masks.shape[1])):
                keep = keep.to(masks.device)
                sets_k.append(cross_image_tokens(k_img, masks, i, keep))
                sets_v.append(cross_image_tokens(v_img, masks, i, keep))
        else:
            anchor = st.anchor_layer(self.name)
            if anchor is None or anchor.index.numel() == 0:
                return None, None, None, []
            shared_hidden = anchor.hidden[branch].to(hidden_states.dtype)
            k_all = attn.to_k(shared_hidden[None])
            v_all = attn.to_v(shared_hidden[None])
            if attn.norm_k is not None:
                k_all = _merge_heads(attn.norm_k(_split_heads(k_all, heads)))
            keeps = st.frame_share_keeps(self.name, self.layer, anchor)
            k_pad, v_pad, valid, lengths = gather_shared_tokens(k_all[0], v_all[0], keeps)
            if k_pad is None or v_pad is None:
                return None, None, None, lengths
            return _split_heads(k_pad, heads), _split_heads(v_pad, heads), valid, lengths
        lengths = [s.shape[0] for s in sets_k]
        if not any(lengths):
            return None, None, None, lengths
        k_pad, valid = pad_token_sets(sets_k)
        v_pad, _ = pad_token_sets(sets_v)
        return _split_heads(k_pad, heads), _split_heads(v_pad, heads), valid, lengths

    def _harmonize(self, features: torch.Tensor, shared_rows: list[slice], masks: torch.Tensor) -> torch.Tensor:
        """Eq. 9-11 for every consistent image in the shared guidance branches (``StorySyncState.harmonize``)."""
        return self.state.harmonize(self.name, features, shared_rows, masks)


class SubjectMapProcessor:
    """Cross-attention: stock output, plus the subject maps of Eq. 2 (conditional branch)."""

    def __init__(self, name: str, state: StorySyncState) -> None:
        self.name = name
        self.state = state
        self.stock = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        st = self.state
        # A text cross-attention (Kandinsky 3 calls its self-attentions with context=hidden_states).
        cross = encoder_hidden_states is not None and encoder_hidden_states is not hidden_states
        if cross and hidden_states.ndim == 3 and st.wants_maps(hidden_states.shape[1]):
            rows = st.rows("cond", CONSISTENT)
            text = encoder_hidden_states[rows]
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            query = _split_heads(attn.to_q(hidden_states[rows]), attn.heads)
            key = _split_heads(attn.to_k(text), attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            bias = attention_mask[rows] if attention_mask is not None else None  # text padding mask
            st.record_map(hidden_states.shape[1], subject_attention(query, key, st.token_weights, bias), self.name)
        return out
