"""Frames as a Parquet dataset on any fsspec filesystem (local path, ``file://``, ``memory://``, ``s3://``).

Layout under the output root::

    data/<story_id>/part-<first frame index:05d>-<16 hex>.parquet   committed parts (what readers see)
    data/<story_id>/.frame-<frame index:05d>-<16 hex>.staged        staged parts (invisible, see below)
    data/_storysync_layout.json  marker: no part of the old flat layout is left (see "Old datasets")
    quarantine/                  damaged part files, set aside (never read again)
    storyboards/<story_id>.png   the story's storyboard (more sheets: <story_id>-p002.png, ...)
    storyboard.png               the storyboard of a single-story dataset
    manifest.json                every story: its frames, which are done, devices, ...
    _locks/                      leases held by running jobs (storysync_dist.io.lease)

One row per frame (``FRAME_SCHEMA``); the ``image`` column is the ``{bytes, path}`` struct that
Hugging Face ``datasets`` reads as an Image column, and the schema carries the ``huggingface``
feature metadata, so ``datasets.load_dataset("parquet", data_files=dataset_files(root))`` (or
``data_files=".../data/**/*.parquet"``) decodes it. The story folder is a plain name, not a hive
``story_id=<id>`` partition: the files hold the ``story_id`` column, and with a hive folder
``pyarrow.parquet.read_table("<root>/data")`` infers the field as a dictionary that does not merge
with the files' strings, while a plain folder adds no column in any reader. So
``pq.read_table("<root>/data")``, ``pyarrow.dataset.dataset("<root>/data")``,
``ray.data.read_parquet("<root>/data")`` and ``open_dataset(root)`` (the ``pyarrow.dataset`` of the
committed parts, from the listing) all read the same rows. The
``fingerprint`` column is the frame's identity (``storysync_dist.engine.identity``): a rerun skips
a frame exactly when a row with its current fingerprint is stored. The per-file index a rerun reads
(``stored``) also carries the ``config`` column, so a job can tell, without reading any image,
whether the story's rows were rendered with other settings (``engine.plan``).

Staged parts. A write commits its frames as one *staged* file: a normal Parquet file whose name
starts with ``.`` and does not end in ``.parquet``, so no reader sees it (pyarrow dataset discovery
skips ``.``/``_`` names, ``datasets`` skips ``.`` names and non-``.parquet`` files, Ray filters by the
``.parquet`` extension). ``commit_story`` makes the story's staged frames visible, merged into parts
of about ``target_part_bytes``. Commit temporaries (``storage.commit``) are ``.<name>.<uuid>.tmp``:
invisible as well.

Write cost does not grow with the dataset: a sink lists one story folder once (the first time it
looks at the story: one LIST), then keeps its own index of what it wrote and deleted. A write never
lists and never touches committed parts; it commits one staged file and deletes older staged rows
of the same frames (invisible, so that is safe at any moment).

Atomicity of a file: built completely in memory, then committed in one step (``storage.commit``:
``os.replace`` of a hidden temporary locally, one PUT on an object store, a hidden temporary
renamed into place elsewhere). A crash never leaves a truncated file under a final name. Names come
from the frames' identities (the (frame_id, fingerprint) pairs), so the same frames written twice
land on the same name instead of appearing twice.

Compaction (``commit_story``): ``io.compaction`` (which row of a frame is kept, and the guarantees
for readers and crashes). Old datasets of the flat layout are moved into story folders:
``io.old_layout``. A file that cannot be read as a frame table is set aside: ``io.quarantine``.

Output paths are built only from validated ids (``storysync_dist.story.ID_PATTERN``), never from prompts.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .compaction import choose_rows, hand_back_memory, shared_strings, split_runs
from .layout import (  # the layout: names, records, listing, readers
    _PART,
    _STAGED,
    DATA_DIR,
    DEFAULT_TARGET_PART_BYTES,
    LAYOUT_MARKER,
    QUARANTINE_DIR,
    STORY_DIR_PREFIX,
    STORYBOARD_NAME,
    DamagedPartError,
    FrameRecord,
    StoredFrame,
    _check_record,
    _IndexRow,
    _normalize,
    _write_table,
    dataset_files,
    open_dataset,
    part_name,
    staged_name,
    story_dir,
)
from .schema import FRAME_SCHEMA, HF_FEATURES
from .storage import (
    MANIFEST_NAME,
    commit,
    create_exclusive,
    is_object_store,
    read_manifest,
    write_bytes,
    write_manifest,
)
from .story_files import StoryFiles, _File

log = logging.getLogger("storysync")

# Bytes of staged rows a sink keeps in memory for its next commit (the rest is read back).
ROW_CACHE_BYTES = 16 * 2**20

__all__ = [
    "DATA_DIR",
    "FRAME_SCHEMA",
    "HF_FEATURES",
    "LAYOUT_MARKER",
    "MANIFEST_NAME",
    "QUARANTINE_DIR",
    "STORYBOARD_NAME",
    "STORY_DIR_PREFIX",
    "DamagedPartError",
    "FrameRecord",
    "ParquetFrameSink",
    "StoredFrame",
    "create_exclusive",
    "dataset_files",
    "hand_back_memory",
    "is_object_store",
    "open_dataset",
    "part_name",
    "read_manifest",
    "staged_name",
    "story_dir",
    "write_bytes",
    "write_manifest",
]


class ParquetFrameSink(StoryFiles):
    """Writes frames as Parquet files under ``<root>/data/<story_id>/`` on any fsspec filesystem.

    ``write`` commits one staged (invisible) file per call and is an upsert by frame id among the
    staged rows; ``commit_story`` makes the staged frames visible as parts of about
    ``target_part_bytes`` (see the module docstring). ``add``/``flush`` buffer records and write a
    staged file every ``rows_per_part`` records (1: one file per frame, so a crash loses at most the
    frame in flight). What a story holds is read through ``io.story_files.StoryFiles``.
    """

    def __init__(
        self,
        root: str,
        *,
        rows_per_part: int = 1,
        storage_options: dict[str, Any] | None = None,
        read_only: bool = False,
        target_part_bytes: int = DEFAULT_TARGET_PART_BYTES,
    ) -> None:
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        if target_part_bytes < 1:
            raise ValueError(f"target_part_bytes must be >= 1, got {target_part_bytes}")
        super().__init__(root, storage_options=storage_options, read_only=read_only)
        self.rows_per_part = rows_per_part
        self.target_part_bytes = int(target_part_bytes)
        self._buffer: list[FrameRecord] = []
        self._order = itertools.count(1)

    # -- writing -----------------------------------------------------------------------------------

    def build_part(self, records: list[FrameRecord]) -> bytes:
        """Serialize records to Parquet bytes in memory (nothing touches the filesystem)."""
        return _write_table(self._table_of(records))

    @staticmethod
    def _table_of(records: list[FrameRecord]) -> pa.Table:
        return pa.Table.from_pylist([record.to_row() for record in records], schema=FRAME_SCHEMA)

    def _commit(self, path: str, data: bytes) -> None:
        """Commit one file (the hook the crash tests break)."""
        commit(self.fs, path, data)

    def write(self, records: list[FrameRecord]) -> str:
        """Write ``records`` (one story) as ONE staged file, atomically, and return its URL; then
        delete the story's older staged rows of those frames. Committed parts are not touched: the
        frames become visible with ``commit_story``.

        Raises ``ValueError`` for an empty list, mixed stories, invalid ids or a frame listed twice.
        """
        self._check_writable()
        records = list(records)
        if not records:
            raise ValueError("write() needs at least one record")
        for record in records:
            _check_record(record)
        story_id = records[0].story_id
        if any(record.story_id != story_id for record in records):
            raise ValueError(f"one part holds one story; got {sorted({r.story_id for r in records})}")
        frame_ids = [record.frame_id for record in records]
        if len(set(frame_ids)) != len(frame_ids):
            raise ValueError(f"story {story_id!r}: a frame id occurs twice in one write: {frame_ids}")
        files = self._files_of(story_id)
        table = self._table_of(records)
        data = _write_table(table)
        first_index = min(record.frame_index for record in records)
        name = staged_name(story_id, first_index, [(r.frame_id, r.fingerprint) for r in records])
        path = posixpath.join(self._data_dir, name)
        self._commit(path, data)
        self._write_marker_if_clean()
        self._forget(path)
        files[path] = _File(_STAGED, len(data), 1e18 + next(self._order))
        self._index_cache[path] = [(r.story_id, r.frame_id, r.fingerprint, r.config) for r in records]
        if self._row_cache_bytes + table.nbytes <= min(self.target_part_bytes, ROW_CACHE_BYTES):
            self._row_cache[path] = table
            self._row_cache_bytes += table.nbytes
        self._drop_staged_rows(story_id, set(frame_ids), keep=path)
        return self.url(path)

    def _drop_staged_rows(self, story_id: str, frame_ids: set[str], keep: str) -> None:
        """Remove the rows of ``frame_ids`` from the story's staged files other than ``keep``."""
        files = self._files_of(story_id)
        known = self._staged_ids.get(story_id)
        if known is not None and known.isdisjoint(frame_ids):
            known.update(frame_ids)  # now in ``keep``
            return
        delete: list[str] = []
        for path, file in list(files.items()):
            if path == keep or file.kind != _STAGED:
                continue
            rows = self._index_of(path)
            hit = [row for row in rows if row[1] in frame_ids]
            if not hit:
                continue
            if len(hit) < len(rows):
                # A staged file of several frames, some of them written again: stage the others anew.
                table = self._read_part(path)
                mask = pc.invert(pc.is_in(table["frame_id"], value_set=pa.array(sorted(frame_ids))))
                rest = _normalize(table.filter(mask))
                identities = [(f, fp or "") for f, fp in zip(rest["frame_id"].to_pylist(),
                                                             rest["fingerprint"].to_pylist())]
                new_path = posixpath.join(self._data_dir, staged_name(
                    story_id, min(rest["frame_index"].to_pylist()), identities))
                data = _write_table(rest)
                self._commit(new_path, data)
                files[new_path] = _File(_STAGED, len(data), file.order)
                self._index_cache[new_path] = [row for row in rows if row[1] not in frame_ids]
            delete.append(path)
        self._delete(story_id, delete)
        self._staged_ids[story_id] = {row[1] for path, file in files.items() if file.kind == _STAGED
                                      for row in self._index_of(path)}

    def commit_story(self, story_id: str, current: dict[str, str] | None = None,
                     remove: Collection[str] = ()) -> list[str]:
        """Make the story's staged frames visible as parts of about ``target_part_bytes``; drop the
        rows superseded by others (see the module docstring for the rules); delete the rows of the
        frames in ``remove``. Return the frame ids whose rows were removed because they are in
        ``remove``. A story with nothing staged and nothing to drop is left untouched."""
        self._check_writable()
        self._staged_ids.pop(story_id, None)  # what is staged now is committed: looked at anew
        current = current or {}
        remove = set(remove)
        files = self._files_of(story_id)
        self._load_index(sorted(files))
        rows: dict[str, list[tuple[str, _IndexRow]]] = {}
        for path in sorted(files):
            for row in self._index_of(path):
                if row[0] == story_id and path in files:
                    rows.setdefault(row[1], []).append((path, row))
        keep, removed = choose_rows(rows, {path: (f.kind == _STAGED, f.order) for path, f in files.items()},
                                    current, remove)
        # Files to rewrite or delete: staged files (all of them) and parts that lose rows.
        drop: list[str] = []
        carry: list[pa.Table] = []
        row_bytes: list[float] = []
        for path in sorted(files):
            file = files[path]
            index = [row for row in self._index_of(path)]
            kept = [row for row in index if (path, row[1]) in keep and row[0] == story_id]
            if file.kind == _PART and len(kept) == len(index):
                continue
            drop.append(path)
            if kept:
                table = _normalize(self._read_part(path))
                wanted_ids = pa.array(sorted({row[1] for row in kept}))
                table = table.filter(pc.and_(pc.is_in(table["frame_id"], value_set=wanted_ids),
                                             pc.equal(table["story_id"], story_id)))
                carry.append(table)
                per_row = (file.size or table.nbytes) / max(1, len(index))
                row_bytes.extend([per_row] * table.num_rows)
        if not drop:
            return sorted(removed)
        new_parts: list[str] = []
        if carry:
            merged = pa.concat_tables(carry)
            order = pc.sort_indices(merged, sort_keys=[("frame_index", "ascending"), ("frame_id", "ascending")])
            merged = merged.take(order)
            sizes = [row_bytes[i] for i in order.to_pylist()]
            for start, stop in split_runs(sizes, self.target_part_bytes):
                chunk = merged.slice(start, stop - start)
                ids = chunk["frame_id"].to_pylist()
                fps = chunk["fingerprint"].to_pylist()
                name = part_name(story_id, min(chunk["frame_index"].to_pylist()),
                                 [(f, fp or "") for f, fp in zip(ids, fps)])
                path = posixpath.join(self._data_dir, name)
                if path in files and files[path].kind == _PART and path not in drop:
                    continue  # already committed (the same frames, the same name)
                data = _write_table(chunk)
                self._commit(path, data)
                new_parts.append(path)
                files[path] = _File(_PART, len(data), 0.0)
                self._index_cache[path] = [(story_id, f, fp, c) for f, fp, c in
                                           zip(ids, fps, shared_strings(chunk["config"]))]
            self._write_marker_if_clean()
        self._delete(story_id, [path for path in drop if path not in new_parts])
        hand_back_memory()
        return sorted(removed)

    def add(self, record: FrameRecord) -> str | None:
        """Buffer one record; write a staged file (and return its URL) once ``rows_per_part`` are buffered."""
        self._buffer.append(record)
        if len(self._buffer) >= self.rows_per_part:
            return self.flush()
        return None

    def flush(self) -> str | None:
        """Write the buffered records, if any, as one staged file; return its URL or None."""
        if not self._buffer:
            return None
        records, self._buffer = self._buffer, []
        try:
            return self.write(records)
        except BaseException:
            # Keep the records so the caller can retry the flush.
            self._buffer = records + self._buffer
            raise
