"""What a driver needs to know about a model without loading its weights: the tokenizer (to
validate prompts), the size factor (to validate height and width) and the sampling defaults a
story may leave out (size, steps, guidance), chosen the way the model's stock pipeline chooses them.

The answers come from the model's family (``models/registry.py``); this module finds the folder.

A Ray driver runs on the head node, often without a GPU; loading a whole SDXL pipeline there just
to tokenize prompts would cost minutes and gigabytes, so it reads the folder's configs instead
(:func:`load_model_info`). A job that already holds a loaded pipeline (``prepare_job(pipe=...)``)
gets the same :class:`ModelInfo` from it (:func:`model_info_from_pipeline`), so both paths resolve
the same defaults, fingerprints and ``config`` column.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from .family import ModelInfo, SamplingDefaults
from .loading import cached_snapshot, check_model_index, looks_like_hub_id
from .presets import PRESETS, UnknownModelError, preset_path

__all__ = ["ModelInfo", "SamplingDefaults", "load_model_info", "model_folder", "model_info_from_pipeline"]


def _info_files() -> list[str]:
    """The files any registered family reads from a folder (fetched from a hub id's snapshot)."""
    from .registry import families

    return sorted({pattern for family in families() for pattern in family.info_files})


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
        folder = cached_snapshot(model, allow_patterns=_info_files())
        check_model_index(folder)
        return folder
    raise UnknownModelError(
        f"unknown model or preset {model!r}: not a local folder, not a hub id, and not one of the presets: "
        + ", ".join(sorted(PRESETS))
    )


def load_model_info(model: str) -> ModelInfo:
    """Tokenizer, size factor, text length, sampling defaults and default layers of ``model``
    from its folder's files (no weights are read); the family is picked by the registry from the
    ``_class_name`` of ``model_index.json``."""
    from .registry import model_info

    return model_info(model)


def model_info_from_pipeline(pipe: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded pipeline: the same values :func:`load_model_info` reads
    from the folder it was loaded from."""
    from .registry import info_for_pipeline

    return info_for_pipeline(pipe)
