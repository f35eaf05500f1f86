"""Which model family renders a pipeline: one lazy entry per family, as vLLM's model registry.

A new family is one module under ``models/`` with a :class:`~.family.ModelFamily` subclass, plus
one line in ``_FAMILIES``. Modules are imported only when a family is asked for, so checking a
story against SDXL never imports FLUX's code. Nothing outside ``models/`` names a family: callers
ask this module (``family_for_pipeline``, ``adapter_for``, ``model_info``).
"""

from __future__ import annotations

import importlib
import json
import pathlib
from functools import cache
from typing import Any

from .family import Adapter, ModelFamily, ModelInfo

__all__ = [
    "adapter_for",
    "families",
    "family_for_class",
    "family_for_model",
    "family_for_pipeline",
    "family_named",
    "info_for_pipeline",
    "model_info",
]

# family name -> (module, class). Order matters only for messages.
_FAMILIES: dict[str, tuple[str, str]] = {
    "unet": ("storysync_dist.models.unet", "UNetFamily"),
    "kandinsky3": ("storysync_dist.models.kandinsky3", "Kandinsky3Family"),
    "flux": ("storysync_dist.models.flux", "FluxFamily"),
}


@cache
def _load(name: str) -> ModelFamily:
    module, cls = _FAMILIES[name]
    return getattr(importlib.import_module(module), cls)()


def family_named(name: str) -> ModelFamily:
    """The family whose ``ModelFamily.name`` (``ModelInfo.family``) is ``name``."""
    return _load(name)


def families() -> list[ModelFamily]:
    """Every registered family (imports their modules)."""
    return [_load(name) for name in _FAMILIES]


def _supported() -> str:
    return ", ".join(c for family in families() for c in family.pipeline_classes)


def family_for_class(class_name: str) -> ModelFamily:
    """The family of a ``model_index.json`` ``_class_name``; ``UnknownModelError`` if none."""
    from .presets import UnknownModelError

    for family in families():
        if family.handles(class_name):
            return family
    raise UnknownModelError(f"{class_name} is not a supported pipeline (supported: {_supported()})")


def family_for_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline (by its class and base classes)."""
    from .presets import UnknownModelError

    names = [c.__name__ for c in type(pipe).__mro__]
    for family in families():
        if any(n in family.pipeline_classes for n in names):
            return family
    raise UnknownModelError(f"{type(pipe).__name__} is not a supported pipeline (supported: {_supported()})")


def adapter_for(pipe: Any) -> Adapter:
    """The adapter that renders StorySync with ``pipe``."""
    return family_for_pipeline(pipe).adapter(pipe)


def info_for_pipeline(pipe: Any) -> ModelInfo:
    """:class:`ModelInfo` of a loaded pipeline."""
    return family_for_pipeline(pipe).info_from_pipeline(pipe)


def _folder_and_index(model: str) -> tuple[pathlib.Path, dict[str, Any]]:
    from .info import model_folder
    from .presets import UnknownModelError

    folder = pathlib.Path(model_folder(model))
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"{model!r} is not a diffusers pipeline folder: {exc}") from None
    return folder, index


def family_for_model(model: str) -> ModelFamily:
    """The family of a preset, a local pipeline folder or a cached hub id, from the ``_class_name``
    of its ``model_index.json`` (a built-in preset's from its pipeline class: nothing is built);
    ``UnknownModelError`` (one line)."""
    from .presets import PRESETS

    if model in PRESETS and PRESETS[model].folder is None:
        return family_for_class(PRESETS[model].pipeline_class.__name__)
    _, index = _folder_and_index(model)
    return family_for_class(str(index.get("_class_name")))


def model_info(model: str) -> ModelInfo:
    """:class:`ModelInfo` of a preset, a local pipeline folder or a cached hub id, read from its
    ``model_index.json`` and configs without loading weights; ``UnknownModelError`` (one line)."""
    from .presets import UnknownModelError

    folder, index = _folder_and_index(model)
    family = family_for_class(str(index.get("_class_name")))
    try:
        return family.info_from_folder(pathlib.Path(folder), index)
    except UnknownModelError as exc:
        raise UnknownModelError(f"{model!r}: {exc}") from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UnknownModelError(f"{model!r} is not a {family.name} pipeline folder: {exc!r}") from None
