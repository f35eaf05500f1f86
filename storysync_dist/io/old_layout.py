"""Old datasets (the flat ``data/part-<story_id>-<index>-<hash>.parquet`` layout): the first time a
writing sink lists a story, it MOVES that story's flat parts into the story's folder (``fs.mv``:
a rename locally, atomic; a copy then a delete on an object store, where a globbing reader can see
a moved part twice for that moment). Read-only sinks and readers read flat parts where they are.
To find flat parts a sink lists ``data/`` once, unless the layout marker says none is left; a
writing sink writes the marker when its listing of ``data/`` found no flat part of any story.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Callable
from typing import Any

from .layout import _FLAT_RE, LAYOUT_MARKER

__all__ = ["OldLayout"]

log = logging.getLogger("storysync")


class OldLayout:
    """The flat parts of the old layout under one ``data/`` folder, as one sink sees them:
    ``parts`` finds a story's, ``migrate`` moves them into its folder, ``write_marker_if_clean``
    records that none is left. ``commit(path, data)`` writes the marker; ``url`` shows a path."""

    def __init__(self, fs: Any, data_dir: str, *, read_only: bool, url: Callable[[str], str],
                 commit: Callable[[str, bytes], None]) -> None:
        self.fs = fs
        self.data_dir = data_dir
        self.read_only = read_only
        self.url = url
        self.commit = commit
        # story id -> flat parts of the old layout; None until data/ was looked at.
        self._flat: dict[str, list[str]] | None = None
        self._marker_present = False

    def refresh(self) -> None:
        """Forget what was listed: the next ``parts`` lists ``data/`` again."""
        self._flat = None

    def parts(self, story_id: str) -> list[str]:
        """Flat parts of ``story_id`` (one listing of ``data/`` per sink, none once the layout
        marker is there)."""
        if self._flat is None:
            self._flat = {}
            marker = posixpath.join(self.data_dir, LAYOUT_MARKER)
            try:
                self._marker_present = bool(self.fs.exists(marker))
            except OSError:
                self._marker_present = False
            if not self._marker_present:
                with contextlib.suppress(Exception):
                    self.fs.invalidate_cache(self.data_dir)
                try:
                    entries = self.fs.ls(self.data_dir, detail=False)
                except (FileNotFoundError, NotADirectoryError):
                    entries = []
                for entry in entries:
                    match = _FLAT_RE.match(posixpath.basename(entry))
                    if match:
                        self._flat.setdefault(match["story"], []).append(entry)
        return list(self._flat.get(story_id, []))

    def write_marker_if_clean(self) -> None:
        """Once a writing sink saw no flat part of any story left, record that (saves the next
        sinks the listing of ``data/``)."""
        if self.read_only or self._marker_present or self._flat is None or any(self._flat.values()):
            return
        data = (json.dumps({"layout": "data/<story_id>/part-*.parquet", "version": 3}) + "\n").encode()
        self.commit(posixpath.join(self.data_dir, LAYOUT_MARKER), data)
        self._marker_present = True

    def migrate(self, story_id: str, folder: str) -> None:
        """Move the story's flat parts into ``folder``, its story folder (same index and hash)."""
        flat = self.parts(story_id)
        if not flat:
            return
        self.fs.makedirs(folder, exist_ok=True)
        for path in flat:
            match = _FLAT_RE.match(posixpath.basename(path))
            assert match is not None
            digest = (match["hash"] * 2)[:16] if len(match["hash"]) < 16 else match["hash"][:16]
            target = posixpath.join(folder, f"part-{match['index']}-{digest}.parquet")
            try:
                self.fs.mv(path, target)
            except FileNotFoundError:
                pass
            log.info("moved %s to %s (story folders layout)", self.url(path), self.url(target))
        assert self._flat is not None
        self._flat.pop(story_id, None)
