"""Which version of a model a frame was rendered with, as far as it can be told without weights.

- a preset: its name and ``PRESET_VERSION`` (presets are built from fixed configs and seeds);
  a trained preset (``toyworld``): a hash of its folder, weights included (they are small);
- a hub id in the Hugging Face cache: the snapshot's commit hash;
- a local folder: a hash of its ``model_index.json`` and component configs, and of the names and
  sizes of its weight files (reading gigabytes of weights per job would cost more than it tells).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib

from .hub import looks_like_hub_id
from .preset_build import PRESET_VERSION
from .registry import PRESETS, model_folder

__all__ = ["model_revision"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _folder_digest(folder: pathlib.Path, weights: bool = False) -> str:
    """A hash of the folder's configs and its weight files' names and sizes; of the weights' bytes
    too with ``weights`` (a small trained preset: retraining keeps every size)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json" or path.name.endswith(".txt"):
            digest.update(f"{rel}\0".encode())
            digest.update(path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES) and weights:
            digest.update(f"{rel}\0".encode())
            digest.update(path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
    return "sha256:" + digest.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def model_revision(model: str) -> str | None:
    """A short revision string for ``model``, or None when it cannot be told."""
    if model in PRESETS and PRESETS[model].folder is None:  # seeded weights: the preset's version
        return f"preset-v{PRESET_VERSION}"
    if model in PRESETS:  # a trained preset (toyworld): retrained weights must not reuse old frames
        folder = PRESETS[model].path()
        return _folder_digest(folder, weights=True) if folder.is_dir() else None
    local = pathlib.Path(os.path.expanduser(model))
    if local.is_dir():
        return _folder_digest(local)
    if looks_like_hub_id(model):
        try:
            folder = model_folder(model)
        except Exception:
            return None
        # The HF cache keeps each revision as snapshots/<commit hash>/.
        return folder.name if folder.parent.name == "snapshots" else _folder_digest(folder)
    return None
