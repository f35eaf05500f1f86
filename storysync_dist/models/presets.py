"""Offline model presets and the one entry point that turns a model name into a loaded pipeline.

The presets (`tiny-sd`, `tiny-sdxl`) are the real diffusers pipeline classes with tiny configs and
seeded random weights. They exist so that tests, CI and laptops exercise exactly the code paths a real
checkpoint goes through (attention processors at two decoder resolutions, SDXL's text_time conditioning,
two text encoders, `vae_scale_factor == 8`) without network access or a GPU. Each preset is built once,
written with `save_pretrained` and always loaded back with `from_pretrained`, so the real loading path
runs every time.

`random-sdxl` is the exception: the full-size SDXL base architecture with seeded random weights, for
benchmarks (real compute, noise pictures). At ~3.5B parameters (14 GB in float32) saving it would cost
more than building it, so `load_pipeline` builds it in memory, directly in the requested dtype and on
the requested device; only its configs and tokenizers are written to disk (for `load_model_info`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import accelerate
import diffusers
import diffusers.utils.deprecation_utils
import diffusers.utils.logging
import huggingface_hub.utils
import torch
import transformers
import transformers.utils.logging
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from storysync_dist.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

__all__ = [
    "PRESETS",
    "PRESET_VERSION",
    "Preset",
    "UnknownModelError",
    "cache_root",
    "cached_snapshot",
    "check_model_index",
    "load_pipeline",
    "looks_like_hub_id",
    "preset_path",
]

# Bump when a preset changes in a way its config dicts do not capture (e.g. how weights are seeded).
PRESET_VERSION = 1
_MANIFEST = "storysync_preset.json"
_BUILD_LOCK = threading.Lock()


# Recent diffusers (0.42 here) renamed from_pretrained's `torch_dtype` to `dtype` and warns on the old
# name; older releases (pyproject allows >= 0.30) only know `torch_dtype`.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


class UnknownModelError(ValueError):
    """A model string that is neither a preset, a local pipeline folder, nor a hub id."""


# ----------------------------------------------------------------------------------------------- configs

# Four VAE levels so vae_scale_factor == 8 as in every real SD/SDXL checkpoint; channels stay tiny because
# the decoder's last level runs at full image resolution and dominates CPU render time.
_VAE_BASE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 256,
}

# Cross-attention at two resolutions in both encoder and decoder, mirroring SD/SDXL's layout (the
# highest-resolution level has no attention in SDXL; kept that way here because it is also the slowest).
_UNET_BASE: dict[str, Any] = {
    "sample_size": 32,  # latent size: pipelines default to 32 * 8 = 256 px
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}

_TEXT_BASE: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    # Same special ids as the real CLIP configs, so pooling finds the <|endoftext|> position.
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# The schedulers are SD 1.5's and SDXL base's scheduler_config.json, minus keys the class does not take.
_SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

_SDXL_TIME_EMBED_DIM = 8


def _sd_components() -> dict[str, dict[str, Any]]:
    text = {**_TEXT_BASE, "hidden_act": "quick_gelu"}  # CLIP ViT-L/14, as in SD 1.x
    return {
        "unet": {**_UNET_BASE, "cross_attention_dim": text["hidden_size"], "attention_head_dim": 4},
        "vae": {**_VAE_BASE, "scaling_factor": 0.18215},
        "text_encoder": text,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "scheduler": dict(_SD15_SCHEDULER),
    }


def _sdxl_components() -> dict[str, dict[str, Any]]:
    text = {**_TEXT_BASE, "hidden_act": "quick_gelu"}  # CLIP ViT-L/14
    text_2 = {**_TEXT_BASE, "hidden_act": "gelu"}  # OpenCLIP bigG uses plain gelu
    return {
        "unet": {
            **_UNET_BASE,
            # SDXL concatenates both encoders' hidden states for cross-attention...
            "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 1, 2],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
            # ...and conditions on 6 micro-conditioning ints plus encoder 2's pooled projection.
            "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + text_2["projection_dim"],
        },
        "vae": {**_VAE_BASE, "scaling_factor": 0.13025},
        "text_encoder": text,
        "text_encoder_2": text_2,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},  # real SDXL's tokenizer_2 pads with "!" (id 0)
        "scheduler": dict(_SDXL_SCHEDULER),
    }


# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): unet/config.json, every key the class takes
# (its 2,567,463,684 parameters are checked in tests/test_presets.py).
_SDXL_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + text_encoder_2's 1280
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# SDXL base 1.0's vae/config.json.
_SDXL_BASE_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _sdxl_base_components() -> dict[str, dict[str, Any]]:
    # The special token ids stay those of _TEXT_BASE (the tokenizer's real ids); the hub configs'
    # legacy ids (bos 0, eos 2) make transformers pool at the same <|endoftext|> position.
    text = {  # CLIP ViT-L/14 text tower
        **_TEXT_BASE, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
    }
    text_2 = {  # OpenCLIP ViT-bigG/14 text tower
        **_TEXT_BASE, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
        "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
    }
    return {
        "unet": dict(_SDXL_BASE_UNET),
        "vae": dict(_SDXL_BASE_VAE),
        "text_encoder": text,
        "text_encoder_2": text_2,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": dict(_SDXL_SCHEDULER),
    }


# ------------------------------------------------------------------------------------------------ presets

_COMPONENT_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unet": lambda cfg: UNet2DConditionModel(**cfg),
    "vae": lambda cfg: AutoencoderKL(**cfg),
    "text_encoder": lambda cfg: CLIPTextModel(CLIPTextConfig(**cfg)),
    "text_encoder_2": lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    "tokenizer": lambda cfg: build_clip_tokenizer(**cfg),
    "tokenizer_2": lambda cfg: build_clip_tokenizer(**cfg),
}


_SEEDS = {
    "unet": 0,
    "vae": 1,
    "text_encoder": 2,
    "text_encoder_2": 3,
    "tokenizer": 4,
    "tokenizer_2": 5,
    "scheduler": 6,
}


@dataclass(frozen=True)
class Preset:
    """An offline, deterministic stand-in for a real checkpoint of `pipeline_class`.

    ``in_memory`` presets are never saved with their weights: :func:`load_pipeline` builds them in
    memory with :meth:`build_in_memory` (see ``random-sdxl``).
    """

    name: str
    pipeline_class: type[DiffusionPipeline]
    scheduler_class: type
    components: Mapping[str, Mapping[str, Any]]
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    in_memory: bool = False

    def cache_key(self) -> str:
        """Short hash of everything that determines the saved weights and configs."""
        payload = json.dumps(self._manifest(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def _manifest(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "preset_version": PRESET_VERSION,
            "pipeline_class": self.pipeline_class.__name__,
            "scheduler_class": self.scheduler_class.__name__,
            "components": self.components,
            "pipeline_kwargs": self.pipeline_kwargs,
            "versions": {
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }

    def build(self) -> DiffusionPipeline:
        """Instantiate the pipeline with seeded random weights (in memory; nothing is saved)."""
        parts: dict[str, Any] = {}
        # The cache key promises identical weights everywhere, so pin what a caller may have changed
        # globally (default dtype/device), and leave the caller's RNG stream as it was.
        caller_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                for role, cfg in self.components.items():
                    # A fixed seed per role makes each component's weights independent of build order
                    # and of the other components, and keeps SDXL's two text encoders distinct.
                    torch.manual_seed(_SEEDS[role])
                    if role == "scheduler":
                        parts[role] = self.scheduler_class(**cfg)
                    else:
                        parts[role] = _COMPONENT_BUILDERS[role](dict(cfg))
        finally:
            torch.set_default_dtype(caller_dtype)
        pipe = self.pipeline_class(**parts, **self.pipeline_kwargs)
        return pipe

    def build_in_memory(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> DiffusionPipeline:
        """Build the pipeline with seeded random weights, allocated on ``device`` in ``dtype``.

        Each model is constructed on the meta device (no memory, no init work) and then gets its
        parameters one tensor at a time from a per-component CPU generator: normal(0, 1/sqrt(fan_in))
        for matrices and kernels, ones for norm scales, zeros for biases. The draws happen in float32
        on the CPU, so the weights are the same on every device and differ across dtypes only by
        rounding; the host never holds more than one float32 tensor besides the weights.
        """
        parts: dict[str, Any] = {}
        caller_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            for role, cfg in self.components.items():
                if role == "scheduler":
                    parts[role] = self.scheduler_class(**cfg)
                elif role.startswith("tokenizer"):
                    parts[role] = _COMPONENT_BUILDERS[role](dict(cfg))
                else:
                    # Buffers stay real (CLIP's position ids are computed at construction).
                    with accelerate.init_empty_weights(include_buffers=False):
                        model = _COMPONENT_BUILDERS[role](dict(cfg))
                    parts[role] = _materialize(model, _SEEDS[role], device, dtype)
        finally:
            torch.set_default_dtype(caller_dtype)
        return self.pipeline_class(**parts, **self.pipeline_kwargs)

    def path(self) -> pathlib.Path:
        """Folder this preset is (or will be) saved to."""
        return cache_root() / "presets" / f"{self.name}-{self.cache_key()}"


def _materialize(model: torch.nn.Module, seed: int, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every meta parameter of ``model`` by a seeded random one on ``device`` in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                values = torch.empty(param.shape, dtype=torch.float32)
                if values.ndim >= 2:
                    # Unit-variance activations through each layer, so 70 transformer blocks of
                    # random weights still give finite, unsaturated numbers in half precision.
                    values.normal_(0.0, (values[0].numel()) ** -0.5, generator=generator)
                elif name == "weight":
                    values.fill_(1.0)  # norm scales
                else:
                    values.zero_()
                done[id(param)] = torch.nn.Parameter(values.to(device=device, dtype=dtype), requires_grad=False)
            module._parameters[name] = done[id(param)]
    return model.eval()


PRESETS: dict[str, Preset] = {
    "tiny-sd": Preset(
        name="tiny-sd",
        pipeline_class=StableDiffusionPipeline,
        scheduler_class=PNDMScheduler,
        components=_sd_components(),
        pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    ),
    "tiny-sdxl": Preset(
        name="tiny-sdxl",
        pipeline_class=StableDiffusionXLPipeline,
        scheduler_class=EulerDiscreteScheduler,
        components=_sdxl_components(),
        pipeline_kwargs={"image_encoder": None, "feature_extractor": None},
    ),
    # For benchmarks: SDXL base 1.0's architecture and compute (UNet 2.57B, VAE, CLIP ViT-L and
    # OpenCLIP bigG text towers, 3.47B parameters), seeded random weights, so its pictures are noise.
    # Built in memory by load_pipeline (see Preset.build_in_memory); never saved with weights.
    "random-sdxl": Preset(
        name="random-sdxl",
        pipeline_class=StableDiffusionXLPipeline,
        scheduler_class=EulerDiscreteScheduler,
        components=_sdxl_base_components(),
        pipeline_kwargs={"image_encoder": None, "feature_extractor": None},
        in_memory=True,
    ),
}


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    # Local loads/saves take well under a second; their per-component bars only clutter worker logs.
    # These switches are process-global, so restore whatever the caller had.
    # transformers' switch also flips huggingface_hub's, so that one is saved and restored too.
    diffusers_on = diffusers.utils.logging.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    hub_off = huggingface_hub.utils.are_progress_bars_disabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if diffusers_on:
            diffusers.utils.logging.enable_progress_bar()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()
        if hub_off:
            huggingface_hub.utils.disable_progress_bars()
        else:
            huggingface_hub.utils.enable_progress_bars()


def cache_root() -> pathlib.Path:
    """Root of storysync's on-disk cache: `$STORYSYNC_CACHE`, else `~/.cache/storysync`."""
    env = os.environ.get("STORYSYNC_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "storysync"


def _get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise _unknown(name) from None


def _unknown(model: str) -> UnknownModelError:
    names = ", ".join(sorted(PRESETS))
    return UnknownModelError(
        f"unknown model or preset {model!r}: not a local folder, not a hub id, and not one of the presets: {names}"
    )


def preset_path(name: str) -> pathlib.Path:
    """Return the saved folder of preset `name`, building and saving it first if needed.

    For an ``in_memory`` preset the folder holds the configs and tokenizers only (what
    ``load_model_info`` reads), no weights: load it with ``load_pipeline(name)``, not from the folder.

    The build happens in a temporary sibling folder that is atomically renamed into place, so
    concurrent processes (Ray workers on one node) never see a half-written preset; a process that
    loses the race just discards its own copy.
    """
    preset = _get_preset(name)
    target = preset.path()
    if (target / "model_index.json").is_file():
        return target
    # Threads share torch's global RNG, so two concurrent in-process builds would interleave their
    # seeding; processes are kept apart by the atomic rename below instead.
    with _BUILD_LOCK:
        if not (target / "model_index.json").is_file():
            _build_into(preset, target)
    return target


def _build_into(preset: Preset, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes the folder 0700; a shared cache must stay readable by other users.
        tmp.chmod(0o755)
        with _quiet_progress_bars():
            if preset.in_memory:
                _save_configs(preset, tmp)
            else:
                pipe = preset.build()
                pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MANIFEST).write_text(json.dumps(preset._manifest(), indent=2, sort_keys=True, default=str))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy in first (the target is then a non-empty directory).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_configs(preset: Preset, folder: pathlib.Path) -> None:
    """Write a pipeline folder without weights: model_index.json, every config, the tokenizers."""
    parts: dict[str, Any] = {}
    for role, cfg in preset.components.items():
        if role == "scheduler":
            parts[role] = preset.scheduler_class(**cfg)
        else:
            with torch.device("meta"):  # structure only: nothing is allocated or initialized
                parts[role] = _COMPONENT_BUILDERS[role](dict(cfg))
    pipe = preset.pipeline_class(**parts, **preset.pipeline_kwargs)
    pipe.save_config(folder)  # model_index.json
    for role, part in parts.items():
        if role.startswith("tokenizer"):
            part.save_pretrained(folder / role)
        elif hasattr(part, "save_config"):  # diffusers models and schedulers
            part.save_config(folder / role)
        else:  # transformers models
            part.config.save_pretrained(folder / role)


# Hub repo ids: "org/name", alphanumerics plus - _ . (not leading), at most 96 characters per part.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def looks_like_hub_id(model: str) -> bool:
    """True for strings shaped like a Hugging Face hub repo id ("org/name")."""
    return bool(_HUB_ID.match(model)) and ".." not in model and "--" not in model and not model.endswith(".")


# The libraries a model_index.json component may come from. Anything else names a Python module
# that diffusers would import, or load from the folder itself: custom code.
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def _entry_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _library_module(library: str) -> types.ModuleType | None:
    """The module a component's library name resolves to: diffusers, transformers, or one of
    diffusers' own pipeline packages (SD 1.x folders name ``["stable_diffusion",
    "StableDiffusionSafetyChecker"]``); None for anything else."""
    if library == "diffusers":
        return diffusers
    if library == "transformers":
        return transformers
    if not re.fullmatch(r"[a-z][a-z0-9_]*", library):
        return None
    try:
        module = getattr(diffusers.pipelines, library, None)
    except (ImportError, RuntimeError, AttributeError):
        return None
    if isinstance(module, types.ModuleType) and module.__name__ == f"diffusers.pipelines.{library}":
        return module
    return None


def _class_of(module: types.ModuleType, name: str) -> type | None:
    if module is transformers:
        from diffusers.pipelines import pipeline_loading_utils

        # diffusers renames a few deprecated transformers classes (CLIPFeatureExtractor) on load.
        remap = getattr(pipeline_loading_utils, "_maybe_remap_transformers_class", None)
        name = (remap(name) if remap is not None else None) or name
    if name.startswith("_"):
        return None
    try:
        found = getattr(module, name, None)
    except (ImportError, RuntimeError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def check_model_index(folder: str | os.PathLike[str]) -> None:
    """Refuse a pipeline folder whose ``model_index.json`` would make diffusers run code of its own.

    ``_class_name`` must be a string naming a pipeline class that ``diffusers`` exports (a list
    ``[module, class]`` names a custom pipeline file), and every component entry
    ``[library, class]`` must name a class of ``diffusers`` or ``transformers`` (or of one of
    diffusers' pipeline packages, like ``stable_diffusion``), with no ``<component>/<library>.py``
    file in the folder (diffusers would load that file instead); ``[null, null]`` entries (absent
    components) are fine. Nothing is imported from the folder. Raises ``UnknownModelError`` with
    one line naming the folder and the entry.
    """
    root = pathlib.Path(folder)
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnknownModelError(f"{root}: not a diffusers pipeline folder (no model_index.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnknownModelError(f"{index_path}: unreadable model_index.json ({exc})") from None
    if not isinstance(index, dict):
        raise UnknownModelError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
    where = f"{root}: model_index.json"

    class_name = index.get("_class_name")
    pipeline_class = _class_of(diffusers, class_name) if isinstance(class_name, str) else None
    if pipeline_class is None or not issubclass(pipeline_class, DiffusionPipeline):
        raise UnknownModelError(
            f"{where}: _class_name {_entry_text(class_name)} is not a pipeline class of diffusers; "
            "custom pipeline code is never loaded"
        )
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue  # bookkeeping (_diffusers_version, ...) and plain config values
        library, component_class = value
        if library is None:
            continue  # an absent component: diffusers loads nothing for it
        entry = f'{where}: entry "{name}": {_entry_text(value)}'
        module = _library_module(library) if isinstance(library, str) else None
        if module is None:
            raise UnknownModelError(
                f"{entry} names library {_entry_text(library)}; only {' and '.join(_COMPONENT_LIBRARIES)} "
                "components are loaded, never custom code"
            )
        if not isinstance(component_class, str) or _class_of(module, component_class) is None:
            raise UnknownModelError(f"{entry}: {library} has no class {_entry_text(component_class)}")
        if (root / name / f"{library}.py").exists():
            raise UnknownModelError(
                f"{entry}: the folder has {name}/{library}.py, which diffusers would load as custom code"
            )


def _not_cached(model: str, detail: str = "") -> UnknownModelError:
    more = f" ({detail})" if detail else ""
    return UnknownModelError(
        f"{model!r} is not in the Hugging Face cache{more}; models are never downloaded here: fetch it "
        f"first with `hf download {model}` (or `huggingface-cli download {model}`)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cached_snapshot(model: str, allow_patterns: list[str] | None = None) -> pathlib.Path:
    """The folder of hub id ``model`` in the Hugging Face cache, without touching the network.

    Raises ``UnknownModelError`` (one line, saying how to fetch it) when it is not cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return pathlib.Path(snapshot_download(model, allow_patterns=allow_patterns, local_files_only=True))
    except HFValidationError as exc:
        raise UnknownModelError(f"{model!r} is not a valid Hugging Face hub id: {_first_line(exc)}") from None
    except OSError:  # LocalEntryNotFoundError (also a FileNotFoundError), an unreadable cache
        raise _not_cached(model) from None


def load_pipeline(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Load a diffusers pipeline from a preset name, a local pipeline folder, or a cached hub id.

    Resolution order: preset name, existing local directory, "org/name" hub id already in the
    Hugging Face cache. Nothing is downloaded, no remote or custom code runs (``trust_remote_code``
    and ``custom_pipeline`` are never passed, and ``check_model_index`` refuses a folder that names
    code of its own), and only safetensors weights are read. Anything else raises
    `UnknownModelError`: an unknown name, a hub id not in the cache (the message says how to fetch
    it), a folder that is not a plain diffusers pipeline. An ``in_memory`` preset
    (``random-sdxl``) is built here, on ``device`` in ``dtype``, without touching the disk.
    """
    dtype_kw = {_DTYPE_KWARG: dtype}
    if model in PRESETS and PRESETS[model].in_memory:
        # One build at a time: accelerate's empty-weights switch is process-global.
        with _BUILD_LOCK, _quiet_progress_bars():
            pipe = PRESETS[model].build_in_memory(device, dtype)
    elif model in PRESETS:
        preset = PRESETS[model]
        path = preset_path(model)
        with _quiet_progress_bars():
            pipe = preset.pipeline_class.from_pretrained(path, use_safetensors=True, **dtype_kw)
    else:
        if os.path.isdir(os.path.expanduser(model)):
            folder, hub = pathlib.Path(os.path.expanduser(model)), False
        elif looks_like_hub_id(model):
            folder, hub = cached_snapshot(model), True
        else:
            raise _unknown(model)
        check_model_index(folder)
        try:
            with _quiet_progress_bars():
                # The validated folder itself (for a hub id: its cached snapshot) is what loads.
                pipe = DiffusionPipeline.from_pretrained(
                    folder, use_safetensors=True, local_files_only=True, **dtype_kw
                )
        except OSError as exc:  # missing files: weights not cached, only .bin weights, ...
            if hub:
                raise _not_cached(model, f"not completely: {_first_line(exc)}") from None
            raise UnknownModelError(f"{folder}: cannot load the pipeline: {_first_line(exc)}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
