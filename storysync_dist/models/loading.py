"""The one entry point that turns a model name into a loaded pipeline, and the checks that keep it safe.

`load_pipeline` resolves a model string in order: an offline preset (see `presets`), an existing local
pipeline folder, an "org/name" hub id already in the Hugging Face cache. Nothing is downloaded and no
remote or custom code runs: `check_model_index` refuses a folder whose ``model_index.json`` names code of
its own, `cached_snapshot` finds a hub id's folder without touching the network, and only safetensors
weights are read.

This module imports `presets`, never the other way round (`presets` re-exports these names lazily, for
code that still imports them from there).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import types
from typing import Any

import diffusers
import diffusers.utils.deprecation_utils
import torch
import transformers
from diffusers import DiffusionPipeline

from storysync_dist.models.offload import enable_offload
from storysync_dist.models.presets import (
    _BUILD_LOCK,
    PRESETS,
    UnknownModelError,
    _quiet_progress_bars,
    _unknown,
    preset_path,
)

__all__ = [
    "UnknownModelError",
    "cached_snapshot",
    "check_model_index",
    "load_pipeline",
    "looks_like_hub_id",
]


# Recent diffusers (0.42 here) renamed from_pretrained's `torch_dtype` to `dtype` and warns on the old
# name; older releases (pyproject allows >= 0.30) only know `torch_dtype`.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


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
        with _BUILD_LOCK, _quiet_progress_bars():
            pipe = PRESETS[model].build_in_memory("cpu" if offload == "model" else device, dtype)
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
    if offload == "model":
        enable_offload(pipe, device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
