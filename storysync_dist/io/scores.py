"""Where ``storysync eval`` keeps its scores: two Parquet tables and a CSV, next to each other.

``<out>/per_frame.parquet`` holds a row per frame (CLIP-T; the oracle's ``oracle_adherent``,
``oracle_identity``, ``oracle_background``), ``<out>/per_story.parquet`` a row per story (every
metric, the mean over the story's frame pairs; the oracle's ``identity_consistency``,
``adherence``, ``background_leakage``), ``<out>/per_story.csv`` the same rows
for a spreadsheet, and ``<out>/summary.json`` the mean over stories, the weights each metric used
and whether the run was a plumbing check (random-tiny encoders). Every file is written whole and
atomically (``io.storage.write_bytes``), so a crash leaves the previous set or none. Each table
records ``plumbing_check`` in every row and in its schema metadata.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import resolve, write_bytes

__all__ = ["FRAME_SCORES", "STORY_SCORES", "read_scores", "write_scores"]

FRAME_SCORES = "per_frame.parquet"
STORY_SCORES = "per_story.parquet"
STORY_CSV = "per_story.csv"
SUMMARY = "summary.json"


def _parquet(rows: list[dict[str, Any]], columns: list[str], meta: dict[str, Any]) -> bytes:
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]) if rows else pa.table(
        {c: pa.array([], pa.string()) for c in columns})
    table = table.replace_schema_metadata({"storysync-eval": json.dumps(meta, sort_keys=True)})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_scores(
    out: str,
    frame_rows: list[dict[str, Any]],
    story_rows: list[dict[str, Any]],
    summary: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write the four files; return ``{"per_frame": url, "per_story": url, "csv": url, "summary": url}``.

    ``summary`` (JSON-able) goes to summary.json and into both tables' schema metadata. A table's
    columns are every key of its rows, in first-seen order (rows kept from an older run may lack
    a newer column: it is null there).
    """
    frame_columns = _columns(frame_rows) or ["story_id", "frame_id"]
    story_columns = _columns(story_rows) or ["story_id"]
    return {
        "per_frame": write_bytes(out, FRAME_SCORES, _parquet(frame_rows, frame_columns, summary), storage_options),
        "per_story": write_bytes(out, STORY_SCORES, _parquet(story_rows, story_columns, summary), storage_options),
        "csv": write_bytes(out, STORY_CSV, _csv(story_rows, story_columns), storage_options),
        "summary": write_bytes(out, SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode(), storage_options),
    }


def read_scores(
    out: str, storage_options: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The frame and story rows written earlier at ``out``, or None when there are none (or they
    cannot be read: they are then scored again, never trusted half-read)."""
    fs, root = resolve(out, storage_options)
    try:
        frames = pq.read_table(f"{root}/{FRAME_SCORES}", filesystem=fs).to_pylist()
        stories = pq.read_table(f"{root}/{STORY_SCORES}", filesystem=fs).to_pylist()
    except (OSError, pa.ArrowException):
        return None
    return frames, stories
