"""StorySync on Kandinsky 3 (``Kandinsky3Pipeline``, ``Kandinsky3UNet``, T5 text, MoVQ decoder).

Every attention of ``Kandinsky3UNet`` is a ``Kandinsky3AttentionBlock`` whose ``Attention`` is built
with a context dimension, and the self-attentions pass ``context=hidden_states``: self- and
cross-attention cannot be told apart by their arguments, only by where they sit. In every down
and up block ``attentions.0`` is the block's self-attention (run first in a down block, last in an
up block) and ``attentions.1..`` are the text cross-attentions (one per resnet pair);
``add_time_condition.attention`` pools the text into the time embedding. So, by module name:

  - the UNet family's :class:`~.attention.StorySyncSelfAttnProcessor` (which reads a context that
    is the layer's own input as a self-attention) on every ``*.attentions.0.attention``: BLI
    (Eq. 12), and sharing (Eq. 5-8, 13) + RFH (Eq. 9-11) on the shared layers;
  - :class:`~.attention.SubjectMapProcessor` on the cross-attentions of the mask layers: the stock
    output plus the subject maps of Eq. 2, with the text padding masked as the layer masks it;
  - :class:`PerImagePoolingProcessor` on ``add_time_condition.attention`` during a render (below).

The stock pipeline cuts the padded 128-token text to the longest prompt of the batch plus one token
(``_cut_context``), and ``add_time_condition`` averages *all* of those tokens (padding included) into
its query: in a stock batch an image depends on its companions' prompt lengths. A frame must not
(the engine batches frames freely), so :meth:`Kandinsky3Adapter.generate` encodes each prompt as
the stock pipeline encodes it alone, pads the batch with masked zero tokens, and pools each row
over its own length. Every image is then, pixel for pixel, what stock ``pipe(prompt=[p])`` gives;
for a batch whose prompts have the same token count that is also what the stock batch call gives.

The denoising loop (``AdapterBase.generate``, with :class:`Kandinsky3Adapter`'s ``prepare_run``,
``predict_noise`` and ``decode``) follows ``Kandinsky3Pipeline.__call__`` step for step (DDPM by default, the
guided noise ``(g + 1) * cond - g * uncond``, MoVQ decode without quantization), with a scheduler
copy and a copy of the per-image generators per branch: DDPM draws variance noise at every step,
and the vanilla branch of BLI must not take the consistent branch's draws.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.kandinsky3.pipeline_kandinsky3 import downscale_height_and_width
from PIL import Image

from ..core.state import StorySyncState
from .adapter_base import AdapterBase, Run
from .attention import AttnProcessorCall
from .denoise import BranchLatents, decode_each
from .family import ModelFamily, ModelInfo, UnknownModelError
from .offload import offload_idle
from .preset_build import Preset

__all__ = [
    "Kandinsky3Adapter", "Kandinsky3Family", "PerImagePoolingProcessor", "is_cross_attention", "is_self_attention",
]

# ``Kandinsky3Pipeline.__call__``'s defaults (tests/test_kandinsky3.py checks them against its signature).
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_GUIDANCE = 1024, 25, 3.0
# The pipeline tokenizes to 128 tokens and computes the latent size with a MoVQ factor of 8, rounding the
# image size up to a multiple of 8 * 8 (``downscale_height_and_width``).
TEXT_LEN = 128
MOVQ_FACTOR = 8
SIZE_FACTOR = MOVQ_FACTOR * 8
LATENT_CHANNELS = 4  # hard-coded in Kandinsky3Pipeline.__call__
# Sharing and RFH in the decoder's self-attentions (one per up block, each run after its block's
# cross-attentions). Masks from the cross-attentions of down_blocks.2, at 1/4 of the latent (32x32 at
# 1024 px, as SDXL's): they run before the first shared layer (up_blocks.0's self-attention), and
# the bottleneck's (down_blocks.3, up_blocks.0: 16x16 at 1024 px) would win the lowest-resolution
# rule if listed and are coarse. See docs/models-kandinsky3.md.
SHARE_LAYERS = ("up_blocks",)
MASK_LAYERS = ("down_blocks.2",)
POOLING = "add_time_condition.attention.processor"

_SELF = re.compile(r"^(down|up)_blocks\.\d+\.attentions\.0\.attention\.processor$")
_CROSS = re.compile(r"^(down|up)_blocks\.\d+\.attentions\.[1-9]\d*\.attention\.processor$")


def is_self_attention(name: str) -> bool:
    """Whether a ``Kandinsky3UNet`` processor name is a block's self-attention (``attentions.0``)."""
    return bool(_SELF.match(name))


def is_cross_attention(name: str) -> bool:
    """Whether a processor name is a text cross-attention of a down/up block (``attentions.1..``)."""
    return bool(_CROSS.match(name))


class PerImagePoolingProcessor(AttnProcessorCall):
    """``add_time_condition``'s attention with each row's query averaged over that row's own text
    length (what the stock pipeline averages over when the prompt is rendered alone) instead of the
    batch's padded length. Rows whose length is the full context run exactly as stock."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] | None = None

    def attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        lengths = self.lengths
        if encoder_hidden_states is not None and lengths is not None:
            if len(lengths) != encoder_hidden_states.shape[0]:
                raise RuntimeError(f"pooling: batch {encoder_hidden_states.shape[0]} != {len(lengths)} lengths")
            full = encoder_hidden_states.shape[1]
            if any(n != full for n in lengths):
                hidden_states = torch.stack([
                    hidden_states[b] if n == full else encoder_hidden_states[b : b + 1, :n].mean(dim=1)
                    for b, n in enumerate(lengths)
                ])
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@dataclass
class Kandinsky3Run(Run):
    """A Kandinsky 3 render's loop: the T5 text of each image padded with masked zero tokens (and
    its unconditional one with guidance), each prompt's own length, the guidance scale."""

    cond: torch.Tensor
    cond_mask: torch.Tensor
    uncond: torch.Tensor | None
    uncond_mask: torch.Tensor | None
    lengths: list[int]
    guidance_scale: float


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of (1, L) or (1, L, C) to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return F.pad(x, (0, 0, 0, extra)) if x.ndim == 3 else F.pad(x, (0, extra))


# ---- the family: what the driver needs without weights -----------------------------------------
def _movq_factor(movq_config: Mapping[str, Any]) -> int:
    return 2 ** (len(movq_config["block_out_channels"]) - 1)


def _with_text_len(tokenizer: Any) -> Any:
    """The pipeline truncates at 128 tokens whatever the tokenizer says (real T5 tokenizers say 512)."""
    if getattr(tokenizer, "model_max_length", None) == TEXT_LEN:
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    tokenizer.model_max_length = TEXT_LEN
    return tokenizer


def _k3_info(tokenizer: Any, unet: Mapping[str, Any], movq: Mapping[str, Any]) -> ModelInfo:
    if _movq_factor(movq) != MOVQ_FACTOR:
        raise UnknownModelError(
            f"Kandinsky3Pipeline assumes a MoVQ that upsamples by {MOVQ_FACTOR}; this one upsamples by "
            f"{_movq_factor(movq)}, so its images would not have the size asked for"
        )
    if len(unet["block_out_channels"]) > 4:
        raise UnknownModelError("Kandinsky3UNet has at most 4 levels")
    return ModelInfo(
        family=Kandinsky3Family.name, tokenizer=_with_text_len(tokenizer), size_factor=SIZE_FACTOR,
        text_len=TEXT_LEN, default_height=DEFAULT_SIZE, default_width=DEFAULT_SIZE, default_steps=DEFAULT_STEPS,
        default_guidance_scale=DEFAULT_GUIDANCE, share_layers=SHARE_LAYERS, mask_layers=MASK_LAYERS,
        negative_prompt=True,
    )


class Kandinsky3Family(ModelFamily):
    """Kandinsky 3: ``Kandinsky3UNet`` (self-attention ``attentions.0``, text cross-attention
    ``attentions.1..`` per block), a T5 encoder with 128 masked tokens, a MoVQ decoder."""

    name = "kandinsky3"
    pipeline_classes = ("Kandinsky3Pipeline",)
    info_files = ("model_index.json", "tokenizer/*", "unet/config.json", "movq/config.json")

    def shares_at(self, processor: str) -> bool:
        return is_self_attention(processor)

    def maps_at(self, processor: str) -> bool:
        return is_cross_attention(processor)

    def info_from_folder(self, folder: pathlib.Path, model_index: Mapping[str, Any]) -> ModelInfo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", model_max_length=TEXT_LEN)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        movq = json.loads((folder / "movq" / "config.json").read_text())
        return _k3_info(tokenizer, unet, movq)

    def info_from_pipeline(self, pipe: Any) -> ModelInfo:
        if not isinstance(pipe, Kandinsky3Pipeline):
            raise UnknownModelError(f"{type(pipe).__name__} is not a Kandinsky3Pipeline")
        unet, movq, tokenizer = (getattr(pipe, name, None) for name in ("unet", "movq", "tokenizer"))
        if unet is None or movq is None or tokenizer is None:
            raise UnknownModelError(f"{type(pipe).__name__} has no unet, movq or tokenizer")
        return _k3_info(tokenizer, dict(unet.config), dict(movq.config))

    def adapter(self, pipe: Any) -> Kandinsky3Adapter:
        return Kandinsky3Adapter(pipe)

    def presets(self) -> Mapping[str, Any]:
        return _presets()


# ---- the adapter: the denoising loop, step by step as Kandinsky3Pipeline.__call__ ------------
class Kandinsky3Adapter(AdapterBase):
    """Runs StorySync renders on a ``Kandinsky3Pipeline``; the processors are the base's, by module
    name (``Kandinsky3Family.shares_at``/``maps_at``: see the module docstring)."""

    family_type = Kandinsky3Family

    def __init__(self, pipe: Kandinsky3Pipeline) -> None:
        super().__init__(pipe)
        self._pooling = PerImagePoolingProcessor()

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return downscale_height_and_width(height, width, MOVQ_FACTOR)

    def _encode(
        self, prompts: list[str], negatives: list[str] | None, guidance: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[int]]:
        """Each prompt encoded as the stock pipeline encodes it alone (``_cut_context``), padded to
        the longest with masked zero tokens: (cond, cond mask, uncond, uncond mask, lengths)."""
        parts = []
        for i, prompt in enumerate(prompts):
            negative = None if negatives is None else [negatives[i]]
            parts.append(self.pipe.encode_prompt(
                [prompt], guidance, num_images_per_prompt=1, device=device, negative_prompt=negative,
                _cut_context=True,
            ))
        lengths = [int(p[0].shape[1]) for p in parts]
        longest = max(lengths)
        cond = torch.cat([_pad(p[0], longest) for p in parts])
        cond_mask = torch.cat([_pad(p[2], longest) for p in parts]).bool()
        if not guidance:
            return cond, cond_mask, None, None, lengths
        uncond = torch.cat([_pad(p[1], longest) for p in parts])
        uncond_mask = torch.cat([_pad(p[3], longest) for p in parts]).bool()
        return cond, cond_mask, uncond, uncond_mask, lengths

    def prepare_run(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int],
        num_steps: int, height: int, width: int, guidance_scale: float,
    ) -> Kandinsky3Run:
        """As ``Kandinsky3Pipeline.__call__`` starts, each prompt encoded alone (``_encode``).
        ``negative_prompts=None`` is stock ``pipe(prompt)`` without a negative prompt: zero
        unconditional embeddings with an all-zero attention mask (an explicit ``""`` differs)."""
        pipe = self.pipe
        device = pipe._execution_device
        pipe._guidance_scale = guidance_scale
        guidance = pipe.do_classifier_free_guidance
        if guidance != state.guidance:
            raise ValueError("state.guidance does not match guidance_scale")
        cond, cond_mask, uncond, uncond_mask, lengths = self._encode(prompts, negative_prompts, guidance, device)
        offload_idle(pipe)  # --offload model: the text encoder leaves the device, the UNet stays
        pipe.scheduler.set_timesteps(num_steps, device=device)
        timesteps = pipe.scheduler.timesteps
        lat_h, lat_w = self.latent_hw(height, width)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(
            (len(seeds), LATENT_CHANNELS, lat_h, lat_w), cond.dtype, device, generators, None, pipe.scheduler
        )
        # Each branch draws DDPM's variance noise from its own copy of the per-image generators.
        branch_latents = BranchLatents(pipe.scheduler, latents, state.bli_steps > 0, {"generator": generators},
                                       scale_input=False, mirror_vanilla=state.config.bli_latents == "consistent")
        return Kandinsky3Run(timesteps, branch_latents, cond, cond_mask, uncond, uncond_mask, lengths, guidance_scale)

    @contextlib.contextmanager
    def render_context(self, state: StorySyncState, run: Run) -> Iterator[None]:
        """``add_time_condition`` pools each row over its own text length while the loop runs."""
        pooling_module = self.pipe.unet.add_time_condition.attention
        previous = pooling_module.processor
        pooling_module.set_processor(self._pooling)
        try:
            yield
        finally:
            self._pooling.lengths = None
            pooling_module.set_processor(previous)

    def predict_noise(self, run: Kandinsky3Run, branches: tuple[str, ...], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One UNet call on the batch [uncond | cond] x branches, guided ``(g + 1) * cond - g * uncond``."""
        reps, g = len(branches), run.guidance_scale
        model_in = run.latents.model_input(branches, t)
        text, mask = torch.cat([run.cond] * reps), torch.cat([run.cond_mask] * reps)
        if run.uncond is not None:
            model_in = torch.cat([model_in, model_in])
            text = torch.cat([torch.cat([run.uncond] * reps), text])
            mask = torch.cat([torch.cat([run.uncond_mask] * reps), mask])
        self._pooling.lengths = run.lengths * (model_in.shape[0] // len(run.lengths))
        noise = self.pipe.unet(model_in, t, encoder_hidden_states=text, encoder_attention_mask=mask,
                               return_dict=False)[0]
        if run.uncond is not None:
            noise_uncond, noise_text = noise.chunk(2)
            noise = (g + 1.0) * noise_text - g * noise_uncond
        return noise.chunk(reps)

    def decode(self, run: Kandinsky3Run, latents: torch.Tensor) -> list[Image.Image]:
        """The MoVQ decode without quantization, as the stock ``__call__``."""
        pipe = self.pipe
        image = decode_each(lambda x, _: pipe.movq.decode(x, force_not_quantize=True)["sample"], latents)
        image = (image * 0.5 + 0.5).clamp(0, 1)
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return pipe.numpy_to_pil(array)


# ---- the offline preset --------------------------------------------------------------------------
# Kandinsky 3's layout, tiny: four levels, the first without attention, so the encoder and the decoder
# attend at 1/2, 1/4 and 1/8 of the latent (4x4, 2x2, 1x1 at 64 px; the masks come from the 1/4 level).
# Kandinsky3UNet needs both: its per-level layout tuples have four entries (three levels build
# mismatched up blocks) and an up block with one resnet pair ends with the wrong channel count.
_TINY_UNET: dict[str, Any] = {
    "in_channels": LATENT_CHANNELS, "time_embedding_dim": 32, "groups": 8, "attention_head_dim": 8,
    "layers_per_block": 2, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
}
# Four levels so the MoVQ upsamples by 8, as Kandinsky3Pipeline assumes; SpatialNorm's GroupNorm has 32
# groups, hence 32 channels.
_TINY_MOVQ: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS, "norm_num_groups": 32, "num_vq_embeddings": 64, "vq_embed_dim": 4,
    "norm_type": "spatial", "sample_size": 64,
}
# The hub's scheduler config, kandinsky-community/kandinsky-3 scheduler/scheduler_config.json: a
# DDPMScheduler with beta_schedule "squaredcos_cap_v2" (with it diffusers derives the betas from the
# cosine alpha-bar and leaves beta_start/beta_end unused; they are kept as the hub states them),
# beta_start 0.00085, beta_end 0.012, clip_sample true, steps_offset 1, timestep_spacing "leading",
# variance_type "fixed_small". Those values are the hub file's as read there; the file could not be
# fetched here, so every other key is DDPMScheduler's default (diffusers 0.42), written out.
HUB_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "squaredcos_cap_v2",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 1, "rescale_betas_zero_snr": False,
}


def _tiny_text_encoder_config() -> dict[str, Any]:
    from .tokenizer import t5_vocab_size

    return {  # a FLAN-style T5 encoder: gated GELU, no dropout, T5's special ids
        "vocab_size": t5_vocab_size(), "d_model": _TINY_UNET["encoder_hid_dim"], "d_kv": 8, "d_ff": 64,
        "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }


def _build_text_encoder(cfg: dict[str, Any]) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**cfg))


def _build_tokenizer(cfg: dict[str, Any]) -> Any:
    from .tokenizer import build_t5_tokenizer

    return build_t5_tokenizer(**cfg)


# Kandinsky 3's components: its UNet, a MoVQ decoder, a T5 text encoder and tokenizer.
_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unet": lambda cfg: Kandinsky3UNet(**cfg),
    "movq": lambda cfg: VQModel(**cfg),
    "text_encoder": _build_text_encoder,
    "tokenizer": _build_tokenizer,
}

_PRESETS: dict[str, Any] | None = None


def _presets() -> Mapping[str, Any]:
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = {
            "tiny-kandinsky3": Preset(
                name="tiny-kandinsky3",
                pipeline_class=Kandinsky3Pipeline,
                scheduler_class=DDPMScheduler,
                components={
                    "unet": dict(_TINY_UNET), "movq": dict(_TINY_MOVQ), "text_encoder": _tiny_text_encoder_config(),
                    "tokenizer": {"model_max_length": TEXT_LEN}, "scheduler": dict(HUB_SCHEDULER_CONFIG),
                },
                builders=_BUILDERS,
            ),
        }
    return _PRESETS

