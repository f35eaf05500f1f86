"""StorySync attention processors, installed with ``set_attn_processor``; no model class is copied.

- :class:`StorySyncProcessor`: what the StorySync processor of every family (FLUX's joint attention
  too) shares: its layer and state, and the steps of sharing (Eq. 5-8, 13: the anchors' tokens each
  frame keeps, the anchors' admitted tokens, publishing), BLI (Eq. 12) and RFH (Eq. 9-11) that do
  not depend on how the attention lays out its tokens;
- :class:`AttnProcessorCall`: the call of diffusers' ``AttnProcessor2_0`` (UNet-style ``Attention``
  modules), once, and its stock processor;

and the UNet-style processors on diffusers ``Attention`` modules (the UNet and Kandinsky 3 families):

- :class:`StorySyncSelfAttnProcessor` on self-attentions: BLI (Eq. 12) on all of them (or on the
  shared ones, ``bli_layers: shared``) at the steps of ``bli_schedule``, masked cross-image sharing
  (Eq. 5-8, 13) and RFH (Eq. 9-11) on the shared layers;
- :class:`SubjectMapProcessor` on the cross-attentions of the mask layers: the stock output plus
  the subject-token attention maps (Eq. 2).
A layer with nothing to do at a step runs diffusers' own ``AttnProcessor2_0``, so with every
mechanism off the pipeline is bit-for-bit stock.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..core.anchors import SharedLayerState
from ..core.layout import interpolate_layout
from ..core.masks import subject_attention
from ..core.sharing import (
    anchor_admitted,
    every_anchor_token,
    gather_shared_tokens,
    masked_shared_attention,
    shared_attention,
)
from ..core.state import CONSISTENT, ROLE_ANCHORS, VANILLA, StorySyncState, joined_rows, layer_id
from ..core.transfer import to_device

__all__ = [
    "AttnProcessorCall", "StorySyncProcessor", "StorySyncSelfAttnProcessor", "SubjectMapProcessor", "attends_to_itself",
]

# (keys, values, validity, lengths) of ``gather_shared_tokens``: the anchor tokens each frame keeps.
Gathered = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def other_rows(batch: int, skip: list[slice]) -> list[slice]:
    """The row ranges of a batch of ``batch`` rows outside the slices ``skip`` (host-side)."""
    ranges, start = [], 0
    for rows in sorted(skip, key=lambda r: r.start):
        if rows.start > start:
            ranges.append(slice(start, rows.start))
        start = max(start, rows.stop)
    if start < batch:
        ranges.append(slice(start, batch))
    return ranges


def stock_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, skip: list[slice]) -> torch.Tensor:
    """(B, H, N, d) stock attention of the rows outside ``skip``; the rows inside are left for the
    caller to fill (uninitialized)."""
    if not skip:
        return F.scaled_dot_product_attention(query, key, value)
    out = torch.empty_like(query)
    for rows in other_rows(query.shape[0], skip):
        out[rows] = F.scaled_dot_product_attention(query[rows], key[rows], value[rows])
    return out


def attends_to_itself(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> bool:
    """Whether an attention call is a self-attention: no context, or its own input as the context
    (``Kandinsky3AttentionBlock`` calls its self-attentions with ``context=hidden_states``)."""
    return encoder_hidden_states is None or encoder_hidden_states is hidden_states


class StorySyncProcessor:
    """What every family's StorySync processor shares (see the module docstring).

    ``name`` is the layer's processor name, ``shares``: whether sharing (Eq. 5-8, 13) and RFH
    (Eq. 9-11) run here. Token tensors are laid out (batch, tokens, ...) unless a method says
    otherwise; the batch rows are those of ``state``.
    """

    def __init__(self, name: str, state: StorySyncState, shares: bool) -> None:
        super().__init__()
        self.name = name
        self.state = state
        self.shares = shares
        self.layer = layer_id(name)

    def _sharing(self) -> bool:
        """Whether this layer shares or harmonizes at the current step."""
        st, cfg = self.state, self.state.config
        return self.shares and st.sharing_ready and (cfg.share_attention or cfg.harmonize)

    def _enter(self) -> None:
        """Tell the state a layer starts (current masks are fixed at the first shared one)."""
        if self.shares:
            self.state.enter_shared_layer(self.name)

    def _check_batch(self, batch: int) -> None:
        if batch != self.state.batch_size:
            raise RuntimeError(f"{self.name}: batch {batch} != planned {self.state.batch_size}")

    def _blend(self, x: torch.Tensor, lam: float, tokens: slice = slice(None)) -> None:
        """Eq. 12 in place: the consistent rows of every guidance branch moved towards its vanilla
        rows by ``lam`` (on ``tokens`` of dim 1 only: FLUX's image tokens)."""
        st = self.state
        for g in st.guidance_branches:
            c, v = st.rows(g, CONSISTENT), st.rows(g, VANILLA)
            x[c, tokens] = interpolate_layout(x[c, tokens], x[v, tokens], lam)

    def _anchor_tokens(self, keys_values: Callable[[SharedLayerState], tuple[torch.Tensor, torch.Tensor]]
                       ) -> Gathered | None:
        """Eq. 13 for the frames: the anchors' keys and values at this layer (``keys_values``: the
        layer's own projections of the anchors' published hidden states, (..., M, C)), the ones
        each frame keeps after its share dropout, gathered and padded (``gather_shared_tokens``);
        None when the anchors published nothing here or no frame keeps a token."""
        st = self.state
        anchor = st.anchor_layer(self.name)
        if anchor is None or anchor.index.numel() == 0:
            return None
        keys, values = keys_values(anchor)
        keeps = st.frame_share_keeps(self.name, self.layer, anchor)
        k_pad, v_pad, valid, lengths = gather_shared_tokens(keys, values, keeps)
        if k_pad is None or v_pad is None:
            return None
        return k_pad, v_pad, valid, lengths

    def _share_among_anchors(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shared_rows: list[slice],
        masks: torch.Tensor, text_len: int = 0,
    ) -> list[tuple[slice, torch.Tensor]]:
        """Eq. 5-8 for the anchors, dense: each anchor attends to its own tokens and to the other
        anchors' subject tokens its share dropout keeps, by a log-mask over all of their tokens.

        ``query``, ``key``, ``value``: (B, H, N, d), the image tokens after the first ``text_len``
        (FLUX's joint attention: the image queries attend to the text keys too). Returns (rows,
        (A, H, N_image, d) output of the image queries) per shared guidance branch; nothing when the
        dropout kept no token (a host value: stock attention)."""
        keeps = torch.stack(self.state.anchor_share_keeps(self.layer, masks.shape[1]))  # (A, A, N), on the host
        if not bool(keeps.any()):
            return []
        admitted = anchor_admitted(masks, to_device(keeps, masks.device))
        shared = []
        for rows in shared_rows:
            k, v = key[rows], value[rows]
            shared.append((rows, masked_shared_attention(query[rows, :, text_len:], k, v, every_anchor_token(
                k[:, :, text_len:]), every_anchor_token(v[:, :, text_len:]), admitted)))
        return shared

    def _publish(
        self, num_tokens: int, hidden: torch.Tensor, features: torch.Tensor, shared_rows: list[slice],
        masks: torch.Tensor,
    ) -> None:
        """Anchor role, at a step of the run: publish this layer's (image) hidden states and RFH
        features of the shared guidance branches' consistent rows (``record_anchor_layer``)."""
        st = self.state
        if st.role == ROLE_ANCHORS and st.step < st.num_steps:
            st.record_anchor_layer(self.name, num_tokens, torch.stack([hidden[rows] for rows in shared_rows]),
                                   torch.stack([features[rows] for rows in shared_rows]), masks)

    def _harmonize(self, features: torch.Tensor, shared_rows: list[slice], masks: torch.Tensor) -> torch.Tensor:
        """Eq. 9-11 for every consistent image in the shared guidance branches (``StorySyncState.harmonize``)."""
        return self.state.harmonize(self.name, features, shared_rows, masks)


class AttnProcessorCall:
    """diffusers' ``AttnProcessor2_0`` call, written once for the processors of UNet-style
    ``Attention`` modules: ``__call__`` hands its arguments to :meth:`attend`, which runs the stock
    processor unless a subclass does more."""

    def __init__(self) -> None:
        super().__init__()
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
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for these arguments (stock here)."""
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class StorySyncSelfAttnProcessor(StorySyncProcessor, AttnProcessorCall):
    """Self-attention with BLI (Eq. 12, on the queries or the output: ``bli_target``), and with
    sharing (Eq. 5-8, 13) + RFH (Eq. 9-11) when ``shares``."""

    def _active(self, num_tokens: int) -> bool:
        st = self.state
        return st.bli_weight(self.shares) is not None or st.injects(num_tokens) or self._sharing()

    def attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        self._enter()
        if attends_to_itself(hidden_states, encoder_hidden_states):
            encoder_hidden_states = None  # the stock processor reads None as the layer's own input
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
        self._check_batch(hidden_states.shape[0])

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
            self._blend(query, lam)

        sharing = self._sharing()
        masks = st.masks(num_tokens) if sharing else None
        shared_rows = [st.rows(g, CONSISTENT) for g in st.shared_guidance] if sharing else []

        shared: list[tuple[slice, torch.Tensor]] = []
        if sharing and cfg.share_attention and st.role != ROLE_ANCHORS:
            shared = self._share_with_anchors(attn, hidden_states, query, key, value, shared_rows)
        elif sharing and cfg.share_attention and st.num_images > 1:
            shared = self._share_among_anchors(query, key, value, shared_rows, masks)
        if len(shared) == 1 and shared[0][0] == slice(0, query.shape[0]):
            out = shared[0][1]  # every row shares (no vanilla rows at this step)
        else:
            # Stock attention for the rows that do not share; none is computed only to be overwritten.
            out = stock_rows(query, key, value, [rows for rows, _ in shared])
            for rows, shared_out in shared:
                out[rows] = shared_out
        features = _merge_heads(out).to(query.dtype)  # R, the RFH features

        if sharing:
            self._publish(num_tokens, hidden_states, features, shared_rows, masks)
        if sharing and cfg.harmonize:
            features = self._harmonize(features, shared_rows, masks)

        out = attn.to_out[1](attn.to_out[0](features))
        if lam is not None and cfg.bli_target == "output":
            self._blend(out, lam)  # Eq. 12, on the output
        if st.injects(num_tokens):
            out = st.inject(self.name, out)  # ConsiStory's pass 2 (core/consistory.py)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _share_with_anchors(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        shared_rows: list[slice],
    ) -> list[tuple[slice, torch.Tensor]]:
        """Eq. 7-8, 13 for the frames of every shared guidance branch in one attention call: each
        frame attends to its own tokens and the anchor tokens its share dropout keeps (the same
        tokens in every branch, so one gather serves them all). Returns (rows, (rows, H, N, d)
        output) per branch, or one pair for all of them when their rows are one slice of the
        batch, or nothing when no frame keeps an anchor token."""
        heads, g = attn.heads, len(shared_rows)

        def keys_values(anchor: SharedLayerState) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = anchor.hidden[:g].to(hidden_states.dtype)  # (G, M, C), the anchors' branches
            k_all, v_all = attn.to_k(hidden), attn.to_v(hidden)
            if attn.norm_k is not None:
                k_all = _merge_heads(attn.norm_k(_split_heads(k_all, heads)))
            return k_all, v_all

        gathered = self._anchor_tokens(keys_values)  # (G, F, M_max, C)
        if gathered is None:
            return []
        k_pad, v_pad, valid, lengths = gathered
        k_sh, v_sh = _split_heads(k_pad.flatten(0, 1), heads), _split_heads(v_pad.flatten(0, 1), heads)
        together = joined_rows(shared_rows)
        if together is not None:  # one slice of the batch (no vanilla rows between the branches)
            q, k, v = query[together], key[together], value[together]
        else:
            q, k, v = (torch.cat([x[rows] for rows in shared_rows]) for x in (query, key, value))
        out = shared_attention(q, k, v, k_sh, v_sh, None if valid is None else valid.repeat(g, 1), lengths * g)
        if together is not None:
            return [(together, out)]
        return list(zip(shared_rows, out.chunk(g)))


class SubjectMapProcessor(AttnProcessorCall):
    """Cross-attention: stock output, plus the subject maps of Eq. 2 (conditional branch)."""

    def __init__(self, name: str, state: StorySyncState) -> None:
        super().__init__()
        self.name = name
        self.state = state

    def attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        st = self.state
        # A text cross-attention (Kandinsky 3 calls its self-attentions with context=hidden_states).
        cross = not attends_to_itself(hidden_states, encoder_hidden_states)
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
