"""Damaged files, set aside: a file that cannot be read as a frame table (committed or staged) is moved to
``<root>/quarantine/`` (unless the sink is ``read_only``) and reported in ``damaged``; its frames then
count as missing.
"""

from __future__ import annotations

import posixpath
from typing import Any

from .layout import _STORY_DIR_RE, QUARANTINE_DIR

__all__ = ["set_aside"]


def set_aside(fs: Any, fs_root: str, path: str) -> str:
    """Move the damaged file ``path`` to ``<root>/quarantine/`` (into its story's folder there, when
    it was in one) and return where it went; it is never read again."""
    folder = posixpath.basename(posixpath.dirname(path))
    name = posixpath.basename(path)
    if _STORY_DIR_RE.match(folder):
        target = posixpath.join(fs_root, QUARANTINE_DIR, folder, name)
    else:
        target = posixpath.join(fs_root, QUARANTINE_DIR, name)
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    fs.mv(path, target)
    return target
