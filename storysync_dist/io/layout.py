"""The dataset's layout on any fsspec filesystem: where a story's files go, what they are called,
what one row holds, and how readers find the committed parts (``dataset_files``, ``open_dataset``).

The rules for writing and committing (staging, compaction, crashes) are in ``io.sink``.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..core.ids import ID_PATTERN, is_valid_id
from .schema import FRAME_SCHEMA
from .storage import is_local, resolve

DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"
STORYBOARD_NAME = "storyboard.png"
STORY_DIR_PREFIX = ""
LAYOUT_MARKER = "_storysync_layout.json"
DEFAULT_TARGET_PART_BYTES = 128 * 1024**2

_ID = r"[a-z0-9][a-z0-9_-]{0,63}"
_PART_RE = re.compile(r"^part-(?P<index>\d{5,})-(?P<hash>[0-9a-f]{16})\.parquet$")
_STAGED_RE = re.compile(r"^\.frame-(?P<index>\d{5,})-(?P<hash>[0-9a-f]{16})\.staged$")
_FLAT_RE = re.compile(rf"^part-(?P<story>{_ID})-(?P<index>\d{{5,}})-(?P<hash>[0-9a-f]{{8,32}})\.parquet$")
_STORY_DIR_RE = re.compile(rf"^{re.escape(STORY_DIR_PREFIX)}(?P<story>{_ID})$")
# The columns a rerun reads to learn what a dataset holds.
# ``config`` (the frame's render settings as JSON) lets a job refuse to mix settings in one story
# without reading images; one string per row, repeated, so Parquet stores it dictionary-encoded.
_INDEX_COLUMNS = ("story_id", "frame_id", "fingerprint", "config")

# One index row: (story_id, frame_id, fingerprint or None, config JSON or None).
_IndexRow = tuple[str, str, str | None, str | None]
_PART, _STAGED = "part", "staged"


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


@dataclass(frozen=True, slots=True)  # slots: a rerun of 10^6 frames holds 10^6 of these
class StoredFrame:
    """One stored row of a story: which frame, with which fingerprint, in which file, the
    ``config`` column it was written with (its render settings, JSON; None if absent), and whether
    the file is a staged one-frame part (invisible to readers until ``commit_story``)."""

    frame_id: str
    fingerprint: str | None
    part: str
    config: str | None = None
    staged: bool = False


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


def _digest(identities: list[tuple[str, str]]) -> str:
    text = "\n".join(f"{frame_id}\t{fingerprint}" for frame_id, fingerprint in sorted(identities))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def story_dir(story_id: str) -> str:
    """The story's folder under ``data/``: ``<story_id>`` (a plain folder: no reader adds a column for it)."""
    if not is_valid_id(story_id):
        raise ValueError(f"story_id {story_id!r} does not match {ID_PATTERN}")
    return f"{STORY_DIR_PREFIX}{story_id}"


def part_name(story_id: str, first_index: int, identities: list[tuple[str, str]]) -> str:
    """Path of a committed part under ``data/``: ``<story_id>/part-<first index:05d>-<16 hex>.parquet``.

    The hash is of the part's (frame_id, fingerprint) pairs, not of its bytes: the same frames
    always map to the same name, so the same part committed twice replaces itself.
    """
    return f"{story_dir(story_id)}/part-{first_index:05d}-{_digest(identities)}.parquet"


def staged_name(story_id: str, first_index: int, identities: list[tuple[str, str]]) -> str:
    """Path of a staged part under ``data/``: ``<story_id>/.frame-<index:05d>-<16 hex>.staged``."""
    return f"{story_dir(story_id)}/.frame-{first_index:05d}-{_digest(identities)}.staged"


# Object stores whose fsspec ``find`` takes a server-side ``prefix`` (one LIST of just those keys).
_PREFIX_FIND_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})


def _list_folder(fs: Any, data_dir: str, folder: str) -> list[dict[str, Any]]:
    """The files of ``data_dir/folder`` (name, size, ...), in one listing of that folder only.

    On S3/GCS a ``find`` with a key prefix: ``ls`` of a folder that does not exist yet would also
    list its parent, i.e. every story of the dataset."""
    path = posixpath.join(data_dir, folder)
    with contextlib.suppress(Exception):
        # Object-store listings are cached by fsspec; other processes may have written since.
        fs.invalidate_cache(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    try:
        if protocols & _PREFIX_FIND_PROTOCOLS:
            found = fs.find(data_dir, prefix=f"{folder}/", detail=True)
            entries = [info for name, info in found.items() if posixpath.dirname(name) == path]
        else:
            entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry for entry in entries if entry.get("type", "file") != "directory"]


def _committed_paths(fs: Any, data_dir: str, story_id: str | None) -> list[str]:
    """Committed part paths under ``data_dir`` (of one story or all), flat parts of the old layout
    included; one listing of the story folder, or one recursive listing of ``data/``."""
    with contextlib.suppress(Exception):
        # Object-store listings are cached by fsspec; other processes may have written since.
        fs.invalidate_cache(data_dir)
    found: list[str] = []
    if story_id is not None:
        entries = _list_folder(fs, data_dir, story_dir(story_id))
        return sorted(e["name"] for e in entries if _PART_RE.match(posixpath.basename(e["name"])))
    # invalidate_cache forgets data/ and its parents only, and s3fs's recursive find keeps the cached
    # listing of a story folder it finds: a part committed there since (by another process) would be
    # "not found" when opened. Forget the story folders' listings too.
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        below = data_dir.rstrip("/") + "/"
        for key in [key for key in list(cache) if key.startswith(below)]:
            cache.pop(key, None)
    try:
        entries = fs.find(data_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = data_dir.rstrip("/") + "/"
    for entry in entries:
        rel = entry[len(prefix):] if entry.startswith(prefix) else entry
        parts = rel.split("/")
        if len(parts) == 2 and _STORY_DIR_RE.match(parts[0]) and _PART_RE.match(parts[1]):
            found.append(entry)
        elif len(parts) == 1 and _FLAT_RE.match(parts[0]):
            found.append(entry)
    return sorted(found)


def dataset_files(root: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the committed parts of the dataset at ``root``, for
    ``datasets.load_dataset("parquet", data_files=dataset_files(root))``. Staged files are left out."""
    fs, fs_root = resolve(str(root), storage_options)
    paths = _committed_paths(fs, posixpath.join(fs_root, DATA_DIR), None)
    return paths if is_local(fs) else [fs.unstrip_protocol(p) for p in paths]


def open_dataset(root: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """The committed parts of the dataset at ``root`` as a ``pyarrow.dataset.Dataset`` with
    ``FRAME_SCHEMA`` (``ds.field("story_id") == id`` filters by the column's statistics)."""
    fs, fs_root = resolve(str(root), storage_options)
    data_dir = posixpath.join(fs_root, DATA_DIR)
    paths = _committed_paths(fs, data_dir, None)
    filesystem = None if is_local(fs) else fs
    return ds.dataset(
        paths, schema=FRAME_SCHEMA, format="parquet", filesystem=filesystem,
    )


def _write_table(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def _normalize(table: pa.Table) -> pa.Table:
    if "fingerprint" not in table.column_names:
        table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
    return table.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA)


def _mtime(entry: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return 0.0
