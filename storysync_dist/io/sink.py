"""Frames as a Parquet dataset on any fsspec filesystem (local path, ``file://``, ``memory://``, ``s3://``).

Layout under the output root::

    data/part-<story_id>-<first frame index:05d>-<16 hex of its frames' identities>.parquet
    quarantine/                  damaged part files, set aside (never read again)
    storyboards/<story_id>.png   the story's storyboard (more sheets: <story_id>-p002.png, ...)
    storyboard.png               the storyboard of a single-story dataset
    manifest.json                every story: its frames, which are done, devices, ...
    _locks/                      leases held by running jobs (storysync_dist.io.lease)

One row per frame (``FRAME_SCHEMA``); the ``image`` column is the ``{bytes, path}`` struct that
Hugging Face ``datasets`` reads as an Image column, and the schema carries the ``huggingface``
feature metadata so ``datasets.load_dataset("parquet", data_files=".../data/*.parquet")`` decodes it.
The ``fingerprint`` column is the frame's identity (``storysync_dist.engine.identity``): a rerun
skips a frame exactly when a row with its current fingerprint is there. The per-part index a rerun
reads (``stored``) also carries the ``config`` column, so a job can tell, without reading any
image, whether the story's rows were rendered with other settings (``engine.plan``).

Atomicity: a part file is built completely in memory, then committed in one step: on the local
filesystem written under a hidden temporary name in the same folder and ``os.replace``-d (rename is
atomic within a folder, and pyarrow dataset discovery skips names starting with ``.``/``_``); on an
object store with one ``fs.pipe_file`` (a single PUT: an object either exists complete or not at
all); on any other filesystem as a hidden temporary renamed into place with ``fs.mv``. A crash
therefore never leaves a truncated part visible. Part names come from the frames' identities, so
the same frame written twice lands on the same name instead of appearing twice, and a frame that
is rendered again replaces its old row (new part committed first, old row removed after).

Output paths are built only from validated ids (``storysync_dist.spec.ID_PATTERN``), never from prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..spec import ID_PATTERN, is_valid_id
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

__all__ = [
    "DATA_DIR",
    "FRAME_SCHEMA",
    "HF_FEATURES",
    "MANIFEST_NAME",
    "QUARANTINE_DIR",
    "STORYBOARD_NAME",
    "DamagedPartError",
    "FrameRecord",
    "ParquetFrameSink",
    "StoredFrame",
    "create_exclusive",
    "is_object_store",
    "part_name",
    "read_manifest",
    "write_bytes",
    "write_manifest",
]

DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"
STORYBOARD_NAME = "storyboard.png"

_PART_RE = re.compile(
    r"^part-(?P<story>[a-z0-9][a-z0-9_-]{0,63})-(?P<index>\d{5,})-(?P<hash>[0-9a-f]{8,32})\.parquet$"
)
# The columns a rerun reads to learn what a dataset holds.
# ``config`` (the frame's render settings as JSON) lets a job refuse to mix settings in one story
# without reading images; one string per row, repeated, so Parquet stores it dictionary-encoded.
_INDEX_COLUMNS = ("story_id", "frame_id", "fingerprint", "config")

# One index row: (story_id, frame_id, fingerprint or None, config JSON or None).
_IndexRow = tuple[str, str, str | None, str | None]


class DamagedPartError(ValueError):
    """A part file that is not a readable frame table (it is set aside, see ``quarantine``)."""


@dataclass
class FrameRecord:
    """One rendered frame, as the engine hands it to the sink (one Parquet row).

    ``fingerprint`` is the frame's identity: a hash of everything that determines its pixels
    (``storysync_dist.engine.identity``). A rerun keeps a stored row only when it matches.
    """

    story_id: str
    frame_id: str
    frame_index: int
    prompt: str
    seed: int
    image_png: bytes
    width: int
    height: int
    model: str
    method: str
    config: str
    mask_png: bytes | None = None
    is_anchor: bool = False
    render_seconds: float = 0.0
    fingerprint: str = ""

    def image_path(self) -> str:
        """The ``path`` stored in the image struct: ``<story_id>/<frame_id>.png``."""
        return f"{self.story_id}/{self.frame_id}.png"

    def to_row(self) -> dict[str, Any]:
        """The record as a row of ``FRAME_SCHEMA``."""
        row = asdict(self)
        row["image"] = {"bytes": row.pop("image_png"), "path": self.image_path()}
        row["mask"] = row.pop("mask_png")
        return row


@dataclass(frozen=True)
class StoredFrame:
    """One committed row of a story: which frame, with which fingerprint, in which part file,
    and the ``config`` column it was written with (its render settings, JSON; None if absent)."""

    frame_id: str
    fingerprint: str | None
    part: str
    config: str | None = None


def _check_record(record: FrameRecord) -> None:
    # Ids become file and image paths: refuse anything that is not a validated id.
    if not is_valid_id(record.story_id):
        raise ValueError(f"story_id {record.story_id!r} does not match {ID_PATTERN}")
    if not is_valid_id(record.frame_id):
        raise ValueError(
            f"frame {record.frame_id!r} of story {record.story_id!r}: id does not match {ID_PATTERN}"
        )
    if not isinstance(record.image_png, (bytes, bytearray, memoryview)) or not record.image_png:
        raise ValueError(f"frame {record.frame_id!r}: image_png must be non-empty PNG bytes")
    if record.frame_index < 0 or record.width < 1 or record.height < 1:
        raise ValueError(
            f"frame {record.frame_id!r}: bad frame_index/width/height "
            f"({record.frame_index}, {record.width}, {record.height})"
        )


def part_name(story_id: str, first_index: int, identities: list[tuple[str, str]]) -> str:
    """File name of a part: ``part-<story_id>-<first index:05d>-<16 hex>.parquet``.

    The hash is of the part's (frame_id, fingerprint) pairs, not of its bytes: the same frames
    always map to the same name, so a frame written twice (a retry, a second writer) replaces
    itself instead of appearing twice.
    """
    text = "\n".join(f"{frame_id}\t{fingerprint}" for frame_id, fingerprint in sorted(identities))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"part-{story_id}-{first_index:05d}-{digest}.parquet"


class ParquetFrameSink:
    """Writes frames as Parquet part files under ``<root>/data`` on any fsspec filesystem.

    ``write`` commits one part per call and is an upsert by frame id: once the new part is
    committed, every other row of the same frames is removed, so a story holds each frame once.
    ``add``/``flush`` buffer records and write a part every ``rows_per_part`` records (1: one part
    per frame, so a crash loses at most the frame in flight).

    The sink learns what a story holds once (one listing of ``data/``) and then keeps its own
    index of what it writes and removes; it assumes nobody else writes the same story meanwhile,
    which the job's story lease (``storysync_dist.io.lease``) guarantees.

    A part that cannot be read as a frame table is moved to ``<root>/quarantine/`` (unless the
    sink is ``read_only``) and reported in ``damaged``; its frames then count as missing.
    """

    def __init__(
        self,
        root: str,
        *,
        rows_per_part: int = 1,
        storage_options: dict[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        self.root = str(root)
        self.rows_per_part = rows_per_part
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self.fs, self._fs_root = resolve(self.root, self.storage_options)
        self._data_dir = posixpath.join(self._fs_root, DATA_DIR)
        self._buffer: list[FrameRecord] = []
        # Part files are immutable (committed once, only ever deleted), so their index rows are
        # cached: a part is read once per sink, not once per write.
        self._index_cache: dict[str, list[_IndexRow]] = {}
        # story id -> the part paths of that story, once listed (kept up to date by writes).
        self._story_parts: dict[str, set[str]] = {}
        self.damaged: list[str] = []

    # -- paths -------------------------------------------------------------------------------------

    def url(self, fs_path: str) -> str:
        """The user-facing form of a filesystem path: absolute path locally, ``proto://...`` otherwise."""
        return fs_path if is_local(self.fs) else self.fs.unstrip_protocol(fs_path)

    def part_paths(self, story_id: str | None = None) -> list[str]:
        """Filesystem paths of the committed part files (of one story, or all), sorted by name.

        Always lists ``data/`` afresh (other processes may have written since).
        """
        with contextlib.suppress(Exception):
            # Object-store listings are cached by fsspec; other processes may have written since.
            self.fs.invalidate_cache(self._data_dir)
        try:
            entries = self.fs.ls(self._data_dir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        paths = []
        for entry in entries:
            match = _PART_RE.match(posixpath.basename(entry))
            if match and (story_id is None or match["story"] == story_id):
                paths.append(entry)
        return sorted(paths)

    def _parts_of(self, story_id: str) -> set[str]:
        parts = self._story_parts.get(story_id)
        if parts is None:
            parts = set(self.part_paths(story_id))
            self._story_parts[story_id] = parts
        return parts

    def refresh(self, story_id: str | None = None) -> None:
        """Forget what was listed, so the next look at the dataset lists it again."""
        if story_id is None:
            self._story_parts.clear()
        else:
            self._story_parts.pop(story_id, None)

    # -- reading -----------------------------------------------------------------------------------

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def _index_of(self, path: str) -> list[_IndexRow]:
        """(story_id, frame_id, fingerprint, config) of every row of a part; a damaged part is set aside."""
        cached = self._index_cache.get(path)
        if cached is not None:
            return cached
        try:
            with self.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                missing = [name for name in ("story_id", "frame_id") if name not in names]
                if missing:
                    raise DamagedPartError(f"has no {', '.join(missing)} column")
                columns = [name for name in _INDEX_COLUMNS if name in names]
                table = parquet.read(columns=columns)
        except FileNotFoundError:
            # Removed since it was listed (by a replace or a compaction): it holds nothing now.
            self._forget(path)
            return []
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, DamagedPartError) as exc:
            self._set_aside(path, exc)
            return []
        stories = table.column("story_id").to_pylist()
        frames = table.column("frame_id").to_pylist()
        # Rows written before fingerprints existed have none: they never match, so they are redone.
        fingerprints = (
            table.column("fingerprint").to_pylist() if "fingerprint" in table.column_names else [None] * len(frames)
        )
        configs = table.column("config").to_pylist() if "config" in table.column_names else [None] * len(frames)
        cached = list(zip(stories, frames, fingerprints, configs))
        self._index_cache[path] = cached
        return cached

    def _set_aside(self, path: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        name = posixpath.basename(path)
        if self.read_only:
            self.damaged.append(f"{self.url(path)} ({reason})")
            log.warning("damaged part file %s: %s", self.url(path), reason)
            self._index_cache[path] = []  # reported once; a writing sink sets it aside
            return
        else:
            target = posixpath.join(self._fs_root, QUARANTINE_DIR, name)
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.mv(path, target)
            self.damaged.append(f"{self.url(path)} -> {self.url(target)} ({reason})")
            log.warning("damaged part file %s set aside as %s: %s", self.url(path), self.url(target), reason)
        self._forget(path)

    def _forget(self, path: str) -> None:
        self._index_cache.pop(path, None)
        for parts in self._story_parts.values():
            parts.discard(path)

    def stored(self, story_id: str) -> list[StoredFrame]:
        """Every committed row of ``story_id``: frame id, fingerprint (None if it has none), part,
        config JSON.

        Reads only the index columns, each part once per sink; remote parts are read concurrently.
        """
        paths = sorted(self._parts_of(story_id))
        missing = [path for path in paths if path not in self._index_cache]
        if len(missing) > 1 and not is_local(self.fs):
            # Remote reads are latency-bound: fetch the small footers/columns concurrently.
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                list(pool.map(self._index_of, missing))
        found: list[StoredFrame] = []
        for path in paths:
            for row_story, frame_id, fingerprint, config in self._index_of(path):
                if row_story == story_id:
                    found.append(StoredFrame(frame_id, fingerprint, path, config))
        return found

    def existing(self, story_id: str) -> dict[str, list[StoredFrame]]:
        """``stored(story_id)`` grouped by frame id (a frame may have more than one row after a
        crash between a replacement's commit and the removal of the old row)."""
        grouped: dict[str, list[StoredFrame]] = {}
        for row in self.stored(story_id):
            grouped.setdefault(row.frame_id, []).append(row)
        return grouped

    def iter_rows(
        self, story_id: str, wanted: dict[str, str | None], columns: list[str]
    ) -> Iterator[dict[str, Any]]:
        """Yield the rows of ``story_id`` whose (frame_id, fingerprint) is in ``wanted``, in the
        order of ``wanted``, reading one part at a time (memory does not grow with the story)."""
        where: dict[str, str] = {}
        for row in self.stored(story_id):
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
        """Every committed frame (of one story, or all) as one table with ``FRAME_SCHEMA``,
        sorted by story_id then frame_index. Loads everything: for inspection and tests."""
        tables = []
        for path in self.part_paths(story_id):
            table = self._read_part(path)
            if "fingerprint" not in table.column_names:
                table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
            tables.append(table.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA))
        if not tables:
            return FRAME_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        if story_id is not None:
            table = table.filter(pc.equal(table["story_id"], story_id))
        return table.sort_by([("story_id", "ascending"), ("frame_index", "ascending")])

    # -- writing -----------------------------------------------------------------------------------

    def build_part(self, records: list[FrameRecord]) -> bytes:
        """Serialize records to Parquet bytes in memory (nothing touches the filesystem)."""
        table = pa.Table.from_pylist([record.to_row() for record in records], schema=FRAME_SCHEMA)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        return buffer.getvalue().to_pybytes()

    def write(self, records: list[FrameRecord]) -> str:
        """Write ``records`` (one story) as ONE part file, atomically, and return its URL; then
        remove every other row of those frames (their older renders) from the story.

        Raises ``ValueError`` for an empty list, mixed stories, invalid ids or a frame listed twice.
        """
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
        parts = self._parts_of(story_id)
        data = self.build_part(records)
        first_index = min(record.frame_index for record in records)
        name = part_name(story_id, first_index, [(r.frame_id, r.fingerprint) for r in records])
        path = posixpath.join(self._data_dir, name)
        commit(self.fs, path, data)
        self._index_cache[path] = [(r.story_id, r.frame_id, r.fingerprint, r.config) for r in records]
        parts.add(path)
        self.remove_frames(story_id, set(frame_ids), keep=path)
        return self.url(path)

    def remove_frames(self, story_id: str, frame_ids: set[str], keep: str | None = None) -> list[str]:
        """Drop the rows of ``frame_ids`` from every part of the story except ``keep``; return the
        frame ids whose rows were removed. A part that keeps other rows is rewritten (the reduced
        part is committed before the old one is deleted, so no surviving frame is ever missing)."""
        removed: set[str] = set()
        for path in sorted(self._parts_of(story_id)):
            rows = self._index_of(path)
            if path == keep or not any(s == story_id and f in frame_ids for s, f, _, _ in rows):
                continue
            survivors = [row for row in rows if not (row[0] == story_id and row[1] in frame_ids)]
            removed.update(f for s, f, _, _ in rows if s == story_id and f in frame_ids)
            if survivors:
                table = self._read_part(path)
                if "fingerprint" not in table.column_names:
                    table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
                mask = pc.invert(pc.is_in(table["frame_id"], value_set=pa.array(sorted(frame_ids))))
                remaining = table.filter(mask).select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA)
                buffer = pa.BufferOutputStream()
                pq.write_table(remaining, buffer)
                first = min(remaining["frame_index"].to_pylist())
                identities = [(f, fp or "") for _, f, fp, _ in survivors]
                new_path = posixpath.join(self._data_dir, part_name(story_id, first, identities))
                commit(self.fs, new_path, buffer.getvalue().to_pybytes())
                self._index_cache[new_path] = survivors
                self._parts_of(story_id).add(new_path)
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)
                self._forget(path)
        return sorted(removed)

    def remove_stale_rows(self, story_id: str, current: dict[str, str]) -> None:
        """For each frame of ``current`` (frame id -> fingerprint), drop its rows with another
        fingerprint, keeping the current one (left over by a crash mid-replacement)."""
        for frame_id, fingerprint in current.items():
            rows = [r for r in self.stored(story_id) if r.frame_id == frame_id]
            keep = next((r.part for r in rows if r.fingerprint == fingerprint), None)
            if keep is not None and all(r.part == keep or r.fingerprint != fingerprint for r in rows):
                self.remove_frames(story_id, {frame_id}, keep=keep)

    def add(self, record: FrameRecord) -> str | None:
        """Buffer one record; write a part (and return its URL) once ``rows_per_part`` are buffered."""
        self._buffer.append(record)
        if len(self._buffer) >= self.rows_per_part:
            return self.flush()
        return None

    def flush(self) -> str | None:
        """Write the buffered records, if any, as one part; return its URL or None."""
        if not self._buffer:
            return None
        records, self._buffer = self._buffer, []
        try:
            return self.write(records)
        except BaseException:
            # Keep the records so the caller can retry the flush.
            self._buffer = records + self._buffer
            raise
