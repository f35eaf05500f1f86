"""The parts of an anchor bundle that only ConsiStory's two-pass form writes (``AnchorStep.outputs``
and ``AnchorStep.references``, ``core/consistory.py``), checked as strictly as the rest of the
format (``core/bundle_format.py``): from the header first, then the values.

Two optional ``__metadata__`` entries describe them:

- ``outputs``: step -> injection layer -> N; tensor ``{t}|{layer}|output`` is (A, N, C) in the
  anchor dtype, C the same for a layer at every step;
- ``references``: step -> names out of ``REFERENCE_NAMES``; tensor ``{t}|@dift`` is (A, C, h, w)
  in the anchor dtype and ``{t}|@subject_masks`` (A, N) boolean.
"""

from __future__ import annotations

from typing import Any

import torch

from .bundle_format import (
    _DTYPE_CODES,
    _SAFETENSORS_DTYPES,
    _STEP_KEY,
    MAX_LAYER_TOKENS,
    MAX_SIDE,
    BundleError,
    _Entry,
    _few,
    _is_int,
    _kind,
    _parse_json_object,
    _shape_text,
    _show,
)

REFERENCE_NAMES = ("dift", "subject_masks")


def _steps(layout: dict[str, Any], what: str, steps: int) -> dict[int, Any]:
    checked: dict[int, Any] = {}
    for key, value in layout.items():
        if not _STEP_KEY.fullmatch(key):
            raise BundleError(f"{what} key {_show(key)} is not a step number")
        if int(key) >= steps:
            raise BundleError(f"{what} step {key} is outside the bundle's {steps} steps (0..{steps - 1})")
        checked[int(key)] = value
    return checked


def check_injection_layouts(
    metadata: dict[str, str], steps: int
) -> tuple[dict[int, dict[str, int]], dict[int, list[str]]]:
    """The ``outputs`` and ``references`` layouts of ``__metadata__`` (empty when absent)."""
    outputs: dict[int, dict[str, int]] = {}
    if "outputs" in metadata:
        for t, layers in _steps(_parse_json_object(metadata["outputs"], "__metadata__ 'outputs'"), "outputs",
                                steps).items():
            if not isinstance(layers, dict):
                raise BundleError(f"outputs step {t} must map layer names to token counts, got a JSON {_kind(layers)}")
            for name, n in layers.items():
                if not name or not (_is_int(n) and 1 <= n <= MAX_LAYER_TOKENS):
                    raise BundleError(f"outputs step {t} layer {_show(name)}: token count {_show(n)} is not in "
                                      f"1..{MAX_LAYER_TOKENS}")
            outputs[t] = dict(layers)
    references: dict[int, list[str]] = {}
    if "references" in metadata:
        for t, names in _steps(_parse_json_object(metadata["references"], "__metadata__ 'references'"),
                               "references", steps).items():
            if not (isinstance(names, list) and all(n in REFERENCE_NAMES for n in names)):
                raise BundleError(f"references step {t} must list names out of {list(REFERENCE_NAMES)}, got {_show(names)}")
            references[t] = list(dict.fromkeys(names))
    return outputs, references


def check_injection_entries(
    entries: dict[str, _Entry],
    outputs: dict[int, dict[str, int]],
    references: dict[int, list[str]],
    num_anchors: int,
    anchor_dtype: str,
) -> set[str]:
    """The header entries of the two layouts (names, dtypes, shapes); returns their tensor names."""
    code = _DTYPE_CODES[anchor_dtype]
    expected = [f"{t}|{name}|output" for t, layers in outputs.items() for name in layers]
    expected += [f"{t}|@{name}" for t, names in references.items() for name in names]
    missing = [key for key in expected if key not in entries]
    if missing:
        raise BundleError(f"tensor(s) of the injection layouts missing: {_few(missing)}")
    # One injection resolution: every output and the subject masks have the same N.
    resolution: tuple[int, str] | None = None
    for t, layers in outputs.items():
        for name, n in layers.items():
            resolution = resolution or (n, f"step {t} output {_show(name)}")
            if n != resolution[0]:
                raise BundleError(f"step {t} output {_show(name)} has {n} tokens, {resolution[1]} has {resolution[0]}: "
                                  "one injection resolution per bundle")
    channels: dict[str, int] = {}
    for t, layers in outputs.items():
        for name, n in layers.items():
            entry, where = entries[f"{t}|{name}|output"], f"step {t} output {_show(name)}"
            _check_dtype(entry, code, anchor_dtype, where)
            if len(entry.shape) != 3 or entry.shape[:2] != (num_anchors, n) or entry.shape[2] < 1:
                raise BundleError(f"{where} has shape {_shape_text(entry.shape)}, expected ({num_anchors}, {n}, C)")
            if channels.setdefault(name, entry.shape[2]) != entry.shape[2]:
                raise BundleError(f"{where} has {entry.shape[2]} channels, {channels[name]} at another step")
    for t, names in references.items():
        for name in names:
            entry, where = entries[f"{t}|@{name}"], f"step {t} reference {name}"
            if name == "dift":
                _check_dtype(entry, code, anchor_dtype, where)
                ok = len(entry.shape) == 4 and entry.shape[0] == num_anchors and entry.shape[1] >= 1 and all(
                    1 <= d <= MAX_SIDE for d in entry.shape[2:])
                if not ok:
                    raise BundleError(f"{where} has shape {_shape_text(entry.shape)}, expected ({num_anchors}, C, h, w)")
            else:
                _check_dtype(entry, _DTYPE_CODES["bool"], "bool", where)
                n = resolution[0] if resolution else None
                ok = (len(entry.shape) == 2 and entry.shape[0] == num_anchors and 1 <= entry.shape[1] <= MAX_LAYER_TOKENS
                      and entry.shape[1] == (n or entry.shape[1]))
                if not ok:
                    raise BundleError(f"{where} has shape {_shape_text(entry.shape)}, expected ({num_anchors}, {n or 'N'})")
    return set(expected)


def _check_dtype(entry: _Entry, code: str, name: str, where: str) -> None:
    if entry.dtype != code:
        raise BundleError(f"{where} has dtype {_SAFETENSORS_DTYPES[entry.dtype][0]}, expected {name}")


def check_finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor`` if it holds no NaN or infinity (booleans always pass)."""
    if tensor.dtype != torch.bool:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise BundleError(f"{where} holds {int((~finite).sum())} non-finite value(s) (NaN or infinity)")
    return tensor
