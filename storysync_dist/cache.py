"""Where storysync keeps what it makes or fetches once (presets, eval models, prompt suites).

A leaf module, like ``errors``: every layer may ask it, and it imports nothing of the project.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["cache_root"]


def cache_root() -> pathlib.Path:
    """Root of storysync's on-disk cache: ``$STORYSYNC_CACHE``, else ``~/.cache/storysync``."""
    env = os.environ.get("STORYSYNC_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "storysync"
