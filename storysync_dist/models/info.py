"""What a driver needs to know about a model without loading its weights: the tokenizer (to
validate prompts), the size factor and the largest size (``ModelInfo.max_size``, 4096 px unless
the family says otherwise: to validate height and width) and the sampling defaults a
story may leave out (size, steps, guidance), chosen the way the model's stock pipeline chooses them.

The answers come from the model's family (``models/registry.py``, which also finds the folder).

A Ray driver runs on the head node, often without a GPU; loading a whole SDXL pipeline there just
to tokenize prompts would cost minutes and gigabytes, so it reads the folder's configs instead
(:func:`load_model_info`). A job that already holds a loaded pipeline (``prepare_job(pipe=...)``)
gets the same :class:`ModelInfo` from it (:func:`model_info_from_pipeline`), so both paths resolve
the same defaults, fingerprints and ``config`` column.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from .family import ModelInfo, SamplingDefaults, UnknownModelError
from .registry import info_for_pipeline, model_folder, model_info

__all__ = ["ModelInfo", "SamplingDefaults", "load_model_info", "model_folder", "model_info_from_pipeline"]


def load_model_info(model: str) -> ModelInfo:
    """Tokenizer, size factor, text length, sampling defaults and default layers of ``model``
    from its folder's files (no weights are read); the family is picked by the registry from the
    ``_class_name`` of ``model_index.json``."""
    return model_info(model)


def model_info_from_pipeline(pipe: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded pipeline: the same values :func:`load_model_info` reads
    from the folder it was loaded from."""
    return info_for_pipeline(pipe)


# The components whose attention layers StorySync installs processors on, by model_index role.
_DENOISER_ROLES = ("unet", "transformer")


def attention_processor_names(model: str, revision: str | None = None) -> tuple[str, ...]:
    """The keys of the denoiser's ``attn_processors`` (``"up_blocks.0.attentions.0.transformer_
    blocks.0.attn1.processor"``, ...): what ``share_layers`` and ``mask_layers`` prefixes select.

    The denoiser is built from its config on torch's meta device: no weights are read and nothing
    is allocated. ``revision`` only keys the cache (an edited folder is read again)."""
    return _processor_names(str(model_folder(model)), revision)


@functools.lru_cache(maxsize=16)
def _processor_names(folder: str, revision: str | None) -> tuple[str, ...]:
    for role in _DENOISER_ROLES:
        denoiser = meta_components(folder, revision).get(role)
        if denoiser is not None and hasattr(denoiser, "attn_processors"):
            return tuple(denoiser.attn_processors)
    raise UnknownModelError(f"{folder}: no UNet or transformer among the components of model_index.json")


@functools.lru_cache(maxsize=8)
def meta_components(folder: str, revision: str | None = None) -> dict[str, Any]:
    """Every torch component of the pipeline folder (``role -> module``), built from its config on
    torch's meta device: the structure (module names, shapes, parameter counts) without reading a
    weight or allocating anything. Tokenizers and schedulers are left out. ``revision`` only keys
    the cache (an edited folder is read again). Shared by the layer-name check, the memory
    estimate and the LoRA check; the modules are read, never changed."""
    import diffusers
    import torch
    import transformers

    root = pathlib.Path(folder)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    libraries = {"diffusers": diffusers, "transformers": transformers}
    modules: dict[str, Any] = {}
    for role, entry in index.items():
        if role.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] not in libraries:
            continue
        cls = getattr(libraries[entry[0]], str(entry[1]), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers
        # torch's meta device, not accelerate's init_empty_weights: tied weights stay tied (T5's
        # shared embedding counts once) and the switch is per thread.
        with torch.device("meta"):
            if entry[0] == "diffusers":
                modules[role] = cls.from_config(cls.load_config(root / role))
            else:
                modules[role] = cls(cls.config_class.from_pretrained(root / role))
    return modules


def attention_processor_names_of(pipe: Any) -> tuple[str, ...]:
    """:func:`attention_processor_names` of a loaded pipeline."""
    for role in _DENOISER_ROLES:
        denoiser = getattr(pipe, role, None)
        if denoiser is not None and hasattr(denoiser, "attn_processors"):
            return tuple(denoiser.attn_processors)
    raise UnknownModelError(f"{type(pipe).__name__}: no UNet or transformer to install processors on")
