"""A story as a Parquet table: one row per frame, the rest of the story beside it.

The format a program writes a dataset-sized story in (pandas ``DataFrame.to_parquet``, pyarrow,
Ray Data). Columns: ``prompt`` (string, required), ``id`` (string) and ``seed`` (integer), the
fields of a frame in a YAML story; a null is a field left out. The story without its frames (id,
style, subjects, defaults, ...) is, in this order of preference:

- the JSON text under the key ``storysync.story`` of the file's key-value metadata
  (:func:`write_story_table` writes it there), or
- a sidecar file ``<name>.header.json``, ``.header.yaml`` or ``.header.yml`` beside
  ``<name>.parquet``.

This module reads the table and checks its columns; ``story.loading`` validates the story and
names a bad frame by its row (0-based, as pandas and pyarrow count, and the same as the frame's
``#index`` in the other errors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StorySpecError

__all__ = ["HEADER_KEY", "SIDECAR_SUFFIXES", "read_story_table", "sidecar_path", "write_story_table"]

HEADER_KEY = b"storysync.story"
SIDECAR_SUFFIXES = (".header.json", ".header.yaml", ".header.yml")


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


_COLUMNS = {"prompt": _is_text, "id": _is_text, "seed": pa.types.is_integer}
_KINDS = {"prompt": "string", "id": "string", "seed": "integer"}


def sidecar_path(source: str) -> str | None:
    """The first existing sidecar header of ``source`` (``story.parquet`` -> ``story.header.json``)."""
    stem = os.path.splitext(source)[0]
    for suffix in SIDECAR_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return None


def read_story_table(source: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The header stored in the file's metadata (``None`` when it has none) and the frames, one
    dict per row with the null fields left out. ``StorySpecError`` naming the file, and the column
    or row, for a file that is not Parquet, an unknown or mistyped column, or a null prompt."""
    try:
        table = pq.read_table(source)
    except FileNotFoundError:
        raise StorySpecError(f"{source}: story file not found") from None
    except IsADirectoryError:
        raise StorySpecError(f"{source}: is a directory, not a story file") from None
    except (pa.ArrowException, OSError) as exc:
        raise StorySpecError(f"{source}: not a readable Parquet file: {' '.join(str(exc).split())}") from None
    header = _header_of(table.schema.metadata or {}, source)
    names = table.column_names
    unknown = [name for name in names if name not in _COLUMNS]
    if unknown:
        raise StorySpecError(
            f"{source}: column {unknown[0]!r} is not a frame field; the columns are prompt, id (optional) "
            "and seed (optional)"
        )
    if "prompt" not in names:
        raise StorySpecError(f"{source}: no 'prompt' column; every row is a frame and needs one")
    columns: dict[str, list[Any]] = {}
    for name in names:
        column = table.column(name)
        if name == "seed" and pa.types.is_floating(column.type):
            column = _whole_seeds(column, source)
        elif not (_COLUMNS[name](column.type) or pa.types.is_null(column.type)):
            raise StorySpecError(f"{source}: column {name!r} is {column.type}; it must hold {_KINDS[name]}s")
        if name == "prompt" and column.null_count:
            row = _first_null(column)
            raise StorySpecError(f"{source}: row {row}: prompt is null; every frame needs a prompt")
        columns[name] = column.to_pylist()
    return header, _rows(columns)


def _rows(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    values = [columns[name] for name in names]
    if all(not any(v is None for v in column) for column in values):
        return [dict(zip(names, row)) for row in zip(*values)]
    return [{name: value for name, value in zip(names, row) if value is not None} for row in zip(*values)]


def _whole_seeds(column: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
    """A float seed column as pandas writes an integer column with missing values (NaN): taken
    when every value is a whole number, else the first row that is not is named."""
    whole = pc.equal(pc.floor(column), column)
    if pc.all(whole).as_py() is False:
        row = int(pc.index(whole, False).as_py())
        raise StorySpecError(f"{source}: row {row}: seed {column[row].as_py()!r} is not a whole number")
    inside = pc.and_(pc.greater_equal(column, 0.0), pc.less(column, float(2**63)))
    if pc.all(inside).as_py() is False:
        row = int(pc.index(inside, False).as_py())
        raise StorySpecError(f"{source}: row {row}: seed must be within [0, 2**63 - 1], got {column[row].as_py()!r}")
    return pc.cast(column, pa.int64())


def _first_null(column: pa.ChunkedArray) -> int:
    return int(pc.index(column.is_null(), True).as_py())


def _header_of(metadata: Mapping[bytes, bytes], source: str) -> dict[str, Any] | None:
    text = metadata.get(HEADER_KEY)
    if text is None:
        return None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorySpecError(f"{source}: metadata {HEADER_KEY.decode()}: invalid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise StorySpecError(
            f"{source}: metadata {HEADER_KEY.decode()}: must be a JSON object (the story without its frames)"
        )
    return header


def write_story_table(path: str, header: Mapping[str, Any], frames: Iterable[Mapping[str, Any]]) -> None:
    """Write a story as Parquet: ``header`` (the story without ``frames``) into the file's metadata,
    one row per frame (``prompt``, and ``id``/``seed`` where a frame has them)."""
    if "frames" in header:
        raise ValueError("the header is the story without its frames")
    rows = list(frames)
    columns: dict[str, pa.Array] = {"prompt": pa.array([row["prompt"] for row in rows], pa.string())}
    if any("id" in row for row in rows):
        columns["id"] = pa.array([row.get("id") for row in rows], pa.string())
    if any("seed" in row for row in rows):
        columns["seed"] = pa.array([row.get("seed") for row in rows], pa.int64())
    table = pa.table(columns).replace_schema_metadata({HEADER_KEY: json.dumps(dict(header)).encode()})
    pq.write_table(table, path)
