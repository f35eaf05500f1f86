"""Leases on an output location: one job at a time writes a story, and the manifest.

A lease is a small JSON file under ``<root>/_locks/`` created with an exclusive create (a hard link
locally, a conditional PUT on S3), holding who owns it and when it was last renewed. The owner
renews it every ``ttl / 3`` seconds from a background thread and deletes it when done. Another job
finds it there and is refused with a message naming the holder; a lease is broken (deleted and
taken) only when it is stale: its holder ran on this host and its process is gone, or it was not
renewed for ``ttl`` seconds (a crashed job on another machine). So a rerun after a crash goes
ahead at once on the same machine, and after at most ``ttl`` elsewhere.

Clocks of different machines are compared through the renewal times, so the ttl must be much
longer than their skew; the default is two minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from .storage import commit, create_exclusive, resolve

__all__ = ["LOCK_DIR", "Lease", "LeaseHeldError"]

log = logging.getLogger("storysync")

LOCK_DIR = "_locks"
DEFAULT_TTL = 120.0


class LeaseHeldError(RuntimeError):
    """Another live job holds the lease."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class Lease:
    """An exclusive, renewed lease named ``name`` under ``<root>/_locks/``.

    Use as a context manager, or ``acquire()`` / ``release()``. ``acquire(wait=s)`` retries for
    up to ``s`` seconds while a live holder has it (for short critical sections such as the
    manifest update); with ``wait=0`` a held lease raises :class:`LeaseHeldError` at once.
    """

    def __init__(
        self,
        root: str,
        name: str,
        *,
        storage_options: dict[str, Any] | None = None,
        ttl: float = DEFAULT_TTL,
        purpose: str = "",
    ) -> None:
        self.fs, fs_root = resolve(root, storage_options)
        self.root = root
        self.path = posixpath.join(fs_root, LOCK_DIR, f"{name}.lock")
        self.ttl = float(ttl)
        self.purpose = purpose
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # -- the lease file -----------------------------------------------------------------------------
    def _content(self) -> bytes:
        now = time.time()
        return json.dumps(
            {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
             "acquired": getattr(self, "_acquired", now), "renewed": now, "ttl": self.ttl},
            sort_keys=True,
        ).encode("utf-8")

    def _read(self) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(posixpath.dirname(self.path))
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            holder = None
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return True
        renewed = holder.get("renewed")
        ttl = holder.get("ttl", self.ttl)
        if not isinstance(renewed, (int, float)) or not isinstance(ttl, (int, float)):
            # Unreadable (or still being written by its creator): judge by the file's age.
            try:
                info = self.fs.info(self.path)
                modified = info.get("mtime") or info.get("LastModified") or info.get("created")
                renewed = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
            except Exception:
                return False
            ttl = self.ttl
        return time.time() - float(renewed) > float(ttl)

    def describe(self, holder: dict[str, Any]) -> str:
        """How a holder reads in an error message."""
        parts = []
        if holder.get("purpose"):
            parts.append(str(holder["purpose"]))
        if holder.get("host") or holder.get("pid"):
            parts.append(f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}")
        renewed = holder.get("renewed")
        if isinstance(renewed, (int, float)):
            ago = max(0.0, time.time() - renewed)
            expires = max(0.0, float(holder.get("ttl", self.ttl)) - ago)
            parts.append(f"renewed {ago:.0f}s ago, expires in {expires:.0f}s unless renewed")
        return "; ".join(parts) or "unknown holder"

    # -- acquire / renew / release ----------------------------------------------------------------
    def acquire(self, wait: float = 0.0) -> Lease:
        """Take the lease, breaking a stale one; raise :class:`LeaseHeldError` if a live job has
        it after ``wait`` seconds. OS errors (no such bucket, no permission) propagate."""
        deadline = time.monotonic() + wait
        self._acquired = time.time()
        delay = 0.05
        vanished = 0
        while True:
            if create_exclusive(self.fs, self.path, self._content()):
                break
            holder = self._read()
            if holder is None:
                # Released between our attempt and the read: try again (a filesystem that keeps
                # saying "exists" for a file it cannot show would otherwise spin here).
                vanished += 1
                if vanished > 100:
                    raise OSError(f"{self.path}: exclusive create keeps failing, yet the file is not there")
                continue
            if self._stale(holder):
                log.warning("breaking the stale lease %s (%s)", self.path, self.describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeldError(self.describe(holder), holder)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.path}", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                holder = self._read()
                if holder is None or holder.get("owner") != self.owner:
                    log.warning("lease %s was taken by another job (%s)", self.path,
                                self.describe(holder or {}))
                    return
                commit(self.fs, self.path, self._content())
            except Exception as exc:  # a missed renewal is retried; the ttl leaves room
                log.warning("could not renew lease %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.held = False
        with contextlib.suppress(Exception):
            holder = self._read()
            if holder is not None and holder.get("owner") == self.owner:
                self.fs.rm(self.path)
        # Leave no empty _locks/ folder behind on a local disk.
        with contextlib.suppress(OSError):
            if isinstance(self.fs, LocalFileSystem):
                os.rmdir(posixpath.dirname(self.path))

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
