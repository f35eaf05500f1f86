"""StorySync on diffusers UNet pipelines (SDXL, SD 1.x/2.x).

Two attention processors (``models/attention.py``) are installed with ``unet.set_attn_processor`` (by
``AdapterBase``, the UNet-style default); no UNet class is copied:
  - :class:`StorySyncSelfAttnProcessor` on every self-attention (``attn1``): BLI (Eq. 12) on all of
    them, masked cross-image sharing (Eq. 5-8, 13) and RFH (Eq. 9-11) on the shared layers;
  - :class:`SubjectMapProcessor` on the cross-attentions (``attn2``) of the mask layers: the stock
    output plus the subject-token attention maps (Eq. 2).
A layer with nothing to do at a step runs diffusers' own ``AttnProcessor2_0``, so with every
mechanism off the pipeline is bit-for-bit stock.

The denoising loop (``AdapterBase.generate``, with :class:`UNetAdapter`'s ``prepare_run``,
``predict_noise`` and ``decode``) follows ``StableDiffusionXLPipeline.__call__`` /
``StableDiffusionPipeline.__call__`` step for step, with two changes: each (branch) has its own
scheduler copy, so the vanilla branch can leave the batch after T steps with any scheduler, and
the shared state advances after every step.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from ..core.consistory import dift_step
from ..core.state import COND, CONSISTENT, StorySyncState
from .adapter_base import AdapterBase, Run
from .denoise import BranchLatents, decode_each
from .family import ModelFamily, ModelInfo, SamplingDefaults, UnknownModelError
from .offload import offload_idle


@dataclass
class PromptEmbeds:
    """The text conditioning of one render, one row per image: conditional and (with guidance)
    unconditional embeddings, and SDXL's pooled embeddings and micro-conditioning time ids."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@dataclass
class UNetRun(Run):
    """A UNet render's loop: the text conditioning, the per-image generators (the SD VAE decode
    draws from them), the guidance scale."""

    embeds: PromptEmbeds
    generators: list[torch.Generator]
    guidance_scale: float


def _rows(cond: torch.Tensor, uncond: torch.Tensor | None, reps: int) -> torch.Tensor:
    """Batch rows in the state's layout: [uncond x branches | cond x branches]."""
    rows = torch.cat([cond] * reps)
    return rows if uncond is None else torch.cat([torch.cat([uncond] * reps), rows])


class SDConditioning:
    """What SD 1.x/2.x add to the shared UNet loop: CLIP text embeddings and a plain VAE decode."""

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], negatives: list[str] | None, guidance: bool,
        device: torch.device, height: int, width: int,
    ) -> PromptEmbeds:
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negatives)
        return PromptEmbeds(cond=cond, uncond=uncond if guidance else None)

    def added_cond_kwargs(self, embeds: PromptEmbeds, reps: int, batch: int) -> dict | None:
        return None

    def decode(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, generators: list[torch.Generator]
    ) -> list[Image.Image]:
        image = decode_each(lambda x, rows: pipe.vae.decode(x, return_dict=False, generator=generators and generators[rows])[0],
                            latents / pipe.vae.config.scaling_factor)
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


class SDXLConditioning(SDConditioning):
    """SDXL: two text encoders with pooled embeddings, micro-conditioning time ids, and a VAE
    decode with upcasting, latent mean/std and the watermark, as ``StableDiffusionXLPipeline``."""

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], negatives: list[str] | None, guidance: bool,
        device: torch.device, height: int, width: int,
    ) -> PromptEmbeds:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negatives,
        )
        projection_dim = (
            int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        )
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=projection_dim,
        ).to(device)
        return PromptEmbeds(
            cond=cond, uncond=uncond if guidance else None, pooled=pooled,
            uncond_pooled=uncond_pooled if guidance else None, time_ids=time_ids,
        )

    def added_cond_kwargs(self, embeds: PromptEmbeds, reps: int, batch: int) -> dict | None:
        assert embeds.pooled is not None and embeds.time_ids is not None
        return {
            "text_embeds": _rows(embeds.pooled, embeds.uncond_pooled, reps),
            "time_ids": embeds.time_ids.repeat(batch, 1),
        }

    def decode(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, generators: list[torch.Generator]
    ) -> list[Image.Image]:
        needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if needs_upcasting:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        mean = getattr(pipe.vae.config, "latents_mean", None)
        std = getattr(pipe.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std_t / pipe.vae.config.scaling_factor + mean_t
        else:
            latents = latents / pipe.vae.config.scaling_factor
        image = decode_each(lambda x, _: pipe.vae.decode(x, return_dict=False)[0], latents)
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


# ---- the family: what the driver needs without weights -----------------------------------------
# The stock ``__call__`` defaults of the pipeline classes of this family: (num_inference_steps,
# guidance_scale), as in diffusers' pipeline_stable_diffusion_xl.py and pipeline_stable_diffusion.py
# (tests/test_native_defaults.py checks them against the installed diffusers). The default size comes
# from the model's own configs (sampling_defaults).
FAMILY_SAMPLING_DEFAULTS: dict[str, tuple[int, float]] = {
    "StableDiffusionXLPipeline": (50, 5.0),
    "StableDiffusionPipeline": (50, 7.5),
}
# Sharing and RFH in the decoder (as ConsiStory, and DESIGN's sizing); masks may come from every
# cross-attention, and with current-step masks those before the decoder are the ones that record.
SHARE_LAYERS = ("up_blocks",)
MASK_LAYERS = ("down_blocks", "mid_block", "up_blocks")


def size_factor_from_configs(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> int:
    """VAE scale factor times one factor of 2 per UNet downsampling (all down blocks but the last)."""
    return _vae_scale_factor(vae_config) * 2 ** (len(unet_config["down_block_types"]) - 1)


def _vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    # As the pipelines compute it: 2 ** (len(vae.config.block_out_channels) - 1).
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _class_key(pipeline_class: str | type) -> str:
    """The ``FAMILY_SAMPLING_DEFAULTS`` key of a pipeline class (a subclass counts as its base)."""
    if isinstance(pipeline_class, str):
        if pipeline_class in FAMILY_SAMPLING_DEFAULTS:
            return pipeline_class
        import diffusers

        found = getattr(diffusers, pipeline_class, None)
        mro = [c.__name__ for c in found.__mro__] if isinstance(found, type) else [pipeline_class]
        name = pipeline_class
    else:
        mro = [c.__name__ for c in pipeline_class.__mro__]
        name = pipeline_class.__name__
    for candidate in mro:
        if candidate in FAMILY_SAMPLING_DEFAULTS:
            return candidate
    raise UnknownModelError(f"{name} is not a supported pipeline (supported: {', '.join(FAMILY_SAMPLING_DEFAULTS)})")


def sampling_defaults(
    pipeline_class: str | type, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]
) -> SamplingDefaults:
    """The size, steps and guidance a stock ``pipeline_class(...)(prompt)`` call renders with.

    Size: ``unet.config.sample_size * vae_scale_factor`` (SDXL's ``default_sample_size`` is the
    UNet's ``sample_size``; SD 1.x/2.x read it the same way and also accept a ``[height, width]``
    pair). For SDXL base 1.0 that is 128 * 8 = 1024 px; for the tiny presets 32 * 8 = 256 px.
    Steps and guidance: the class's ``__call__`` defaults (``FAMILY_SAMPLING_DEFAULTS``).
    """
    steps, guidance = FAMILY_SAMPLING_DEFAULTS[_class_key(pipeline_class)]
    sample = unet_config.get("sample_size")
    if sample is None:
        sample = 128  # what StableDiffusionXLPipeline assumes for a UNet config without one
    if isinstance(sample, (list, tuple)):
        sample_h, sample_w = int(sample[0]), int(sample[1])
    else:
        sample_h = sample_w = int(sample)
    scale = _vae_scale_factor(vae_config)
    return SamplingDefaults(height=sample_h * scale, width=sample_w * scale, steps=steps, guidance_scale=guidance)


def _unet_info(tokenizer: Any, pipeline_class: str | type, unet: Mapping[str, Any], vae: Mapping[str, Any]) -> ModelInfo:
    defaults = sampling_defaults(pipeline_class, unet, vae)
    return ModelInfo(
        family=UNetFamily.name, tokenizer=tokenizer, size_factor=size_factor_from_configs(unet, vae),
        text_len=int(tokenizer.model_max_length), default_height=defaults.height, default_width=defaults.width,
        default_steps=defaults.steps, default_guidance_scale=defaults.guidance_scale,
        share_layers=SHARE_LAYERS, mask_layers=mask_layers_of(unet), feature_injection=True,
        freeu=True,
    )


def mask_layers_of(unet_config: Mapping[str, Any]) -> tuple[str, ...]:
    """``MASK_LAYERS`` less ``mid_block`` for a UNet whose mid block has no cross-attention (the
    toyworld model's: a default that selects no layer would be refused by ``check_layers``)."""
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return MASK_LAYERS if mid is not None and "CrossAttn" in mid else tuple(p for p in MASK_LAYERS if p != "mid_block")


class UNetFamily(ModelFamily):
    """SDXL and SD 1.x/2.x: ``UNet2DConditionModel`` with self-attention ``attn1`` and
    cross-attention ``attn2`` in every transformer block, CLIP tokenizers of 77 tokens."""

    name = "unet"
    pipeline_classes = tuple(FAMILY_SAMPLING_DEFAULTS)
    info_files = ("model_index.json", "tokenizer/*", "unet/config.json", "vae/config.json")

    def info_from_folder(self, folder: pathlib.Path, model_index: Mapping[str, Any]) -> ModelInfo:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return _unet_info(tokenizer, str(model_index.get("_class_name")), unet, vae)

    def info_from_pipeline(self, pipe: Any) -> ModelInfo:
        key = _class_key(type(pipe))  # refuses an unsupported pipeline before reading its parts
        unet, vae, tokenizer = (getattr(pipe, name, None) for name in ("unet", "vae", "tokenizer"))
        if unet is None or vae is None or tokenizer is None:
            raise UnknownModelError(f"{type(pipe).__name__} has no unet, vae or tokenizer")
        return _unet_info(tokenizer, key, dict(unet.config), dict(vae.config))

    def adapter(self, pipe: Any) -> UNetAdapter:
        return UNetAdapter(pipe)

    def presets(self) -> Mapping[str, Any]:
        from .unet_presets import UNET_PRESETS

        return UNET_PRESETS


# ---- the adapter: the denoising loop, step by step as the stock pipelines' __call__ -------------
class UNetAdapter(AdapterBase):
    """Runs StorySync renders on a diffusers UNet pipeline (SDXL or SD 1.x/2.x); the processors
    are the base's (``AdapterBase.processor``: ``attn1`` self-attentions, ``attn2`` maps)."""

    family_type = UNetFamily

    def __init__(self, pipe: DiffusionPipeline) -> None:
        super().__init__(pipe)
        self.conditioning = SDXLConditioning() if isinstance(pipe, StableDiffusionXLPipeline) else SDConditioning()

    @property
    def size_factor(self) -> int:
        """Height and width must be multiples of this (VAE factor x UNet downsamplings)."""
        down = sum(1 for block in self.pipe.unet.down_blocks if getattr(block, "downsamplers", None))
        return int(self.pipe.vae_scale_factor) * (2**down)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        factor = int(self.pipe.vae_scale_factor)
        return height // factor, width // factor

    @contextlib.contextmanager
    def render_context(self, state: StorySyncState, run: Run) -> Iterator[None]:
        """ConsiStory's pass 1: a hook that hands the first decoder block's output (DIFT features,
        ``up_blocks[0]``) of the conditional images at the DIFT step to ``state.injection``, while
        the loop runs; nothing when there is nothing to record."""
        if state.injection is None or state.pass_index != 0:
            yield
            return
        at = dift_step([int(t) for t in run.timesteps])

        def record(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if state.step == at:
                state.injection.record_dift(output[state.rows(COND, CONSISTENT)].detach())

        hook = self.pipe.unet.up_blocks[0].register_forward_hook(record)
        try:
            yield
        finally:
            hook.remove()

    def _begin_call(self, guidance_scale: float) -> bool:
        """The pipeline's per-call attributes, as ``__call__`` sets them; returns whether
        classifier-free guidance runs."""
        pipe = self.pipe
        pipe._guidance_scale = guidance_scale
        pipe._guidance_rescale = 0.0
        pipe._clip_skip = None
        pipe._cross_attention_kwargs = None
        pipe._interrupt = False
        return guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None

    def prepare_run(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int],
        num_steps: int, height: int, width: int, guidance_scale: float,
    ) -> UNetRun:
        """As ``__call__`` starts. ``negative_prompts=None`` is stock ``pipe(prompt)`` without a
        negative prompt (SDXL: zero unconditional embeddings where ``force_zeros_for_empty_prompt``;
        SD: the empty string's), which differs from an explicit ``""``."""
        pipe = self.pipe
        device = pipe._execution_device
        guidance = self._begin_call(guidance_scale)
        if guidance != state.guidance:
            raise ValueError("state.guidance does not match guidance_scale")
        embeds = self.conditioning.encode_prompt(pipe, prompts, negative_prompts, guidance, device, height, width)
        offload_idle(pipe)  # --offload model: the text encoders leave the device, the denoiser stays
        pipe.scheduler.set_timesteps(num_steps, device=device)
        timesteps = pipe.scheduler.timesteps
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(
            len(seeds), pipe.unet.config.in_channels, height, width, embeds.cond.dtype, device, generators
        )
        branch_latents = BranchLatents(
            pipe.scheduler, latents, state.bli_steps > 0, pipe.prepare_extra_step_kwargs(generators, 0.0),
            mirror_vanilla=state.config.bli_latents == "consistent",
        )
        return UNetRun(timesteps, branch_latents, embeds, generators, guidance_scale)

    def predict_noise(self, run: UNetRun, branches: tuple[str, ...], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One UNet call on the batch [uncond | cond] x branches; the guided noise per branch."""
        reps, embeds = len(branches), run.embeds
        model_in = run.latents.model_input(branches, t)
        if embeds.uncond is not None:
            model_in = torch.cat([model_in, model_in])
        noise = self.pipe.unet(
            model_in, t, encoder_hidden_states=_rows(embeds.cond, embeds.uncond, reps), timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=self.conditioning.added_cond_kwargs(embeds, reps, model_in.shape[0]),
            return_dict=False,
        )[0]
        if embeds.uncond is not None:
            uncond, cond = noise.chunk(2)
            noise = uncond + run.guidance_scale * (cond - uncond)
        return noise.chunk(reps)

    def decode(self, run: UNetRun, latents: torch.Tensor) -> list[Image.Image]:
        return self.conditioning.decode(self.pipe, latents, run.generators)
