"""The one entry point that turns a model name into a loaded pipeline.

`load_pipeline` resolves a model string in order: an offline preset (``registry.PRESETS``), an existing
local pipeline folder, an "org/name" hub id already in the Hugging Face cache. Nothing is downloaded and
no remote or custom code runs: ``hub.check_model_index`` refuses a folder whose ``model_index.json``
names code of its own, ``hub.cached_snapshot`` finds a hub id's folder without touching the network, and
only safetensors weights are read. The checks are importable from here too.
"""

from __future__ import annotations

import os
import pathlib

import diffusers.utils.deprecation_utils
import torch
from diffusers import DiffusionPipeline

from .family import UnknownModelError
from .hub import cached_snapshot, check_model_index, first_line, looks_like_hub_id, not_cached
from .offload import enable_offload
from .preset_build import BUILD_LOCK, quiet_progress_bars
from .registry import PRESETS, preset_path, unknown_model

__all__ = [
    "OFFLOADS",
    "UnknownModelError",
    "cached_snapshot",
    "check_model_index",
    "load_pipeline",
    "looks_like_hub_id",
]


# Recent diffusers (0.42 here) renamed from_pretrained's `torch_dtype` to `dtype` and warns on the old
# name; older releases (pyproject allows >= 0.30) only know `torch_dtype`.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


OFFLOADS = ("none", "model")


def load_pipeline(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    offload: str = "none",
) -> DiffusionPipeline:
    """Load a diffusers pipeline from a preset name, a local pipeline folder, or a cached hub id.

    Resolution order: preset name, existing local directory, "org/name" hub id already in the
    Hugging Face cache. Nothing is downloaded, no remote or custom code runs (``trust_remote_code``
    and ``custom_pipeline`` are never passed, and ``check_model_index`` refuses a folder that names
    code of its own), and only safetensors weights are read. Anything else raises
    `UnknownModelError`: an unknown name, a hub id not in the cache (the message says how to fetch
    it), a folder that is not a plain diffusers pipeline. An ``in_memory`` preset
    (``random-sdxl``) is built here, in ``dtype``, without touching the disk: on ``device``, or in
    host memory with ``offload="model"`` (the offloaded components must not pass through the device).

    ``offload="model"`` (``--offload model``) installs diffusers' model offload instead of moving
    the pipeline to ``device`` (``models.offload``): the denoiser moves to ``device`` once and stays
    there; the text encoders and the VAE rest in host memory and visit the device for their forward
    passes (accelerate hooks), leaving it once the prompts are encoded and once the images are decoded.
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, not {offload!r}")
    dtype_kw = {_DTYPE_KWARG: dtype}
    if model in PRESETS and PRESETS[model].in_memory:
        # One build at a time: accelerate's empty-weights switch is process-global.
        with BUILD_LOCK, quiet_progress_bars():
            pipe = PRESETS[model].build_in_memory("cpu" if offload == "model" else device, dtype)
    elif model in PRESETS:
        preset = PRESETS[model]
        path = preset_path(model)
        with quiet_progress_bars():
            pipe = preset.pipeline_class.from_pretrained(path, use_safetensors=True, **dtype_kw)
    else:
        if os.path.isdir(os.path.expanduser(model)):
            folder, hub = pathlib.Path(os.path.expanduser(model)), False
        elif looks_like_hub_id(model):
            folder, hub = cached_snapshot(model), True
        else:
            raise unknown_model(model)
        check_model_index(folder)
        try:
            with quiet_progress_bars():
                # The validated folder itself (for a hub id: its cached snapshot) is what loads.
                pipe = DiffusionPipeline.from_pretrained(
                    folder, use_safetensors=True, local_files_only=True, **dtype_kw
                )
        except OSError as exc:  # missing files: weights not cached, only .bin weights, ...
            if hub:
                raise not_cached(model, f"not completely: {first_line(exc)}") from None
            raise UnknownModelError(f"{folder}: cannot load the pipeline: {first_line(exc)}") from None
    if offload == "model":
        enable_offload(pipe, device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
