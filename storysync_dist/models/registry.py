"""Which model family renders a pipeline: one lazy entry per family, as vLLM's model registry.

A new family is one module under ``models/`` with a :class:`~.family.ModelFamily` subclass, plus
one line in ``_FAMILIES``. Modules are imported only when a family is asked for, so checking a
story against SDXL never imports FLUX's code. Nothing outside ``models/`` names a family: callers
ask this module (``family_for_pipeline``, ``family_for_model``, ``adapter_for``, ``model_info``).

What the families register besides themselves is looked up here too: their presets (``PRESETS``,
built into the cache by ``preset_path``), and the folder a model string names (``model_folder``: a
preset, a local pipeline folder or a cached hub id), from which a family is picked.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

from .family import Adapter, ModelFamily, ModelInfo, UnknownModelError
from .hub import cached_snapshot, check_model_index, looks_like_hub_id
from .preset_build import BUILD_LOCK, Preset, build_into

__all__ = [
    "PRESETS",
    "adapter_for",
    "families",
    "family_for_class",
    "family_for_model",
    "family_for_pipeline",
    "family_named",
    "info_for_pipeline",
    "model_folder",
    "model_info",
    "preset_path",
    "unknown_model",
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
    for family in families():
        if family.handles(class_name):
            return family
    raise UnknownModelError(f"{class_name} is not a supported pipeline (supported: {_supported()})")


def family_for_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline (by its class and base classes)."""
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


# ---- what the families register: their presets -------------------------------------------------
class _PresetTable(Mapping[str, Preset]):
    """Every family's presets (``ModelFamily.presets``), gathered on first use."""

    def __init__(self) -> None:
        self._table: dict[str, Preset] | None = None

    def _all(self) -> dict[str, Preset]:
        if self._table is None:
            table: dict[str, Preset] = {}
            for family in families():
                table.update(family.presets())
            self._table = table
        return self._table

    def __getitem__(self, name: str) -> Preset:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


PRESETS: Mapping[str, Preset] = _PresetTable()


def unknown_model(model: str) -> UnknownModelError:
    """The error for a model string that is neither a preset, a local folder, nor a hub id."""
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
    try:
        preset = PRESETS[name]
    except KeyError:
        raise unknown_model(name) from None
    target = preset.path()
    if (target / "model_index.json").is_file():
        return target
    if preset.folder is not None:  # trained weights cannot be built: say where they come from
        raise UnknownModelError(
            f"preset {name!r}: no trained pipeline at {target} (model_index.json missing); its weights are "
            f"made by train/train_toyworld.py --export (docs/quality.md)")
    # Threads share torch's global RNG, so two concurrent in-process builds would interleave their
    # seeding; processes are kept apart by the atomic rename below instead.
    with BUILD_LOCK:
        if not (target / "model_index.json").is_file():
            build_into(preset, target)
    return target


# ---- a model string: its folder, its family, its ModelInfo ---------------------------------------
def _info_files() -> list[str]:
    """The files any registered family reads from a folder (fetched from a hub id's snapshot)."""
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
    raise unknown_model(model)


def _folder_and_index(model: str) -> tuple[pathlib.Path, dict[str, Any]]:
    folder = model_folder(model)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"{model!r} is not a diffusers pipeline folder: {exc}") from None
    return folder, index


def family_for_model(model: str) -> ModelFamily:
    """The family of a preset, a local pipeline folder or a cached hub id, from the ``_class_name``
    of its ``model_index.json`` (a built-in preset's from its pipeline class: nothing is built);
    ``UnknownModelError`` (one line)."""
    if model in PRESETS and PRESETS[model].folder is None:
        return family_for_class(PRESETS[model].pipeline_class.__name__)
    _, index = _folder_and_index(model)
    return family_for_class(str(index.get("_class_name")))


def model_info(model: str) -> ModelInfo:
    """:class:`ModelInfo` of a preset, a local pipeline folder or a cached hub id, read from its
    ``model_index.json`` and configs without loading weights; ``UnknownModelError`` (one line)."""
    folder, index = _folder_and_index(model)
    family = family_for_class(str(index.get("_class_name")))
    try:
        return family.info_from_folder(folder, index)
    except UnknownModelError as exc:
        raise UnknownModelError(f"{model!r}: {exc}") from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UnknownModelError(f"{model!r} is not a {family.name} pipeline folder: {exc!r}") from None
