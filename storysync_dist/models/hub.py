"""Local pipeline folders and Hugging Face hub ids, checked without running anything of theirs.

`looks_like_hub_id` tells a hub id ("org/name") from other model strings, `cached_snapshot` finds a hub
id's folder in the Hugging Face cache without touching the network, and `check_model_index` refuses a
folder whose ``model_index.json`` names code of its own. Used where a model string becomes a folder
(``registry.model_folder``) and where a folder becomes a pipeline (``loading.load_pipeline``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import types
from typing import Any

import diffusers
import transformers
from diffusers import DiffusionPipeline

from .family import UnknownModelError

__all__ = ["cached_snapshot", "check_model_index", "class_of", "first_line", "looks_like_hub_id", "not_cached"]


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


def class_of(module: types.ModuleType, name: str) -> type | None:
    """The class ``name`` of ``module`` (diffusers, transformers or a diffusers pipeline package), or
    None: nothing private, nothing that fails to import."""
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
    pipeline_class = class_of(diffusers, class_name) if isinstance(class_name, str) else None
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
        if not isinstance(component_class, str) or class_of(module, component_class) is None:
            raise UnknownModelError(f"{entry}: {library} has no class {_entry_text(component_class)}")
        if (root / name / f"{library}.py").exists():
            raise UnknownModelError(
                f"{entry}: the folder has {name}/{library}.py, which diffusers would load as custom code"
            )


def not_cached(model: str, detail: str = "") -> UnknownModelError:
    """The error for a hub id that is not (or not completely) in the Hugging Face cache."""
    more = f" ({detail})" if detail else ""
    return UnknownModelError(
        f"{model!r} is not in the Hugging Face cache{more}; models are never downloaded here: fetch it "
        f"first with `hf download {model}` (or `huggingface-cli download {model}`)"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
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
        raise UnknownModelError(f"{model!r} is not a valid Hugging Face hub id: {first_line(exc)}") from None
    except OSError:  # LocalEntryNotFoundError (also a FileNotFoundError), an unreadable cache
        raise not_cached(model) from None
