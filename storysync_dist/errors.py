"""User-facing errors.

A ``StorySyncUserError`` means the input was wrong (a bad story file, a bad option), not that the
program is broken: the CLI prints ``str(err)`` as one line prefixed ``storysync: error: `` and exits
with code 2, without a traceback. Messages therefore have to stand on their own: they always name
the file, and where relevant the frame (id and 0-based index) or the option.
"""

from __future__ import annotations

__all__ = ["MissingWeightsError", "NonFiniteOutputError", "RenderError", "StorySpecError", "StorySyncUserError", "one_line"]


class StorySyncUserError(Exception):
    """A mistake in the user's input; reported as one line, exit code 2, no traceback."""


class StorySpecError(StorySyncUserError):
    """The story file is missing, unreadable, malformed, or does not fit the chosen model."""


class MissingWeightsError(StorySyncUserError):
    """A metric's weights are not on this machine (nothing is ever downloaded); one line."""


class RenderError(RuntimeError):
    """A render that ran but produced no usable frame; reported as one line, exit code 1."""


class NonFiniteOutputError(RenderError):
    """The denoiser produced NaN or infinite latents (a black frame that must not be recorded)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (for errors that quote a library's message)."""
    return " ".join(str(exc).split()) or type(exc).__name__
