"""StorySync on diffusers FLUX pipelines (``FluxPipeline``: FLUX.1-schnell and FLUX.1-dev).

One processor, :class:`FluxStorySyncProcessor`, is installed with ``transformer.set_attn_processor``
on every joint attention (no transformer class is copied). FLUX attention is joint: the dual-stream
blocks (``transformer_blocks``) get text and image tokens separately and attend over [text | image];
the single-stream blocks (``single_transformer_blocks``) get them concatenated, text first. StorySync
acts on the image tokens only:
  - subject maps (Eq. 2) from the image-query x text-key scores of the mask layers, softmax over the
    text keys alone (a cross-attention distribution, as in a UNet's ``attn2``);
  - BLI (Eq. 12) on the image queries (or image outputs) of the consistent rows;
  - sharing (Eq. 5-8, 13): the other images' (or the anchors') subject image tokens are appended as
    extra keys/values, carrying their own RoPE grid positions;
  - RFH (Eq. 9-11) on the image-token attention outputs.
A layer with nothing to do runs diffusers' own ``FluxAttnProcessor``, so with every mechanism off
the pipeline is bit-for-bit stock. FLUX has no classifier-free-guidance batch (``true_cfg_scale``
is never used): the render's state has the cond guidance branch only.

The loop (``AdapterBase.generate``, with :class:`FluxAdapter`'s ``prepare_run``, ``predict_noise`` and
``decode``) follows ``FluxPipeline.__call__`` step for step, with one scheduler copy per branch.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from ..core.masks import subject_attention
from ..core.sharing import (
    shared_attention,
)
from ..core.state import COND, CONSISTENT, ROLE_ANCHORS, StorySyncState
from .adapter_base import AdapterBase, Run
from .attention import Gathered, StorySyncProcessor, other_rows
from .denoise import BranchLatents, decode_each
from .family import ModelFamily, ModelInfo, UnknownModelError
from .offload import offload_idle

DUAL, SINGLE = "transformer_blocks", "single_transformer_blocks"
# Masks from the dual-stream blocks' joint attention (text and image still separate streams, text
# keys from the text stream's own projections); sharing and RFH in the single-stream blocks, which
# all run after every dual-stream block, so this step's masks exist when they share.
SHARE_LAYERS = (SINGLE,)
MASK_LAYERS = (DUAL,)
# FluxPipeline.__call__ defaults: 28 steps, guidance 3.5, max_sequence_length 512 (FLUX.1-dev's
# recommended settings too). FLUX.1-schnell (no guidance embedding) is distilled for ~4 steps and
# ignores guidance: 4 steps and guidance 0.0 (its model card's call), so the recorded config says
# guidance has no effect.
DEV_DEFAULTS = (28, 3.5)
SCHNELL_DEFAULTS = (4, 0.0)
# T5 tokens (``max_sequence_length``): 512 is FluxPipeline.__call__'s default, FLUX.1-dev's, and the
# most the pipeline accepts (it raises above 512). FLUX.1-schnell runs at 256: black-forest-labs' CLI
# (``max_length=256 if name == "flux-schnell" else 512``) and its model card call
# ``pipe(prompt, ..., max_sequence_length=256)``. Schnell is told from dev as diffusers tells them
# apart: no guidance embedding (``guidance_embeds: false`` in the transformer config). A story's
# ``defaults.max_sequence_length`` may ask for another length up to MAX_SEQUENCE_LENGTH.
MAX_SEQUENCE_LENGTH = 512
SCHNELL_SEQUENCE_LENGTH = 256
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, N, H, d), FLUX's layout (sequence dim 1)."""
    return x.unflatten(-1, (-1, head_dim))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any = None) -> torch.Tensor:
    """(B, N, H, d) joint attention, (B, N, H, d) out, through diffusers' attention dispatch with
    the processor's backend, as ``FluxAttnProcessor`` calls it (``None``: the active backend, by
    default torch's SDPA, the "native" backend)."""
    return dispatch_attention_fn(q, k, v, backend=backend)


def image_rope(
    rotary: tuple[torch.Tensor, torch.Tensor], text_len: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) rows of image tokens at grid ``positions`` (M,) from the joint (T+N, D) tables."""
    cos, sin = rotary
    return cos[text_len + positions], sin[text_len + positions]


def rope_keys(key: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on (B, M, H, d) keys with (M, D) tables, as ``FluxAttnProcessor``."""
    return apply_rotary_emb(key, rotary, sequence_dim=1)


class FluxStorySyncProcessor(StorySyncProcessor):
    """Joint attention with StorySync on the image tokens (see the module docstring).

    ``shares``: sharing (Eq. 5-8, 13) and RFH (Eq. 9-11) here; ``maps``: this layer records subject
    maps (Eq. 2). BLI (Eq. 12) runs on every layer while the vanilla branch is in the batch.

    ``_attention_backend`` is diffusers' attention backend of this layer, as on ``FluxAttnProcessor``
    (``FluxTransformer2DModel.set_attention_backend`` sets it on every processor that has the
    attribute; ``FluxAdapter.processor`` copies the stock processor's). The joint attention of every
    row goes through ``dispatch_attention_fn`` with it, and so does a layer with nothing to do (the
    stock processor); the attention of the consistent rows over the shared tokens (with its padding
    bias) and the subject maps (which need the probabilities) stay on torch's SDPA and matmuls
    (docs/models.md). Context parallelism (``_parallel_config``) is not supported.
    """

    _parallel_config = None

    def __init__(self, name: str, state: StorySyncState, shares: bool, maps: bool, text_len: int,
                 backend: Any = None) -> None:
        super().__init__(name, state, shares)
        self.text_len = text_len  # T, the encoded text length (single-stream blocks: text first)
        self.maps = maps
        self.stock = FluxAttnProcessor()
        self._attention_backend = backend

    @property
    def _attention_backend(self) -> Any:
        return self.stock._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.stock._attention_backend = backend  # one backend for both paths of the layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        st = self.state
        self._enter()
        dual = encoder_hidden_states is not None
        text_len = encoder_hidden_states.shape[1] if dual else self.text_len
        num_img = hidden_states.shape[1] - (0 if dual else text_len)
        wants = self.maps and st.wants_maps(num_img)
        blends = st.bli_weight(self.shares) is not None
        if attention_mask is not None or image_rotary_emb is None or not (blends or wants or self._sharing()):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_batch(hidden_states.shape[0])
        return self._storysync(attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_len, wants)

    def _project(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """Normed (B, T+N, H, d) joint query, key, value before RoPE, text first."""
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (_heads(x, attn.head_dim) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (_heads(x, attn.head_dim) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        return q, k, v

    def _storysync(self, attn, hidden_states, encoder_hidden_states, rotary, text_len: int, wants: bool):
        st, cfg = self.state, self.state.config
        dual = encoder_hidden_states is not None
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
        lam = st.bli_weight(self.shares)  # None: no BLI in this layer at this step
        if lam is not None and cfg.bli_target == "query":
            self._blend(query, lam, slice(text_len, None))  # Eq. 12 on the image queries
        query, key = apply_rotary_emb(query, rotary, sequence_dim=1), apply_rotary_emb(key, rotary, sequence_dim=1)
        num_img = query.shape[1] - text_len
        if wants:
            rows = st.rows(COND, CONSISTENT)
            q_img = query[rows, text_len:].transpose(1, 2)  # (F, H, N, d)
            k_txt = key[rows, :text_len].transpose(1, 2)  # (F, H, T, d)
            st.record_map(num_img, subject_attention(q_img, k_txt, st.token_weights), self.name)  # Eq. 2

        sharing = self._sharing()
        masks = st.masks(num_img) if sharing else None
        shared_rows = [st.rows(g, CONSISTENT) for g in st.shared_guidance] if sharing else []
        shared: list[tuple[slice, torch.Tensor]] = []
        if sharing and cfg.share_attention and st.role == ROLE_ANCHORS:
            if st.num_images > 1:
                # Post-RoPE keys of the other anchors' image tokens, as their own attention computed them.
                shared = [(rows, out.transpose(1, 2)) for rows, out in self._share_among_anchors(
                    query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), shared_rows, masks, text_len)]
        elif sharing and cfg.share_attention:
            for branch, rows in enumerate(shared_rows):
                gathered = self._shared_tokens(attn, hidden_states, branch, rotary, text_len)
                if gathered is None:
                    continue
                k_sh, v_sh, valid, lengths = gathered
                # Eq. 7-8 for the image queries; the text queries keep the stock joint attention.
                q_r = query[rows, text_len:].transpose(1, 2)
                k_r, v_r = key[rows].transpose(1, 2), value[rows].transpose(1, 2)
                shared.append((rows, shared_attention(q_r, k_r, v_r, k_sh, v_sh, valid, lengths).transpose(1, 2)))
        if not shared:
            out = _attend(query, key, value, self._attention_backend)  # stock joint attention for every row
        elif len(shared) == 1 and shared[0][0] == slice(0, query.shape[0]):
            # Every row shares (FLUX's one guidance branch): the stock joint attention of the text
            # queries alone, then the shared image queries.
            text_out = _attend(query[:, :text_len], key, value, self._attention_backend)
            out = torch.cat([text_out, shared[0][1].to(text_out.dtype)], dim=1)
        else:
            # Stock joint attention for the rows that do not share, and for the text queries of
            # those that do; no image query's stock attention is computed only to be overwritten.
            out = torch.empty_like(query)
            for rows in other_rows(query.shape[0], [rows for rows, _ in shared]):
                out[rows] = _attend(query[rows], key[rows], value[rows], self._attention_backend)
            for rows, image_out in shared:
                if text_len:
                    out[rows, :text_len] = _attend(query[rows, :text_len], key[rows], value[rows],
                                                   self._attention_backend)
                out[rows, text_len:] = image_out.to(out.dtype)
        out = out.flatten(2, 3).to(query.dtype)
        features = out[:, text_len:]  # R, the image tokens' RFH features
        if sharing:
            self._publish(num_img, hidden_states if dual else hidden_states[:, text_len:], features, shared_rows, masks)
        if sharing and cfg.harmonize:
            out = torch.cat([out[:, :text_len], self._harmonize(features, shared_rows, masks)], dim=1)
        if dual:
            text_out, img_out = out[:, :text_len], out[:, text_len:]
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            text_out = attn.to_add_out(text_out.contiguous())
        else:
            text_out, img_out = None, out[:, text_len:]
        if lam is not None and cfg.bli_target == "output":
            img_out = img_out.clone()
            self._blend(img_out, lam)  # Eq. 12 on the image outputs
        if dual:
            return img_out, text_out
        return torch.cat([out[:, :text_len], img_out], dim=1)

    def _shared_tokens(self, attn: Any, hidden_states: torch.Tensor, branch: int,
                       rotary: tuple[torch.Tensor, torch.Tensor], text_len: int) -> Gathered | None:
        """Keys/values each frame of guidance branch ``branch`` shares with (padded), Eq. 13:
        ``(B, H, M, d)`` keys and values, post-RoPE at each shared token's own grid position, the
        ``(B, M)`` validity of each slot (None when none is padding) and the B host-side lengths;
        None when nothing is shared. Frames rebuild the anchors' keys from the published pre-RoPE
        image hidden states with their own ``to_k``, ``norm_k`` and the RoPE of the anchor token's
        grid position (same size: same grid).
        """
        gathered = self._anchor_tokens(lambda anchor: self.anchor_keys(
            attn, anchor.hidden[branch].to(hidden_states.dtype), anchor.index % anchor.num_tokens, rotary, text_len))
        if gathered is None:
            return None
        k_pad, v_pad, valid, lengths = gathered
        return _heads(k_pad, attn.head_dim).transpose(1, 2), _heads(v_pad, attn.head_dim).transpose(1, 2), valid, lengths

    @staticmethod
    def anchor_keys(attn: Any, hidden: torch.Tensor, positions: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                    text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, C) anchor image hidden states at grid ``positions`` (M,) -> post-RoPE (M, H*d) keys
        and (M, H*d) values, with this layer's image projections (``to_k``/``to_v``, ``norm_k``)."""
        k = attn.norm_k(_heads(attn.to_k(hidden[None]), attn.head_dim))  # (1, M, H, d)
        v = attn.to_v(hidden[None])
        k = rope_keys(k, image_rope(rotary, text_len, positions.to(k.device)))
        return k[0].flatten(1), v[0]


@dataclass
class FluxRun(Run):
    """A FLUX render's loop: the T5 and pooled CLIP embeddings, the text and image position ids,
    the guidance scale (the guidance embedding's input) and the size (to unpack the latents)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor
    guidance_scale: float
    height: int
    width: int


# ---- the family ---------------------------------------------------------------------------------
def _flux_info(tokenizer: Any, transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> ModelInfo:
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    dev = bool(transformer.get("guidance_embeds", False))  # schnell has no guidance embedding
    steps, guidance = DEV_DEFAULTS if dev else SCHNELL_DEFAULTS
    size = DEFAULT_SAMPLE_SIZE * vae_scale
    longest = min(MAX_SEQUENCE_LENGTH, int(tokenizer.model_max_length))
    return ModelInfo(
        family=FluxFamily.name, tokenizer=tokenizer, size_factor=vae_scale * 2,
        text_len=min(MAX_SEQUENCE_LENGTH if dev else SCHNELL_SEQUENCE_LENGTH, longest), default_height=size,
        default_width=size, default_steps=steps, default_guidance_scale=guidance,
        share_layers=SHARE_LAYERS, mask_layers=MASK_LAYERS, negative_prompt=False, cfg_batch=False,
        max_text_len=longest,
    )


class FluxFamily(ModelFamily):
    """FLUX.1 (schnell, dev): ``FluxTransformer2DModel`` with dual- and single-stream joint
    attention, T5 text tokens (``tokenizer_2``) in the attention, CLIP pooled embedding."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    # FLUX.1 is released and run in bfloat16: in float16 its activations leave the float16 range, and
    # FluxTransformer2DModel clips them to +-65504 in every block (saturated pictures).
    cuda_dtype = "bfloat16"

    def shares_at(self, processor: str) -> bool:
        return True  # every FLUX attention is joint text+image self-attention (FluxStorySyncProcessor)

    info_files = ("model_index.json", "tokenizer_2/*", "transformer/config.json", "vae/config.json")

    def maps_at(self, processor: str) -> bool:
        return True

    def info_from_folder(self, folder: pathlib.Path, model_index: Mapping[str, Any]) -> ModelInfo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return _flux_info(tokenizer, transformer, vae)

    def info_from_pipeline(self, pipe: Any) -> ModelInfo:
        parts = [getattr(pipe, name, None) for name in ("transformer", "vae", "tokenizer_2")]
        if any(p is None for p in parts):
            raise UnknownModelError(f"{type(pipe).__name__} has no transformer, vae or tokenizer_2")
        transformer, vae, tokenizer = parts
        return _flux_info(tokenizer, dict(transformer.config), dict(vae.config))

    def adapter(self, pipe: Any) -> FluxAdapter:
        return FluxAdapter(pipe)

    def presets(self) -> Mapping[str, Any]:
        from .flux_presets import FLUX_PRESETS

        return FLUX_PRESETS


# ---- the adapter: the denoising loop, step by step as FluxPipeline.__call__ ----------------------
class FluxAdapter(AdapterBase):
    """Runs StorySync renders on a diffusers ``FluxPipeline``: :class:`FluxStorySyncProcessor` on
    every joint attention of its transformer while any mechanism is on."""

    family_type = FluxFamily
    denoiser_role = "transformer"

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The packed token grid: one token per 2x2 latent patch."""
        factor = int(self.pipe.vae_scale_factor) * 2
        return height // factor, width // factor

    def processor(self, name: str, state: StorySyncState, shares: bool, maps: bool, current: Any) -> Any:
        """FLUX has no CFG batch (``ModelInfo.cfg_batch`` is False): the guidance scale feeds the
        guidance embedding. The attention backend set on the transformer (``set_attention_backend``)
        is kept."""
        backend = getattr(current, "_attention_backend", None)
        if state.config.any_mechanism:
            return FluxStorySyncProcessor(name, state, shares, maps, state.text_len, backend)
        stock = FluxAttnProcessor()
        stock._attention_backend = backend
        return stock

    def _timesteps(self, num_steps: int, image_seq_len: int, device: torch.device) -> torch.Tensor:
        """Sigmas linspace(1, 1/n), resolution shift mu, as ``__call__``."""
        sched = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def prepare_run(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int],
        num_steps: int, height: int, width: int, guidance_scale: float,
    ) -> FluxRun:
        """As ``FluxPipeline.__call__`` starts, with ``max_sequence_length = state.text_len`` (the
        job's: the model's ``info.text_len`` unless the story asks for another); no negative prompt."""
        if negative_prompts is not None:
            raise ValueError("FluxPipeline takes no negative prompt (true CFG is not supported)")
        if state.guidance:
            raise ValueError("FLUX renders have no CFG batch (ModelInfo.cfg_batch is False)")
        pipe = self.pipe
        device = pipe._execution_device
        pipe._guidance_scale, pipe._joint_attention_kwargs = guidance_scale, {}
        pipe._current_timestep, pipe._interrupt = None, False
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=state.text_len,
        )
        offload_idle(pipe)  # --offload model: the text encoders leave the device, the transformer stays
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        latents, image_ids = pipe.prepare_latents(
            len(seeds), pipe.transformer.config.in_channels // 4, height, width, embeds.dtype, device, generators
        )
        timesteps = self._timesteps(num_steps, latents.shape[1], device)
        branch_latents = BranchLatents(pipe.scheduler, latents, state.bli_steps > 0, {}, scale_input=False,
                                       mirror_vanilla=state.config.bli_latents == "consistent")
        return FluxRun(timesteps, branch_latents, embeds, pooled, text_ids, image_ids, guidance_scale, height, width)

    def predict_noise(self, run: FluxRun, branches: tuple[str, ...], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One transformer call on the batch of ``branches`` (cond only: no CFG batch)."""
        pipe, reps = self.pipe, len(branches)
        model_in = run.latents.model_input(branches, t)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], run.guidance_scale, device=pipe._execution_device, dtype=torch.float32)
            guidance = guidance.expand(model_in.shape[0])
        timestep = t.expand(model_in.shape[0]).to(model_in.dtype)
        noise = pipe.transformer(
            hidden_states=model_in, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=torch.cat([run.pooled] * reps), encoder_hidden_states=torch.cat([run.embeds] * reps),
            txt_ids=run.text_ids, img_ids=run.image_ids, joint_attention_kwargs={}, return_dict=False,
        )[0]
        return noise.chunk(reps)

    def decode(self, run: FluxRun, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, run.height, run.width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = decode_each(lambda x, _: pipe.vae.decode(x, return_dict=False)[0], latents)
        return pipe.image_processor.postprocess(image, output_type="pil")
