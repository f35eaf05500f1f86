"""Frames as a Parquet dataset on any fsspec filesystem (local path, ``file://``, ``memory://``, ``s3://``).

Layout under the output root::

    data/part-<story_id>-<first frame index:05d>-<8 hex of content hash>.parquet
    manifest.json
    storyboard.png

One row per frame (``FRAME_SCHEMA``); the ``image`` column is the ``{bytes, path}`` struct that
Hugging Face ``datasets`` reads as an Image column, and the schema carries the ``huggingface``
feature metadata so ``datasets.load_dataset("parquet", data_files=".../data/*.parquet")`` decodes it.

Atomicity: a part file is built completely in memory, then committed in one step: on the local
filesystem written under a hidden temporary name in the same folder and ``os.replace``-d (rename is
atomic within a folder, and pyarrow dataset discovery skips names starting with ``.``/``_``); on any
other filesystem with one ``fs.pipe_file`` (a single PUT on object stores: an object either exists
complete or not at all). A crash therefore never leaves a truncated part visible, and a rerun skips
exactly the frames that are present (``ParquetFrameSink.existing``).

Output paths are built only from validated ids (``storysync_dist.spec.ID_PATTERN``), never from prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ..spec import ID_PATTERN, is_valid_id

__all__ = [
    "DATA_DIR",
    "FRAME_SCHEMA",
    "HF_FEATURES",
    "MANIFEST_NAME",
    "STORYBOARD_NAME",
    "FrameRecord",
    "ParquetFrameSink",
    "part_name",
    "read_manifest",
    "write_bytes",
    "write_manifest",
]

DATA_DIR = "data"
MANIFEST_NAME = "manifest.json"
STORYBOARD_NAME = "storyboard.png"

# The struct layout (field order included) that `datasets.Image` uses as its Arrow storage type.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# `datasets` feature descriptions, in schema order. `datasets.Features.from_arrow_schema` uses a
# feature from this metadata only when its Arrow type equals the column's type (nullable included),
# so every field below stays nullable and `image` is exactly IMAGE_TYPE.
HF_FEATURES: dict[str, dict[str, str]] = {
    "story_id": {"dtype": "string", "_type": "Value"},
    "frame_id": {"dtype": "string", "_type": "Value"},
    "frame_index": {"dtype": "int32", "_type": "Value"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "model": {"dtype": "string", "_type": "Value"},
    "method": {"dtype": "string", "_type": "Value"},
    "config": {"dtype": "string", "_type": "Value"},
    "mask": {"dtype": "binary", "_type": "Value"},
    "is_anchor": {"dtype": "bool", "_type": "Value"},
    "render_seconds": {"dtype": "float64", "_type": "Value"},
}

FRAME_SCHEMA = pa.schema(
    [
        pa.field("story_id", pa.string()),
        pa.field("frame_id", pa.string()),
        pa.field("frame_index", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("image", IMAGE_TYPE),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("method", pa.string()),
        pa.field("config", pa.string()),
        pa.field("mask", pa.binary()),
        pa.field("is_anchor", pa.bool_()),
        pa.field("render_seconds", pa.float64()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)

_PART_RE = re.compile(
    r"^part-(?P<story>[a-z0-9][a-z0-9_-]{0,63})-(?P<index>\d{5,})-(?P<hash>[0-9a-f]{8})\.parquet$"
)
# Relative paths accepted by write_bytes: plain names joined by "/", no hidden files, no "..".
_REL_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class FrameRecord:
    """One rendered frame, as the engine hands it to the sink (one Parquet row)."""

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

    def image_path(self) -> str:
        """The ``path`` stored in the image struct: ``<story_id>/<frame_id>.png``."""
        return f"{self.story_id}/{self.frame_id}.png"

    def to_row(self) -> dict[str, Any]:
        """The record as a row of ``FRAME_SCHEMA``."""
        row = asdict(self)
        row["image"] = {"bytes": row.pop("image_png"), "path": self.image_path()}
        row["mask"] = row.pop("mask_png")
        return row


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


def part_name(story_id: str, first_index: int, data: bytes) -> str:
    """File name of a part: ``part-<story_id>-<first index:05d>-<8 hex of sha256(data)>.parquet``."""
    digest = hashlib.sha256(data).hexdigest()[:8]
    return f"part-{story_id}-{first_index:05d}-{digest}.parquet"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _commit(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` visible at ``path`` all at once (see the module docstring)."""
    if _is_local(fs):
        folder, name = posixpath.split(path)
        os.makedirs(folder, exist_ok=True)
        temp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
    else:
        # One PUT. Never `with fs.open(path, "wb")`: on S3 an exception inside the block still
        # commits whatever was buffered, i.e. a truncated object under the final name.
        fs.pipe_file(path, bytes(data))


class ParquetFrameSink:
    """Writes frames as Parquet part files under ``<root>/data`` on any fsspec filesystem.

    ``write`` commits one part per call. ``add``/``flush`` buffer records and write a part every
    ``rows_per_part`` records (1: one part per frame, so a crash loses at most the frame in flight).
    """

    def __init__(
        self, root: str, *, rows_per_part: int = 1, storage_options: dict[str, Any] | None = None
    ) -> None:
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        self.root = str(root)
        self.rows_per_part = rows_per_part
        self.storage_options = dict(storage_options or {})
        self.fs, self._fs_root = _resolve(self.root, self.storage_options)
        self._data_dir = posixpath.join(self._fs_root, DATA_DIR)
        self._buffer: list[FrameRecord] = []
        # Part files are immutable (content-hashed names, committed once, only ever deleted), so
        # their (story_id, frame_id, config) rows are cached: resuming or checking duplicates before
        # every write then reads each part once instead of once per write.
        self._index_cache: dict[str, list[tuple[str, str, str]]] = {}

    # -- paths -------------------------------------------------------------------------------------

    def url(self, fs_path: str) -> str:
        """The user-facing form of a filesystem path: absolute path locally, ``proto://...`` otherwise."""
        return fs_path if _is_local(self.fs) else self.fs.unstrip_protocol(fs_path)

    def part_paths(self, story_id: str | None = None) -> list[str]:
        """Filesystem paths of the committed part files (of one story, or all), sorted by name."""
        with contextlib.suppress(Exception):
            # Object-store listings are cached by fsspec; other processes may have written since.
            self.fs.invalidate_cache(self._data_dir)
        try:
            entries = self.fs.ls(self._data_dir, detail=False)
        except FileNotFoundError:
            return []
        paths = []
        for entry in entries:
            match = _PART_RE.match(posixpath.basename(entry))
            if match and (story_id is None or match["story"] == story_id):
                paths.append(entry)
        return sorted(paths)

    # -- reading -----------------------------------------------------------------------------------

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def _index_of(self, path: str) -> list[tuple[str, str, str]]:
        cached = self._index_cache.get(path)
        if cached is None:
            table = self._read_part(path, columns=["story_id", "frame_id", "config"])
            cached = list(
                zip(*(table.column(name).to_pylist() for name in ("story_id", "frame_id", "config")))
            )
            self._index_cache[path] = cached
        return cached

    def existing(self, story_id: str) -> dict[str, dict[str, str]]:
        """Frames of ``story_id`` already committed: ``frame_id -> {"config": str, "part": url}``.

        Reads only the story_id/frame_id/config columns. A rerun compares ``config`` with its own to
        decide whether a frame can be skipped.
        """
        paths = self.part_paths(story_id)
        missing = [path for path in paths if path not in self._index_cache]
        if len(missing) > 1 and not _is_local(self.fs):
            # Remote reads are latency-bound: fetch the small footers/columns concurrently.
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                list(pool.map(self._index_of, missing))
        live = set(paths)
        for stale in [path for path in self._index_cache if path not in live]:
            del self._index_cache[stale]
        found: dict[str, dict[str, str]] = {}
        for path in paths:
            for row_story, frame_id, config in self._index_of(path):
                if row_story == story_id and frame_id not in found:
                    found[frame_id] = {"config": config, "part": self.url(path)}
        return found

    def read_table(self, story_id: str | None = None) -> pa.Table:
        """Every committed frame (of one story, or all) as one table with ``FRAME_SCHEMA``,
        sorted by story_id then frame_index."""
        tables = [self._read_part(path) for path in self.part_paths(story_id)]
        if not tables:
            return FRAME_SCHEMA.empty_table()
        table = pa.concat_tables([t.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA) for t in tables])
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

    def write(self, records: list[FrameRecord], *, overwrite: bool = False) -> str:
        """Write ``records`` (one story) as ONE part file, atomically; return its URL.

        Raises ``ValueError`` for an empty list, mixed stories, invalid ids, a frame listed twice,
        or a frame already committed (unless ``overwrite=True``: the new rows are committed first,
        then the old rows of those frames are removed from their parts).
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
        present = self.existing(story_id)
        clash = [frame_id for frame_id in frame_ids if frame_id in present]
        if clash and not overwrite:
            raise ValueError(
                f"story {story_id!r}: frame(s) {clash} already written (in {present[clash[0]]['part']}); "
                "pass overwrite=True to replace them"
            )

        data = self.build_part(records)
        first_index = min(record.frame_index for record in records)
        path = posixpath.join(self._data_dir, part_name(story_id, first_index, data))
        _commit(self.fs, path, data)
        self._index_cache[path] = [(r.story_id, r.frame_id, r.config) for r in records]
        if clash:
            self._remove_frames(story_id, set(clash), keep=path)
        return self.url(path)

    def _remove_frames(self, story_id: str, frame_ids: set[str], keep: str) -> None:
        """Drop the rows of ``frame_ids`` from every part except ``keep`` (after an overwrite)."""
        for path in self.part_paths(story_id):
            if path == keep or not any(s == story_id and f in frame_ids for s, f, _ in self._index_of(path)):
                continue
            table = self._read_part(path)
            mask = pc.invert(pc.is_in(table["frame_id"], value_set=pa.array(sorted(frame_ids))))
            remaining = table.filter(mask)
            if remaining.num_rows:
                # Commit the reduced part before deleting the old one, so no surviving frame is
                # ever missing from the dataset.
                buffer = pa.BufferOutputStream()
                pq.write_table(remaining.cast(FRAME_SCHEMA), buffer)
                data = buffer.getvalue().to_pybytes()
                first = min(remaining["frame_index"].to_pylist())
                new_path = posixpath.join(self._data_dir, part_name(story_id, first, data))
                _commit(self.fs, new_path, data)
                self._index_cache[new_path] = list(
                    zip(*(remaining.column(n).to_pylist() for n in ("story_id", "frame_id", "config")))
                )
            self.fs.rm(path)
            self._index_cache.pop(path, None)

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


def _resolve(root: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(str(root), **(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def _check_relpath(relpath: str) -> str:
    parts = relpath.split("/")
    if not relpath or any(not _REL_COMPONENT_RE.fullmatch(part) for part in parts):
        raise ValueError(f"unsafe relative output path {relpath!r}")
    return relpath


def write_bytes(root: str, relpath: str, data: bytes, storage_options: dict[str, Any] | None = None) -> str:
    """Atomically write ``data`` to ``<root>/<relpath>`` (e.g. ``storyboard.png``); return its URL."""
    fs, fs_root = _resolve(root, storage_options)
    path = posixpath.join(fs_root, _check_relpath(relpath))
    _commit(fs, path, bytes(data))
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def write_manifest(root: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    """Atomically write ``manifest`` as ``<root>/manifest.json`` (sorted keys, indented); return its URL."""
    data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    return write_bytes(root, MANIFEST_NAME, data, storage_options)


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Return the parsed ``<root>/manifest.json``, or None when there is none yet."""
    fs, fs_root = _resolve(root, storage_options)
    path = posixpath.join(fs_root, MANIFEST_NAME)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    manifest = json.loads(data.decode("utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: manifest is not a JSON object")
    return manifest
