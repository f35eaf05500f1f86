"""The peak resident set of this process, read so that a child process does not inherit its
parent's.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the wrong number for a process started by another: Linux
carries the old address space's high-water mark across ``execve`` into it (``signal->maxrss``),
and Python starts a child with ``vfork`` + ``execve``, whose old address space is the parent's. A
render in a child of a 1.5 GB pytest process then reports a 1.5 GB peak before it allocates
anything (``tests/test_memory_check.py`` measured 1341 MiB for a 550 + 470 MiB render that way).
``VmHWM`` of ``/proc/self/status`` belongs to the process's own address space and starts fresh at
``execve``; off Linux the ``ru_maxrss`` fallback is what there is.
"""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_resident_bytes", "resident_bytes"]


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_resident_bytes() -> int:
    """This process's peak resident set in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def resident_bytes() -> int | None:
    """This process's resident set now in bytes (``VmRSS``), None where there is no /proc."""
    return _status_bytes("VmRSS")
