"""How the driver tells why an actor failed: one line from what ``ray.get`` raised, and whether
it was the user's mistake (a bad ``--model`` or ``--device``), which makes the job exit with 2."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from ..errors import StorySyncUserError
from ..models.presets import UnknownModelError

__all__ = ["UNKNOWN_HOST", "Failure", "describe_actors", "failure_of"]

_SUMMARY_CHARS = 300
UNKNOWN_HOST = "?"


@dataclass(frozen=True)
class Failure:
    """Why an actor failed, in one line; ``user`` is the message when it was the user's mistake;
    ``exc`` the exception itself (chained to the job's error, so the log shows its traceback)."""

    summary: str
    user: str | None = None
    at_start: bool = False
    exc: BaseException | None = field(default=None, compare=False, repr=False)


def describe_actors(actors: list[Any]) -> str:
    """``"workers 0, 1 on host-a"``, ``"the anchor actor on host-a"``."""
    hosts = {a.host for a in actors}
    if len(hosts) == 1 and UNKNOWN_HOST not in hosts and all(a.role == "worker" for a in actors):
        label = "workers" if len(actors) > 1 else "worker"
        return f"{label} {', '.join(str(a.index) for a in actors)} on {hosts.pop()}"
    return ", ".join(f"{a.name} on {a.host}" if a.host != UNKNOWN_HOST else f"{a.name} (never placed)"
                     for a in actors)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a Python traceback: "module.ExceptionType: message" at column 0.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*): (.*)$")


def _one_line(text: str) -> str:
    line = " ".join(_ANSI.sub("", text).split())
    return line if len(line) <= _SUMMARY_CHARS else line[: _SUMMARY_CHARS - 3] + "..."


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return _one_line(line)
    return ""


def failure_of(exc: BaseException) -> Failure:
    """One line from an exception that ``ray.get`` raised: the cause's type and first line."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None) or exc
        summary = f"{type(cause).__name__}: {_first_line(str(cause))}"
        message = " ".join(str(cause).split())  # a user's error stays whole
        if isinstance(cause, StorySyncUserError):
            return Failure(summary, user=message, exc=exc)
        if isinstance(cause, UnknownModelError):
            return Failure(summary, user=f"--model: {message}", exc=exc)
        return Failure(summary, exc=exc)
    if isinstance(exc, RayActorError):
        return Failure(f"{type(exc).__name__}: {_actor_error_line(exc)}", exc=exc)
    return Failure(f"{type(exc).__name__}: {_first_line(str(exc))}", exc=exc)


def _actor_error_line(exc: RayActorError) -> str:
    """The informative line of an actor error's text.

    Ray 2.60 keeps only text: for a death in ``__init__`` a traceback, whose exception line is
    what went wrong; for a process that died, a header, tab-indented fields (class_name, pid, ip)
    and then the reason.
    """
    lines = [line for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return "no message"
    if getattr(exc, "actor_init_failed", False):
        for i in range(len(lines) - 1, 0, -1):
            if lines[i - 1].startswith("    ") and (match := _EXCEPTION_LINE.match(lines[i])):
                return _one_line(f"{match.group(1)}: {match.group(2)}")
    fields = [i for i, line in enumerate(lines) if line.startswith("\t")]
    if fields and fields[-1] + 1 < len(lines):
        return _one_line(lines[fields[-1] + 1])
    return _one_line(lines[0])
