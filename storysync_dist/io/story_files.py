"""What a story of a dataset holds, as one sink sees it (``io.sink``): its files (committed parts
and staged files, listed once, then kept up to date by the sink), the index rows of each file
(read once: files are immutable), and its rows. The writing half is ``io.sink.ParquetFrameSink``.

The sink learns what a story holds once (one listing of the story's folder) and then keeps its own
index of what it writes and removes; it assumes nobody else writes the same story meanwhile, which
the job's story lease (``storysync_dist.io.lease``) guarantees. A file that cannot be read as a
frame table is moved to ``<root>/quarantine/`` (unless ``read_only``) and reported in ``damaged``;
its frames then count as missing.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .compaction import shared_strings
from .layout import (
    _FLAT_RE,
    _INDEX_COLUMNS,
    _PART,
    _PART_RE,
    _STAGED,
    _STAGED_RE,
    _STORY_DIR_RE,
    DATA_DIR,
    DamagedPartError,
    StoredFrame,
    _committed_paths,
    _IndexRow,
    _list_folder,
    _mtime,
    _normalize,
    story_dir,
)
from .old_layout import OldLayout
from .quarantine import set_aside
from .schema import FRAME_SCHEMA
from .storage import is_local, resolve

__all__ = ["StoryFiles"]

log = logging.getLogger("storysync")


@dataclass
class _File:
    """One file of a story as this sink knows it."""

    kind: str  # _PART or _STAGED
    size: int
    order: float  # staged files: higher is newer (mtime when listed; a counter for our own writes)


class StoryFiles:
    """The files and rows of a dataset's stories under ``<root>/data/``, read through one cache."""

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> None:
        self.root = str(root)
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self.fs, self._fs_root = resolve(self.root, self.storage_options)
        self._data_dir = posixpath.join(self._fs_root, DATA_DIR)
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
        # Parts of the old flat layout, moved into story folders by a writing sink.
        self._old = OldLayout(self.fs, self._data_dir, read_only=read_only, url=self.url,
                              commit=lambda path, data: self._commit(path, data))
        self.damaged: list[str] = []

    def _commit(self, path: str, data: bytes) -> None:
        """Commit one file: only a writing sink (``io.sink``) writes."""
        raise PermissionError(f"{self.root}: read-only")

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
        return self._old.parts(story_id)

    def _write_marker_if_clean(self) -> None:
        self._old.write_marker_if_clean()

    def _migrate_flat(self, story_id: str) -> None:
        self._old.migrate(story_id, self._story_path(story_id))

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
            self._old.refresh()
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
        stories = shared_strings(table.column("story_id"))
        frames = table.column("frame_id").to_pylist()
        # Rows written before fingerprints existed have none: they never match, so they are redone.
        fingerprints = (
            table.column("fingerprint").to_pylist() if "fingerprint" in table.column_names else [None] * len(frames)
        )
        # The story id and the config JSON (hundreds of bytes) are the same on most rows: one string
        # object each, not one per row (10^6 stored frames: about 0.7 GB less on the driver).
        configs = shared_strings(table.column("config")) if "config" in table.column_names else [None] * len(frames)
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
        target = set_aside(self.fs, self._fs_root, path)
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
