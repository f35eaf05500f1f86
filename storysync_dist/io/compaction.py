"""Compaction of one story's rows (``io.sink.ParquetFrameSink.commit_story``): which row of each
frame is kept, and the helpers that write the kept rows as parts.

Compaction (``commit_story``), per frame id over the story's committed and staged rows: frames in
``remove`` lose every row; if ``current`` gives the frame a fingerprint that some row has, exactly
one such row is kept (a committed one if there is one, so nothing is rewritten); otherwise the
newest row is kept (staged beats committed; of several committed rows one, by file name). Kept
staged rows, together with the surviving rows of committed parts that lose rows, are written as new
committed parts (each about ``target_part_bytes``), each committed atomically; only after ALL of
them are committed are the staged files and the parts that lost rows deleted (one batch ``fs.rm``,
one request on S3). Guarantees:

- compacting new frames is exact for every reader at every instant: staged rows are invisible, so a
  frame becomes visible exactly once, when its part is committed. A crash before that commit loses
  nothing (the frames stay staged; the next job commits them without rendering them again); a crash
  after it leaves staged duplicates, still invisible, which the next writing sink deletes the first
  time it lists the story (a staged row whose (frame_id, fingerprint) equals a committed row's);
- REWRITING a committed part (a frame rendered again after a story edit, a removed frame,
  ``--replace-config``) has a window between the new part's commit and the old part's deletion in
  which a reader that globs the files can see the surviving rows twice. A crash in that window
  leaves them until the story's next job, whose ``commit_story`` deletes the redundant part (of
  several committed rows of one frame it keeps one);
- a crash at any moment loses at most the frames in flight (not yet committed as staged files), and
  a rerun neither renders again nor duplicates what was written (staged rows count as stored).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .layout import _IndexRow

__all__ = ["choose_rows", "hand_back_memory", "shared_strings", "split_runs"]


def choose_rows(rows: dict[str, list[tuple[str, _IndexRow]]], files: dict[str, tuple[bool, float]],
                current: dict[str, str], remove: Collection[str]) -> tuple[set[tuple[str, str]], list[str]]:
    """The row kept of each frame (rules in the module docstring).

    ``rows``: frame id -> its (file path, index row) over the story's committed and staged files;
    ``files``: path -> (staged, order; higher is newer among staged files); ``current``: frame id ->
    its fingerprint now. Returns the kept (path, frame id) pairs and the frame ids of ``remove``
    that had rows.
    """
    def staged_of(path: str) -> bool:
        return files[path][0]

    # Of several committed rows of one frame (a crash in a rewrite), keep the one in the part
    # that keeps the most rows, so that the redundant part goes away without a rewrite.
    good_rows: dict[str, int] = {}
    for frame_id, found in rows.items():
        if frame_id in remove:
            continue
        wanted = current.get(frame_id)
        has_wanted = wanted is not None and any(row[2] == wanted for _, row in found)
        for path, row in found:
            if not staged_of(path) and (not has_wanted or row[2] == wanted):
                good_rows[path] = good_rows.get(path, 0) + 1
    keep: set[tuple[str, str]] = set()  # (path, frame_id)
    removed: list[str] = []
    for frame_id, found in rows.items():
        if frame_id in remove:
            removed.append(frame_id)
            continue
        wanted = current.get(frame_id)
        matching = [item for item in found if wanted is not None and item[1][2] == wanted]
        candidates = matching or found
        committed = sorted((item for item in candidates if not staged_of(item[0])),
                           key=lambda item: (-good_rows.get(item[0], 0), item[0]))
        staged = [item for item in candidates if staged_of(item[0])]
        if matching and committed:
            choice = committed[0]
        elif staged:
            choice = max(staged, key=lambda item: (files[item[0]][1], item[0]))
        else:
            choice = committed[0]
        keep.add((choice[0], frame_id))
    return keep, removed


def hand_back_memory() -> None:
    """A compaction holds up to a part's bytes at once: hand the freed memory back to the system
    (Arrow's pool, and glibc's heap where there is one), or the allocators keep it and a long job's
    driver looks as if it grew by a part at every compaction."""
    pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def shared_strings(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """``column.to_pylist()`` with one Python object per distinct value, shared by the rows that
    hold it."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[Any] = []
    shared: dict[Any, Any] = {}
    for chunk in chunks:
        encoded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
        values = [shared.setdefault(value, value) for value in encoded.dictionary.to_pylist()]
        out.extend(None if i is None else values[i] for i in encoded.indices.to_pylist())
    return out


def split_runs(sizes: list[float], target: int) -> list[tuple[int, int]]:
    """Cut rows of ``sizes`` bytes (in order) into ``ceil(total / target)`` runs of about equal bytes."""
    total = sum(sizes)
    count = max(1, math.ceil(total / target))
    bounds: list[tuple[int, int]] = []
    start, acc = 0, 0.0
    for i, size in enumerate(sizes):
        # A row goes to the run its midpoint falls in.
        run = min(count - 1, int((acc + size / 2) / total * count)) if total > 0 else 0
        if run > len(bounds) and i > start:
            bounds.append((start, i))
            start = i
        acc += size
    bounds.append((start, len(sizes)))
    return bounds
