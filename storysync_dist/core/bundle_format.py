"""The anchor bundle file format: a structural validator for safetensors bundles.

A bundle file comes from the user (``--anchors FILE``), so :meth:`AnchorBundle.from_bytes
<storysync_dist.core.anchors.AnchorBundle.from_bytes>` checks everything it reads with the functions
here, cheapest first (size, header, metadata schema, tensor shapes from the header, then the
tensors themselves), and reports any problem as one :class:`BundleError` line. The limits below
bound what a bundle may hold.

This module does not import :mod:`storysync_dist.core.anchors` (which imports it).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import StorySyncConfig
from .ids import ID_PATTERN, MAX_SEED, is_valid_id

if TYPE_CHECKING:
    from .layer_state import SharedLayerState


BUNDLE_FORMAT = "storysync-anchor-bundle/2"
# Formats written by older versions: refused with a hint to save the bundle again.
LEGACY_BUNDLE_FORMATS = ("storysync-anchor-bundle/1",)
# Largest bundle file from_bytes reads by default (the caller may pass another max_bytes).
DEFAULT_MAX_BUNDLE_BYTES = 64 * 2**30
# Largest safetensors JSON header accepted (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
# Most anchors one bundle may hold.
MAX_ANCHORS = 64
MAX_STEPS = 10_000
MAX_SIDE = 16_384
# Most tokens (patches) one shared layer may have.
MAX_LAYER_TOKENS = 2**20
ANCHOR_DTYPES = ("float16", "bfloat16", "float32")


class BundleError(ValueError):
    """An anchor bundle that cannot be used: the message is one line saying what is wrong and
    where, without the file name (callers prefix it, e.g. ``--anchors URL: ``)."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


# safetensors dtype code -> (torch name, bytes per element)
_SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}
_DTYPE_CODES = {name: code for code, (name, _) in _SAFETENSORS_DTYPES.items()}
_PARTS = ("index", "hidden", "features")
_STEP_KEY = re.compile(r"0|[1-9][0-9]{0,5}")
_FEW = 3


@dataclass(frozen=True)
class _Entry:
    """One tensor of the safetensors header: dtype code, shape and [begin, end) data offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _clip(text: str, limit: int = 200) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any, limit: int = 80) -> str:
    """A short one-line repr of a value read from the file."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return _clip(text, limit)


def _few(items: list[Any]) -> str:
    shown = ", ".join(str(i) if isinstance(i, int) else _show(i) for i in items[:_FEW])
    return shown if len(items) <= _FEW else f"{shown}, ... ({len(items)} in all)"


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    """A JSON integer: bools are not ints here."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{what} is not valid JSON: {_clip(str(exc), 120)}") from None


def _parse_json_object(text: str, what: str) -> dict[str, Any]:
    value = _parse_json(text, what)
    if not isinstance(value, dict):
        raise BundleError(f"{what} is a JSON {_kind(value)}, expected an object")
    return value


def _read_header(data: bytes, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset of the data that follows it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BundleError(f"expected the bundle's bytes, got {type(data).__name__}")
    size = len(data)
    if size > max_bytes:
        raise BundleError(f"file is {size} bytes, over the limit of {max_bytes} bytes")
    if size < 8:
        raise BundleError(f"not a safetensors file: only {size} bytes, shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > MAX_HEADER_BYTES:
        raise BundleError(
            f"not a safetensors file: header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + header_len > size:
        raise BundleError(
            f"truncated or not a safetensors file: header length {header_len} runs past the end "
            f"of the {size}-byte file"
        )
    try:
        text = bytes(data[8 : 8 + header_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError("not a safetensors file: its header is not UTF-8 text") from None
    header = _parse_json(text, "safetensors header")
    if not isinstance(header, dict):
        raise BundleError(f"not a safetensors file: its header is a JSON {_kind(header)}, expected an object")
    return header, 8 + header_len


def _read_metadata(header: dict[str, Any]) -> dict[str, str]:
    """``__metadata__``: strings, with our format and the ``meta`` and ``layout`` entries."""
    metadata = header.get("__metadata__")
    if metadata is None:
        raise BundleError("not a StorySync anchor bundle: the safetensors header has no __metadata__")
    if not isinstance(metadata, dict):
        raise BundleError(f"__metadata__ is a JSON {_kind(metadata)}, expected an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise BundleError(f"__metadata__ {_show(key)} is a JSON {_kind(value)}, expected a string")
    fmt = metadata.get("format")
    if fmt in LEGACY_BUNDLE_FORMATS:
        raise BundleError(
            f"made by an older version of storysync (format {fmt!r}, this version reads {BUNDLE_FORMAT!r}): "
            "save it again with --save-anchors"
        )
    if fmt != BUNDLE_FORMAT:
        found = "no format" if fmt is None else f"format {_show(fmt)}"
        raise BundleError(f"not a StorySync anchor bundle ({found}, expected {BUNDLE_FORMAT!r})")
    for key in ("meta", "layout"):
        if key not in metadata:
            raise BundleError(f"__metadata__ has no {key!r} entry")
    return metadata


def _read_entries(header: dict[str, Any], data_len: int) -> dict[str, _Entry]:
    """Every tensor entry of the header, each checked on its own against the ``data_len`` bytes."""
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {_show(name)}"
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: header entry is a JSON {_kind(entry)}, expected an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise BundleError(f"{where}: dtype is {_show(dtype)}, expected a string")
        if dtype not in _SAFETENSORS_DTYPES:
            raise BundleError(f"{where}: unsupported dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise BundleError(f"{where}: shape is {_show(shape)}, expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise BundleError(f"{where}: data_offsets is {_show(offsets)}, expected [begin, end] integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise BundleError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_len} bytes of tensor data"
            )
        need = math.prod(shape) * _SAFETENSORS_DTYPES[dtype][1]
        if end - begin != need:
            raise BundleError(
                f"{where}: holds {end - begin} bytes, its shape {_shape_text(tuple(shape))} and dtype "
                f"{_SAFETENSORS_DTYPES[dtype][0]} need {need}"
            )
        entries[name] = _Entry(dtype, tuple(shape), begin, end)
    # safetensors lays the tensors out back to back, covering the data exactly
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            relation = "overlap" if entry.begin < position else "leave a gap after"
            after = f"tensor {_show(previous)}" if previous is not None else "the start of the data"
            raise BundleError(
                f"tensor {_show(name)}: data_offsets [{entry.begin}, {entry.end}] {relation} {after}"
            )
        position, previous = entry.end, name
    if position != data_len:
        raise BundleError(f"{data_len - position} bytes of tensor data after the last tensor")
    return entries


def _get(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise BundleError(f"meta has no {key!r}")
    return meta[key]


def _check_int(value: Any, what: str, low: int, high: int) -> None:
    if not (_is_int(value) and low <= value <= high):
        raise BundleError(f"{what} must be an integer in {low}..{high}, got {_show(value)}")


def _check_list(value: Any, what: str, length: int) -> list[Any]:
    if not isinstance(value, list):
        raise BundleError(f"{what} must be a list, got a JSON {_kind(value)}")
    if len(value) != length:
        raise BundleError(f"{what} has {len(value)} entries, expected num_anchors={length}")
    return value


def _check_meta(meta: dict[str, Any]) -> StorySyncConfig:
    """Check the ``meta`` schema (version 2); return its config. Extra keys are allowed."""
    for key, nullable in (("model", False), ("model_revision", True), ("negative_prompt", True)):
        value = _get(meta, key)
        if not (isinstance(value, str) or (nullable and value is None)):
            expected = "a string or null" if nullable else "a string"
            raise BundleError(f"meta {key} must be {expected}, got a JSON {_kind(value)}")
    dtype = _get(meta, "dtype")
    if not (isinstance(dtype, str) and dtype in ANCHOR_DTYPES):
        raise BundleError(f"meta dtype must be one of {', '.join(ANCHOR_DTYPES)}, got {_show(dtype)}")
    _check_int(_get(meta, "steps"), "meta steps", 1, MAX_STEPS)
    for key in ("height", "width"):
        _check_int(_get(meta, key), f"meta {key}", 1, MAX_SIDE)
    guidance = _get(meta, "guidance_scale")
    if not (_is_finite_number(guidance) and guidance >= 0):
        raise BundleError(f"meta guidance_scale must be a finite number >= 0, got {_show(guidance)}")
    # --scheduler and --lora (absent from bundles made before they existed: neither was used).
    scheduler = meta.get("scheduler")
    if not (scheduler is None or isinstance(scheduler, str)):
        raise BundleError(f"meta scheduler must be a string or null, got a JSON {_kind(scheduler)}")
    loras = meta.get("loras")
    if loras is not None:
        if not isinstance(loras, list):
            raise BundleError(f"meta loras must be a list, got a JSON {_kind(loras)}")
        for i, lora in enumerate(loras):
            if not (isinstance(lora, list) and len(lora) == 3 and isinstance(lora[0], str)
                    and _is_finite_number(lora[1]) and isinstance(lora[2], str)
                    and re.fullmatch(r"[0-9a-f]{64}", lora[2])):
                raise BundleError(f"meta loras[{i}] must be [path, finite scale, sha256 hex], got {_show(lora)}")
    # FreeU's (s1, s2, b1, b2) of a method's own sampler (absent from bundles made before it: none).
    freeu = meta.get("freeu")
    if freeu is not None and not (isinstance(freeu, list) and len(freeu) == 4 and all(map(_is_finite_number, freeu))):
        raise BundleError(f"meta freeu must be null or 4 finite numbers [s1, s2, b1, b2], got {_show(freeu)}")
    raw_config = _get(meta, "config")
    if not isinstance(raw_config, dict):
        raise BundleError(f"meta config must be an object, got a JSON {_kind(raw_config)}")
    try:
        config = StorySyncConfig.from_dict(raw_config)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"meta config is not a StorySync config: {_clip(str(exc), 160)}") from None

    num_anchors = _get(meta, "num_anchors")
    _check_int(num_anchors, "meta num_anchors", 1, MAX_ANCHORS)
    ids = _check_list(_get(meta, "anchor_ids"), "meta anchor_ids", num_anchors)
    for i, anchor_id in enumerate(ids):
        if not is_valid_id(anchor_id):
            raise BundleError(f"meta anchor_ids[{i}] must be a frame id matching {ID_PATTERN}, got {_show(anchor_id)}")
    if len(set(ids)) != len(ids):
        duplicate = next(a for i, a in enumerate(ids) if a in ids[:i])
        raise BundleError(f"meta anchor_ids lists {duplicate!r} twice")
    for i, prompt in enumerate(_check_list(_get(meta, "anchor_prompts"), "meta anchor_prompts", num_anchors)):
        if not isinstance(prompt, str):
            raise BundleError(f"meta anchor_prompts[{i}] must be a string, got a JSON {_kind(prompt)}")
    for i, seed in enumerate(_check_list(_get(meta, "anchor_seeds"), "meta anchor_seeds", num_anchors)):
        _check_int(seed, f"meta anchor_seeds[{i}]", 0, MAX_SEED)
    positions = _check_list(_get(meta, "anchor_token_positions"), "meta anchor_token_positions", num_anchors)
    for i, subjects in enumerate(positions):
        what = f"meta anchor_token_positions[{i}]"
        if not isinstance(subjects, list):
            raise BundleError(f"{what} must be a list (one per subject), got a JSON {_kind(subjects)}")
        for j, tokens in enumerate(subjects):
            if not isinstance(tokens, list) or not all(_is_int(p) and p >= 0 for p in tokens):
                raise BundleError(
                    f"{what}[{j}] must be a list of non-negative integer token positions, got {_show(tokens)}"
                )
    return config


def _check_layout(layout: dict[str, Any], steps: int) -> dict[int, dict[str, int]]:
    """``layout``: step number -> layer name -> num_tokens, steps within [0, ``steps``)."""
    checked: dict[int, dict[str, int]] = {}
    for key, layers in layout.items():
        if not _STEP_KEY.fullmatch(key):
            raise BundleError(f"layout key {_show(key)} is not a step number")
        t = int(key)
        if t >= steps:
            raise BundleError(f"layout step {t} is outside the bundle's {steps} steps (0..{steps - 1})")
        if not isinstance(layers, dict):
            raise BundleError(f"layout step {t} must map layer names to token counts, got a JSON {_kind(layers)}")
        for name, num_tokens in layers.items():
            if not name:
                raise BundleError(f"layout step {t} has a layer with an empty name")
            if not (_is_int(num_tokens) and 1 <= num_tokens <= MAX_LAYER_TOKENS):
                raise BundleError(
                    f"layout step {t} layer {_show(name)}: num_tokens must be an integer in "
                    f"1..{MAX_LAYER_TOKENS}, got {_show(num_tokens)}"
                )
        checked[t] = dict(layers)
    return checked


def _check_entries(
    entries: dict[str, _Entry], layout: dict[int, dict[str, int]], num_anchors: int, anchor_dtype: str
) -> None:
    """Tensor names, dtypes and shapes from the header against the layout, before any is loaded.

    Per (t, name): index (M,) int64 with M <= num_anchors * num_tokens; hidden (G, M, C) and
    features (G, M, C_inner) in ``anchor_dtype``, G in {1, 2} bundle-wide, C and C_inner per layer.
    """
    expected = [f"{t}|{name}|{part}" for t, layers in layout.items() for name in layers for part in _PARTS]
    expected_set = set(expected)
    missing = [key for key in expected if key not in entries]
    if missing:
        raise BundleError(f"tensor(s) of the layout missing: {_few(missing)}")
    extra = [key for key in entries if key not in expected_set]
    if extra:
        raise BundleError(f"tensor(s) not in the layout: {_few(extra)}")
    code = _DTYPE_CODES[anchor_dtype]
    branches: tuple[int, str] | None = None  # (G, where it was first seen)
    channels: dict[str, tuple[int, int, int]] = {}  # layer -> (first step, C, C_inner)
    for t, layers in layout.items():
        for name, num_tokens in layers.items():
            where = f"step {t} layer {_show(name)}"
            index = entries[f"{t}|{name}|index"]
            if index.dtype != "I64":
                raise BundleError(f"{where}: index has dtype {_SAFETENSORS_DTYPES[index.dtype][0]}, expected int64")
            if len(index.shape) != 1:
                raise BundleError(f"{where}: index has shape {_shape_text(index.shape)}, expected (M,)")
            m = index.shape[0]
            if m > num_anchors * num_tokens:
                raise BundleError(
                    f"{where}: index has {m} entries, more than the {num_anchors * num_tokens} tokens of "
                    f"{num_anchors} anchor(s) x {num_tokens}"
                )
            sizes = []
            for part in ("hidden", "features"):
                entry = entries[f"{t}|{name}|{part}"]
                if entry.dtype != code:
                    raise BundleError(
                        f"{where}: {part} has dtype {_SAFETENSORS_DTYPES[entry.dtype][0]}, expected {anchor_dtype}"
                    )
                if len(entry.shape) != 3:
                    raise BundleError(f"{where}: {part} has shape {_shape_text(entry.shape)}, expected (G, M, C)")
                g, tokens, size = entry.shape
                if g not in (1, 2):
                    raise BundleError(f"{where}: {part} has {g} guidance branches, expected 1 or 2")
                if branches is None:
                    branches = (g, where)
                elif g != branches[0]:
                    raise BundleError(
                        f"{where}: {part} has {g} guidance branch(es), {branches[1]} has {branches[0]}"
                    )
                if tokens != m:
                    raise BundleError(
                        f"{where}: {part} has shape {_shape_text(entry.shape)}: {tokens} tokens, index has {m}"
                    )
                if size < 1:
                    raise BundleError(f"{where}: {part} has shape {_shape_text(entry.shape)}: no channels")
                sizes.append(size)
            first = channels.setdefault(name, (t, sizes[0], sizes[1]))
            if (first[1], first[2]) != (sizes[0], sizes[1]):
                raise BundleError(
                    f"{where}: hidden/features have {sizes[0]}/{sizes[1]} channels, "
                    f"{first[1]}/{first[2]} at step {first[0]}"
                )


def _check_values(layer: SharedLayerState, where: str, num_anchors: int) -> None:
    """The loaded tensors: index strictly increasing within [0, A * N); hidden and features finite."""
    index = layer.index
    limit = num_anchors * layer.num_tokens
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= limit:
            raise BundleError(
                f"{where}: index value {low if low < 0 else high} is outside [0, {limit}) "
                f"({num_anchors} anchor(s) x {layer.num_tokens} tokens)"
            )
        bad = (index[1:] <= index[:-1]).nonzero()
        if bad.numel():
            raise BundleError(f"{where}: index is not strictly increasing at position {int(bad[0, 0]) + 1}")
    for part in ("hidden", "features"):
        finite = torch.isfinite(getattr(layer, part))
        if not bool(finite.all()):
            count = int((~finite).sum())
            raise BundleError(f"{where}: {part} holds {count} non-finite value(s) (NaN or infinity)")
