"""The free memory a render is checked against (``engine.memory``): ``torch.cuda.mem_get_info``
on a GPU, ``MemAvailable`` of ``/proc/meminfo`` on a CPU, capped by ``STORYSYNC_MEMORY_LIMIT``
(bytes, or with a K/M/G/T suffix, powers of 1024) when it is set: for a user who shares the
machine, and for tests. Where Ray workers render, ``distributed.memory_probe`` reads it there."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import StorySyncUserError
from ..sizes import parse_size

__all__ = ["GIB", "MEMORY_LIMIT_ENV", "MIB", "FreeMemory", "cap_free", "device_free", "device_type", "format_bytes",
           "free_memory", "host_available", "memory_limit"]

MEMORY_LIMIT_ENV = "STORYSYNC_MEMORY_LIMIT"
GIB = 1024**3
MIB = 1024**2


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB (two decimals) or MiB."""
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def device_type(device: str) -> str:
    """``cuda`` of ``cuda:1``."""
    return device.split(":")[0]


@dataclass(frozen=True)
class FreeMemory:
    """Free bytes of the device a worker renders on, where that was read, and whether
    ``STORYSYNC_MEMORY_LIMIT`` capped it."""

    bytes: int
    where: str
    capped: bool = False

    def describe(self) -> str:
        return f"{format_bytes(self.bytes)} free on {self.where}" + (f" ({MEMORY_LIMIT_ENV})" if self.capped else "")


def memory_limit() -> int | None:
    """``STORYSYNC_MEMORY_LIMIT`` in bytes (``8589934592``, ``8G``, ``512MiB``), or None when unset;
    a value that is not a size is a one-line user error."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError:
        raise StorySyncUserError(f"{MEMORY_LIMIT_ENV}={text!r}: not a size in bytes (e.g. 8589934592, 8G, 512MiB)") from None


def cap_free(free: int | None, where: str) -> FreeMemory | None:
    """``free`` bytes read at ``where``, capped by ``STORYSYNC_MEMORY_LIMIT``; None when unknown and uncapped."""
    limit = memory_limit()
    if limit is not None and (free is None or limit < free):
        return FreeMemory(limit, where, capped=True)
    return FreeMemory(free, where) if free is not None else None


def host_available() -> int | None:
    """Bytes of RAM available to a new allocation: ``MemAvailable`` of /proc/meminfo (Linux), else
    free pages (``os.sysconf``), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def device_free(device: str) -> int | None:
    """Free bytes of ``device`` as this process sees it (None where it cannot tell: MPS, ...)."""
    kind = device_type(device)
    if kind == "cpu":
        return host_available()
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def free_memory(device: str) -> FreeMemory | None:
    """The free memory of ``device`` in this process, capped by ``STORYSYNC_MEMORY_LIMIT``."""
    return cap_free(device_free(device), device)
