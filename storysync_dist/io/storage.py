"""Atomic writes on any fsspec filesystem: commit a file all at once, create one exclusively,
and the small JSON/PNG files of a dataset (manifest, storyboards, bundles).

Commit: on a local disk a complete hidden temporary is ``os.replace``-d into place; on an object
store one PUT (``pipe_file``) makes an object visible complete or not at all; on any other
filesystem (SFTP, HDFS, ...) a hidden temporary is renamed into place with ``fs.mv``, since
``pipe_file`` there streams into the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "MANIFEST_NAME",
    "OBJECT_STORE_PROTOCOLS",
    "commit",
    "create_exclusive",
    "is_local",
    "is_object_store",
    "read_manifest",
    "resolve",
    "url_of",
    "write_bytes",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
# Relative paths accepted by write_bytes: plain names joined by "/", no hidden files, no "..".
_REL_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Filesystems whose single PUT (``pipe_file``) makes an object visible complete or not at all, and
# whose rename is a copy: they commit with one ``pipe_file``. Every other non-local filesystem
# (SFTP, HDFS, SMB, ...) commits by writing a hidden temporary and renaming it.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"})


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` commits an object with one atomic PUT (S3, GCS, Azure, memory, ...)."""
    return bool(_protocols(fs) & OBJECT_STORE_PROTOCOLS)


def _local_temp(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")


def _write_local_temp(path: str, data: bytes) -> str:
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = _local_temp(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    return temp


def commit(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` visible at ``path`` all at once (see the module docstring)."""
    if is_local(fs):
        temp = _write_local_temp(path, data)
        try:
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
    elif is_object_store(fs):
        # One PUT. Never `with fs.open(path, "wb")`: on S3 an exception inside the block still
        # commits whatever was buffered, i.e. a truncated object under the final name.
        fs.pipe_file(path, bytes(data))
    else:
        # A filesystem with real renames (SFTP, HDFS, ...): pipe_file there streams into the final
        # name, so write a hidden temporary next to it and rename it into place.
        folder, name = posixpath.split(path)
        temp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        fs.makedirs(folder, exist_ok=True)
        try:
            fs.pipe_file(temp, bytes(data))
            fs.mv(temp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(temp)
            raise


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if nothing is there; True when this call created it.

    Local: a complete hidden temporary is hard-linked to the name (atomic, fails if it exists).
    Object stores: a conditional PUT (``If-None-Match: *`` on S3). Elsewhere fsspec's
    ``mode="create"`` (check then write; not atomic on every filesystem, see docs/distributed.md).
    """
    if is_local(fs):
        temp = _write_local_temp(path, data)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.remove(temp)
    try:
        fs.pipe_file(path, bytes(data), mode="create")
        return True
    except FileExistsError:
        return False


def resolve(root: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(str(root), **(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def _check_relpath(relpath: str) -> str:
    parts = relpath.split("/")
    if not relpath or any(not _REL_COMPONENT_RE.fullmatch(part) for part in parts):
        raise ValueError(f"unsafe relative output path {relpath!r}")
    return relpath


def url_of(root: str, relpath: str, storage_options: dict[str, Any] | None = None) -> str:
    """The user-facing URL of ``<root>/<relpath>``: an absolute path locally, ``proto://...`` otherwise."""
    fs, fs_root = resolve(root, storage_options)
    path = posixpath.join(fs_root, _check_relpath(relpath))
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_bytes(root: str, relpath: str, data: bytes, storage_options: dict[str, Any] | None = None) -> str:
    """Atomically write ``data`` to ``<root>/<relpath>`` (e.g. ``storyboard.png``); return its URL."""
    fs, fs_root = resolve(root, storage_options)
    path = posixpath.join(fs_root, _check_relpath(relpath))
    commit(fs, path, bytes(data))
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_manifest(root: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    """Atomically write ``manifest`` as ``<root>/manifest.json`` (sorted keys, indented); return its URL."""
    data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    return write_bytes(root, MANIFEST_NAME, data, storage_options)


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Return the parsed ``<root>/manifest.json``, or None when there is none yet."""
    fs, fs_root = resolve(root, storage_options)
    path = posixpath.join(fs_root, MANIFEST_NAME)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    manifest = json.loads(data.decode("utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: manifest is not a JSON object")
    return manifest
