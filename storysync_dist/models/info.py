"""What a driver needs to know about a model without loading its weights: the tokenizer (to
validate prompts), the size factor (to validate height and width) and the sampling defaults a
story may leave out (size, steps, guidance), chosen the way the model's stock pipeline chooses them.

A Ray driver runs on the head node, often without a GPU; loading a whole SDXL pipeline there just
to tokenize prompts would cost minutes and gigabytes, so it reads the folder's configs instead
(:func:`load_model_info`). A job that already holds a loaded pipeline (``prepare_job(pipe=...)``)
gets the same :class:`ModelInfo` from it (:func:`model_info_from_pipeline`), so both paths resolve
the same defaults, fingerprints and ``config`` column.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .loading import cached_snapshot, check_model_index, looks_like_hub_id
from .presets import PRESETS, UnknownModelError, preset_path

__all__ = [
    "FAMILY_SAMPLING_DEFAULTS", "ModelInfo", "SamplingDefaults", "load_model_info", "model_folder",
    "model_info_from_pipeline", "sampling_defaults", "size_factor_from_configs",
]

_INFO_FILES = ["model_index.json", "tokenizer/*", "unet/config.json", "vae/config.json"]

# The stock ``__call__`` defaults of the pipeline classes we render with: (num_inference_steps,
# guidance_scale), as in diffusers' pipeline_stable_diffusion_xl.py and pipeline_stable_diffusion.py
# (tests/test_native_defaults.py checks them against the installed diffusers). The default size is
# not here: like those pipelines it comes from the model's own configs (sampling_defaults). The only
# place outside presets/unet that names these families; a model-family registry will replace it.
FAMILY_SAMPLING_DEFAULTS: dict[str, tuple[int, float]] = {
    "StableDiffusionXLPipeline": (50, 5.0),
    "StableDiffusionPipeline": (50, 7.5),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What the stock pipeline uses when ``pipe(prompt)`` is called without these arguments."""

    height: int
    width: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ModelInfo:
    """The tokenizer of the first text encoder, the pixel multiple height/width must have, and
    the model's native sampling defaults (what a story that leaves them out renders with)."""

    tokenizer: Any
    size_factor: int
    default_height: int
    default_width: int
    default_steps: int
    default_guidance_scale: float

    @property
    def defaults(self) -> SamplingDefaults:
        return SamplingDefaults(self.default_height, self.default_width, self.default_steps,
                                self.default_guidance_scale)


def size_factor_from_configs(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> int:
    """VAE scale factor times one factor of 2 per UNet downsampling (all down blocks but the last)."""
    return _vae_scale_factor(vae_config) * 2 ** (len(unet_config["down_block_types"]) - 1)


def _vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    # As the pipelines compute it: 2 ** (len(vae.config.block_out_channels) - 1).
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _family_of(pipeline_class: str | type) -> str:
    """The family-table key of a pipeline class (a subclass counts as its family), or
    ``UnknownModelError``. A name is looked up in diffusers so that subclasses resolve too."""
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
    raise UnknownModelError(
        f"{name} is not a supported pipeline (supported: {', '.join(FAMILY_SAMPLING_DEFAULTS)})"
    )


def sampling_defaults(
    pipeline_class: str | type, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]
) -> SamplingDefaults:
    """The size, steps and guidance a stock ``pipeline_class(...)(prompt)`` call renders with.

    Size: ``unet.config.sample_size * vae_scale_factor`` (SDXL's ``default_sample_size`` is the
    UNet's ``sample_size``; SD 1.x/2.x read it the same way and also accept a ``[height, width]``
    pair). For SDXL base 1.0 that is 128 * 8 = 1024 px; for the tiny presets 32 * 8 = 256 px.
    Steps and guidance: the class's ``__call__`` defaults (``FAMILY_SAMPLING_DEFAULTS``).
    """
    steps, guidance = FAMILY_SAMPLING_DEFAULTS[_family_of(pipeline_class)]
    sample = unet_config.get("sample_size")
    if sample is None:
        sample = 128  # what StableDiffusionXLPipeline assumes for a UNet config without one
    if isinstance(sample, (list, tuple)):
        sample_h, sample_w = int(sample[0]), int(sample[1])
    else:
        sample_h = sample_w = int(sample)
    scale = _vae_scale_factor(vae_config)
    return SamplingDefaults(height=sample_h * scale, width=sample_w * scale, steps=steps, guidance_scale=guidance)


def model_folder(model: str) -> pathlib.Path:
    """The local folder of a preset, a local pipeline folder, or a hub id's cached snapshot.

    Never touches the network: a hub id must already be in the Hugging Face cache. A local folder
    or snapshot whose ``model_index.json`` names custom code is refused here too
    (``check_model_index``), so a driver stops before any worker starts. ``UnknownModelError``
    (one line) for every problem.
    """
    if model in PRESETS:
        return preset_path(model)
    if os.path.isdir(os.path.expanduser(model)):
        folder = pathlib.Path(os.path.expanduser(model))
        check_model_index(folder)
        return folder
    if looks_like_hub_id(model):
        folder = cached_snapshot(model, allow_patterns=_INFO_FILES)
        check_model_index(folder)
        return folder
    raise UnknownModelError(
        f"unknown model or preset {model!r}: not a local folder, not a hub id, and not one of the presets: "
        + ", ".join(sorted(PRESETS))
    )


def _info(tokenizer: Any, pipeline_class: str | type, unet: Mapping[str, Any], vae: Mapping[str, Any]) -> ModelInfo:
    defaults = sampling_defaults(pipeline_class, unet, vae)
    return ModelInfo(
        tokenizer=tokenizer, size_factor=size_factor_from_configs(unet, vae),
        default_height=defaults.height, default_width=defaults.width, default_steps=defaults.steps,
        default_guidance_scale=defaults.guidance_scale,
    )


def load_model_info(model: str) -> ModelInfo:
    """Tokenizer, size factor and sampling defaults of ``model`` from its folder's files: the
    ``_class_name`` of ``model_index.json``, the unet and vae configs (no weights are read)."""
    from transformers import CLIPTokenizer

    folder = model_folder(model)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise UnknownModelError(f"{model!r} is not a diffusers UNet pipeline folder: {exc}") from None
    try:
        return _info(tokenizer, str(index.get("_class_name")), unet, vae)
    except UnknownModelError as exc:
        raise UnknownModelError(f"{model!r}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # a config without block lists, ...
        raise UnknownModelError(f"{model!r} is not a diffusers UNet pipeline folder: bad config ({exc!r})") from None


def model_info_from_pipeline(pipe: object) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded pipeline: the same values :func:`load_model_info` reads
    from the folder it was loaded from (``pipe.unet.config``, ``pipe.vae.config`` and its class)."""
    unet, vae, tokenizer = (getattr(pipe, name, None) for name in ("unet", "vae", "tokenizer"))
    family = _family_of(type(pipe))  # refuses an unsupported pipeline before reading its parts
    if unet is None or vae is None or tokenizer is None:
        raise UnknownModelError(f"{type(pipe).__name__} has no unet, vae or tokenizer")
    return _info(tokenizer, family, dict(unet.config), dict(vae.config))
