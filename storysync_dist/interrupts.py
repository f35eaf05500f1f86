"""SIGINT and SIGTERM with a clear end: stop, keep what is complete, say so in one line, exit 130/143.

A command (``arguments.run_command``) runs its body inside :func:`signals_interrupt`: the first
SIGINT (Ctrl-C) or SIGTERM (``ray job stop``, a Kubernetes eviction, ``kill``) raises
:class:`Interrupted` in the main thread, wherever it is waiting (``ray.wait``, a frame in torch,
a part-file write). ``Interrupted`` is a ``BaseException``, like ``KeyboardInterrupt``, so no
``except Exception`` swallows it; the engine's ``except BaseException`` paths do what a failure
does: the stories that are open commit the frames written so far, write their manifest entry
(``complete: false``) and let go of their lease, and the Ray pool kills its actors (the frames in
flight are dropped: a rerun renders them). The layer that knows what the job wrote fills in
:attr:`Interrupted.summary` on the way out (:func:`note_written`), and the command prints one line
and exits ``128 + signal``: 130 for SIGINT, 143 for SIGTERM.

Further signals while that cleanup runs are ignored, so a second Ctrl-C cannot leave a lease
held or a part file half committed; a third one ends the process at once (``os._exit``), for a
cleanup that hangs. Ray's ``ray.init`` puts its own SIGTERM handler in place (it exits with
``sys.exit(15)``, status 15); :func:`reclaim_sigterm` takes it back after Ray starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = [
    "Interrupted", "exit_code", "interrupted_line", "note_written", "print_interrupted", "reclaim_sigterm",
    "signal_of", "signals_interrupt",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER = 3  # the signal that ends the process at once, counting from the first


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop by ``signum``; ``summary`` says what was written.

    A ``KeyboardInterrupt``: Ray's C++ waits (``ray.wait``, ``ray.get``) check for signals and
    turn a ``KeyboardInterrupt`` raised by a handler into one of their own (any other exception
    there becomes a ``SystemError``), so what reaches the command may be a plain
    ``KeyboardInterrupt``; :func:`signal_of` recovers the signal from the handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.summary: str | None = None

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The shell's status of a process ended by ``signum``: 128 + its number."""
    return 128 + int(signum)


class _Handler:
    def __init__(self) -> None:
        self.received = 0
        self.first: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.received == 1:
            self.first = signum
            raise Interrupted(signum)
        if self.received >= FORCE_AFTER:
            os.write(2, b"interrupted again: stopping at once, without cleaning up\n")
            os._exit(exit_code(signum))
        # The first one is being handled: the cleanup it started must run to its end.


_active: _Handler | None = None


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (see the module docstring).

    Only the main thread can own signal handlers: elsewhere (a notebook's worker thread, a test
    runner) the block changes nothing, and Ctrl-C stays Python's ``KeyboardInterrupt``."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, handler)
    _active = handler
    try:
        yield
    finally:
        _active = None
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def reclaim_sigterm() -> None:
    """Put this module's SIGTERM handler back after ``ray.init`` replaced it (when one is active)."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _active)


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind ``exc``: its own, else the first one the active handler took, else SIGINT."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if _active is not None and _active.first is not None:
        return _active.first
    return int(signal.SIGINT)


def note_written(exc: KeyboardInterrupt, summary: str) -> None:
    """Record on ``exc`` what the interrupted job wrote, unless an inner layer already did."""
    if getattr(exc, "summary", None) is None:
        exc.summary = summary  # type: ignore[attr-defined]


def interrupted_line(prog: str, exc: KeyboardInterrupt) -> str:
    """The one line a command prints when it was interrupted."""
    what = getattr(exc, "summary", None) or "nothing was written"
    name = signal.Signals(signal_of(exc)).name
    return f"{prog}: interrupted ({name}): {what}; run the same command again to finish"


def print_interrupted(prog: str, exc: KeyboardInterrupt) -> int:
    """Print the line of :func:`interrupted_line` to stderr; return the exit code (130, 143)."""
    print(interrupted_line(prog, exc), file=sys.stderr, flush=True)
    return exit_code(signal_of(exc))
