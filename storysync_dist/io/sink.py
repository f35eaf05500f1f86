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

Old datasets (the flat ``data/part-<story_id>-<index>-<hash>.parquet`` layout): the first time a
writing sink lists a story, it MOVES that story's flat parts into the story's folder (``fs.mv``:
a rename locally, atomic; a copy then a delete on an object store, where a globbing reader can see
a moved part twice for that moment). Read-only sinks and readers read flat parts where they are.
To find flat parts a sink lists ``data/`` once, unless the layout marker says none is left; a
writing sink writes the marker when its listing of ``data/`` found no flat part of any story.

A file that cannot be read as a frame table (committed or staged) is moved to
``<root>/quarantine/`` (unless the sink is ``read_only``) and reported in ``damaged``; its frames then
count as missing.

Output paths are built only from validated ids (``storysync_dist.spec.ID_PATTERN``), never from prompts.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import math
import posixpath
import sys
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import (  # the layout: names, records, listing, readers
    _FLAT_RE,
    _INDEX_COLUMNS,
    _PART,
    _PART_RE,
    _STAGED,
    _STAGED_RE,
    _STORY_DIR_RE,
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
    _committed_paths,
    _IndexRow,
    _list_folder,
    _mtime,
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
    is_local,
    is_object_store,
    read_manifest,
    resolve,
    write_bytes,
    write_manifest,
)

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

@dataclass
class _File:
    """One file of a story as this sink knows it."""

    kind: str  # _PART or _STAGED
    size: int
    order: float  # staged files: higher is newer (mtime when listed; a counter for our own writes)


class ParquetFrameSink:
    """Writes frames as Parquet files under ``<root>/data/<story_id>/`` on any fsspec filesystem.

    ``write`` commits one staged (invisible) file per call and is an upsert by frame id among the
    staged rows; ``commit_story`` makes the staged frames visible as parts of about
    ``target_part_bytes`` (see the module docstring). ``add``/``flush`` buffer records and write a
    staged file every ``rows_per_part`` records (1: one file per frame, so a crash loses at most the
    frame in flight).

    The sink learns what a story holds once (one listing of the story's folder) and then keeps its
    own index of what it writes and removes; it assumes nobody else writes the same story meanwhile,
    which the job's story lease (``storysync_dist.io.lease``) guarantees.

    A file that cannot be read as a frame table is moved to ``<root>/quarantine/`` (unless the
    sink is ``read_only``) and reported in ``damaged``; its frames then count as missing.
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
        self.root = str(root)
        self.rows_per_part = rows_per_part
        self.target_part_bytes = int(target_part_bytes)
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self.fs, self._fs_root = resolve(self.root, self.storage_options)
        self._data_dir = posixpath.join(self._fs_root, DATA_DIR)
        self._buffer: list[FrameRecord] = []
        # Files are immutable (committed once, only ever deleted), so their index rows are cached:
        # a file is read once per sink, not once per write.
        self._index_cache: dict[str, list[_IndexRow]] = {}
        # story id -> its files (committed and staged), once listed (kept up to date by this sink).
        self._story_files: dict[str, dict[str, _File]] = {}
        # Rows this sink wrote as staged files, kept (up to ROW_CACHE_BYTES) so that commit_story
        # need not read them back. Small: a cache the size of a part made the driver of a long
        # story grow by a part's bytes (issue 20: +128 MiB over a 10^4-frame render).
        self._row_cache: dict[str, pa.Table] = {}
        self._row_cache_bytes = 0
        # story id -> every frame id that may be in one of its staged files (a superset): a write
        # of frames not in it has no older staged row to drop, and skips the look through every
        # staged file (which made a long story's writes quadratic between commits).
        self._staged_ids: dict[str, set[str]] = {}
        # story id -> flat parts of the old layout; None until data/ was looked at.
        self._flat: dict[str, list[str]] | None = None
        self._marker_present = False
        self._order = itertools.count(1)
        self.damaged: list[str] = []

    # -- paths -------------------------------------------------------------------------------------

    def url(self, fs_path: str) -> str:
        """The user-facing form of a filesystem path: absolute path locally, ``proto://...`` otherwise."""
        return fs_path if is_local(self.fs) else self.fs.unstrip_protocol(fs_path)

    def _story_path(self, story_id: str) -> str:
        return posixpath.join(self._data_dir, story_dir(story_id))

    def part_paths(self, story_id: str | None = None) -> list[str]:
        """Filesystem paths of the committed part files (of one story, or all), sorted by name.

        Always lists afresh (other processes may have written since): one story is one listing of
        its folder (plus its flat parts of the old layout, if any); ``None`` lists ``data/`` recursively.
        """
        if story_id is None:
            return _committed_paths(self.fs, self._data_dir, None)
        return sorted([*_committed_paths(self.fs, self._data_dir, story_id), *self._flat_parts(story_id)])

    def _flat_parts(self, story_id: str) -> list[str]:
        """Flat parts of the old layout of ``story_id`` (one listing of ``data/`` per sink, none once
        the layout marker is there)."""
        if self._flat is None:
            self._flat = {}
            marker = posixpath.join(self._data_dir, LAYOUT_MARKER)
            try:
                self._marker_present = bool(self.fs.exists(marker))
            except OSError:
                self._marker_present = False
            if not self._marker_present:
                with contextlib.suppress(Exception):
                    self.fs.invalidate_cache(self._data_dir)
                try:
                    entries = self.fs.ls(self._data_dir, detail=False)
                except (FileNotFoundError, NotADirectoryError):
                    entries = []
                for entry in entries:
                    match = _FLAT_RE.match(posixpath.basename(entry))
                    if match:
                        self._flat.setdefault(match["story"], []).append(entry)
        return list(self._flat.get(story_id, []))

    def _write_marker_if_clean(self) -> None:
        """Once a writing sink saw no flat part of any story left, record that (saves the next
        sinks the listing of ``data/``)."""
        if self.read_only or self._marker_present or self._flat is None or any(self._flat.values()):
            return
        data = (json.dumps({"layout": "data/<story_id>/part-*.parquet", "version": 3}) + "\n").encode()
        commit(self.fs, posixpath.join(self._data_dir, LAYOUT_MARKER), data)
        self._marker_present = True

    def _migrate_flat(self, story_id: str) -> None:
        """Move the story's flat parts of the old layout into its folder (same index and hash)."""
        flat = self._flat_parts(story_id)
        if not flat:
            return
        folder = self._story_path(story_id)
        self.fs.makedirs(folder, exist_ok=True)
        for path in flat:
            match = _FLAT_RE.match(posixpath.basename(path))
            assert match is not None
            digest = (match["hash"] * 2)[:16] if len(match["hash"]) < 16 else match["hash"][:16]
            target = posixpath.join(folder, f"part-{match['index']}-{digest}.parquet")
            try:
                self.fs.mv(path, target)
            except FileNotFoundError:
                pass
            log.info("moved %s to %s (story folders layout)", self.url(path), self.url(target))
        assert self._flat is not None
        self._flat.pop(story_id, None)

    def _files_of(self, story_id: str) -> dict[str, _File]:
        files = self._story_files.get(story_id)
        if files is not None:
            return files
        if not self.read_only:
            self._migrate_flat(story_id)
        entries = _list_folder(self.fs, self._data_dir, story_dir(story_id))
        files = {}
        for entry in entries:
            name = posixpath.basename(entry["name"])
            if _PART_RE.match(name):
                files[entry["name"]] = _File(_PART, int(entry.get("size") or 0), 0.0)
            elif _STAGED_RE.match(name):
                files[entry["name"]] = _File(_STAGED, int(entry.get("size") or 0), _mtime(entry))
        if self.read_only:
            for path in self._flat_parts(story_id):
                files[path] = _File(_PART, 0, 0.0)
        self._story_files[story_id] = files
        if not self.read_only and any(f.kind == _STAGED for f in files.values()):
            self._drop_committed_staged(story_id)
        return files

    def _drop_committed_staged(self, story_id: str) -> None:
        """Delete staged files whose every row is already committed (left by a crash between a
        compaction's commit and its deletion of the staged files); they are invisible either way."""
        files = self._story_files[story_id]
        paths = sorted(files)
        self._load_index(paths)
        for path in paths:
            self._index_of(path)  # sets damaged files aside
        committed = {(f, fp) for p, file in list(files.items()) if file.kind == _PART
                     for _, f, fp, _ in self._index_of(p)}
        if not committed:
            return
        done = [p for p, file in list(files.items()) if file.kind == _STAGED and p in self._index_cache
                and all((f, fp) in committed for _, f, fp, _ in self._index_of(p))]
        self._delete(story_id, done)

    def refresh(self, story_id: str | None = None) -> None:
        """Forget what was listed, so the next look at the dataset lists it again."""
        if story_id is None:
            self._story_files.clear()
            self._staged_ids.clear()
            self._flat = None
        else:
            self._story_files.pop(story_id, None)
            self._staged_ids.pop(story_id, None)

    # -- reading -----------------------------------------------------------------------------------

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        cached = self._row_cache.get(path)
        if cached is not None:
            return cached.select(columns) if columns is not None else cached
        if is_local(self.fs):
            # Arrow's own reader: its buffers come from Arrow's pool, which a compaction hands back
            # (``hand_back_memory``); Python file reads left a long job's driver holding them.
            return pq.read_table(path, columns=columns)
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def _load_index(self, paths: list[str]) -> None:
        missing = [path for path in paths if path not in self._index_cache]
        if len(missing) > 1 and not is_local(self.fs):
            # Remote reads are latency-bound: fetch the small footers/columns concurrently.
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                list(pool.map(self._index_of, missing))

    def _index_of(self, path: str) -> list[_IndexRow]:
        """(story_id, frame_id, fingerprint, config) of every row of a file; a damaged file is set aside."""
        cached = self._index_cache.get(path)
        if cached is not None:
            return cached
        try:
            with self.fs.open(path, "rb") as handle:
                # The story id and config columns read as dictionaries: one value per distinct
                # string, never a copy per row (10^5 rows of config JSON: about 70 MB otherwise).
                parquet = pq.ParquetFile(handle, read_dictionary=["story_id", "config"])
                names = parquet.schema_arrow.names
                missing = [name for name in ("story_id", "frame_id") if name not in names]
                if missing:
                    raise DamagedPartError(f"has no {', '.join(missing)} column")
                columns = [name for name in _INDEX_COLUMNS if name in names]
                table = parquet.read(columns=columns)
        except FileNotFoundError:
            # Removed since it was listed: it holds nothing now.
            self._forget(path)
            return []
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, DamagedPartError) as exc:
            self._set_aside(path, exc)
            return []
        stories = _shared_strings(table.column("story_id"))
        frames = table.column("frame_id").to_pylist()
        # Rows written before fingerprints existed have none: they never match, so they are redone.
        fingerprints = (
            table.column("fingerprint").to_pylist() if "fingerprint" in table.column_names else [None] * len(frames)
        )
        # The story id and the config JSON (hundreds of bytes) are the same on most rows: one string
        # object each, not one per row (10^6 stored frames: about 0.7 GB less on the driver).
        configs = _shared_strings(table.column("config")) if "config" in table.column_names else [None] * len(frames)
        cached = list(zip(stories, frames, fingerprints, configs))
        self._index_cache[path] = cached
        return cached

    def _set_aside(self, path: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if self.read_only:
            self.damaged.append(f"{self.url(path)} ({reason})")
            log.warning("damaged part file %s: %s", self.url(path), reason)
            self._index_cache[path] = []  # reported once; a writing sink sets it aside
            return
        folder = posixpath.basename(posixpath.dirname(path))
        name = posixpath.basename(path)
        if _STORY_DIR_RE.match(folder):
            target = posixpath.join(self._fs_root, QUARANTINE_DIR, folder, name)
        else:
            target = posixpath.join(self._fs_root, QUARANTINE_DIR, name)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.mv(path, target)
        self.damaged.append(f"{self.url(path)} -> {self.url(target)} ({reason})")
        log.warning("damaged part file %s set aside as %s: %s", self.url(path), self.url(target), reason)
        self._forget(path)

    def _forget(self, path: str) -> None:
        self._index_cache.pop(path, None)
        table = self._row_cache.pop(path, None)
        if table is not None:
            self._row_cache_bytes -= table.nbytes
        folder = _STORY_DIR_RE.match(posixpath.basename(posixpath.dirname(path)))
        flat = _FLAT_RE.match(posixpath.basename(path))
        story = folder["story"] if folder else (flat["story"] if flat else None)
        if story is not None:
            self._story_files.get(story, {}).pop(path, None)
        else:
            for files in self._story_files.values():
                files.pop(path, None)

    def stored(self, story_id: str) -> list[StoredFrame]:
        """Every stored row of ``story_id``, committed and staged: frame id, fingerprint (None if it
        has none), file, config JSON, staged.

        Reads only the index columns, each file once per sink; remote files are read concurrently.
        """
        files = self._files_of(story_id)
        paths = sorted(files)
        self._load_index(paths)
        found: list[StoredFrame] = []
        for path in paths:
            for row_story, frame_id, fingerprint, config in self._index_of(path):
                file = files.get(path)
                if row_story == story_id and file is not None:
                    found.append(StoredFrame(frame_id, fingerprint, path, config, file.kind == _STAGED))
        return found

    def existing(self, story_id: str) -> dict[str, list[StoredFrame]]:
        """``stored(story_id)`` grouped by frame id (a frame may have more than one row: a staged
        one not yet committed, or a crash in the middle of a compaction)."""
        grouped: dict[str, list[StoredFrame]] = {}
        for row in self.stored(story_id):
            grouped.setdefault(row.frame_id, []).append(row)
        return grouped

    def staged_bytes(self, story_id: str) -> int:
        """Bytes of the story's staged files (what ``commit_story`` would make visible)."""
        return sum(f.size for f in self._files_of(story_id).values() if f.kind == _STAGED)

    def iter_rows(
        self, story_id: str, wanted: dict[str, str | None], columns: list[str]
    ) -> Iterator[dict[str, Any]]:
        """Yield the rows of ``story_id`` whose (frame_id, fingerprint) is in ``wanted``, in the
        order of ``wanted``, reading one file at a time (memory does not grow with the story).
        Committed rows are preferred; staged rows count too."""
        where: dict[str, str] = {}
        for row in sorted(self.stored(story_id), key=lambda r: r.staged):
            if row.frame_id in wanted and wanted[row.frame_id] == row.fingerprint:
                where.setdefault(row.frame_id, row.part)
        read = sorted({*columns, "story_id", "frame_id"})
        table: pa.Table | None = None
        table_path: str | None = None
        for frame_id in wanted:
            path = where.get(frame_id)
            if path is None:
                continue
            if path != table_path:
                table, table_path = self._read_part(path, columns=read), path
            assert table is not None
            for row in table.to_pylist():
                if row["story_id"] == story_id and row["frame_id"] == frame_id:
                    yield row
                    break

    def read_table(self, story_id: str | None = None) -> pa.Table:
        """Every committed frame (of one story, or all) as one table with ``FRAME_SCHEMA``, sorted
        by story_id then frame_index: what readers see (staged rows left out). Loads everything:
        for inspection and tests."""
        tables = []
        for path in self.part_paths(story_id):
            with self.fs.open(path, "rb") as handle:
                tables.append(_normalize(pq.read_table(handle)))
        if not tables:
            return FRAME_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        if story_id is not None:
            table = table.filter(pc.equal(table["story_id"], story_id))
        return table.sort_by([("story_id", "ascending"), ("frame_index", "ascending")])

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

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.root}: this sink is read-only")

    def _delete(self, story_id: str, paths: list[str]) -> None:
        """Delete ``paths`` in one batch (one request on S3) and forget them."""
        if not paths:
            return
        try:
            self.fs.rm(sorted(paths))
        except FileNotFoundError:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)
        for path in paths:
            self._forget(path)

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
        # Of several committed rows of one frame (a crash in a rewrite), keep the one in the part
        # that keeps the most rows, so that the redundant part goes away without a rewrite.
        good_rows: dict[str, int] = {}
        for frame_id, found in rows.items():
            if frame_id in remove:
                continue
            wanted = current.get(frame_id)
            has_wanted = wanted is not None and any(row[2] == wanted for _, row in found)
            for path, row in found:
                if files[path].kind == _PART and (not has_wanted or row[2] == wanted):
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
            committed = sorted((item for item in candidates if files[item[0]].kind == _PART),
                               key=lambda item: (-good_rows.get(item[0], 0), item[0]))
            staged = [item for item in candidates if files[item[0]].kind == _STAGED]
            if matching and committed:
                choice = committed[0]
            elif staged:
                choice = max(staged, key=lambda item: (files[item[0]].order, item[0]))
            else:
                choice = committed[0]
            keep.add((choice[0], frame_id))
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
            for start, stop in _split(sizes, self.target_part_bytes):
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
                                           zip(ids, fps, _shared_strings(chunk["config"]))]
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


def hand_back_memory() -> None:
    """A compaction holds up to a part's bytes at once: hand the freed memory back to the system
    (Arrow's pool, and glibc's heap where there is one), or the allocators keep it and a long job's
    driver looks as if it grew by a part at every compaction."""
    pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _shared_strings(column: pa.ChunkedArray | pa.Array) -> list[Any]:
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


def _split(sizes: list[float], target: int) -> list[tuple[int, int]]:
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
