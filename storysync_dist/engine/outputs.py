"""What a job writes besides the frames: the story's storyboard sheets and its manifest entry.

Both describe the story as it is now: only frames whose stored fingerprint is the current one,
in story order. The storyboard is built one sheet of thumbnails at a time, so its memory does not
grow with the story; it is only rebuilt when the job changed the story's frames. The manifest is
shared by every story of a dataset: it is updated (read, one entry replaced, written) under a short
lease, so concurrent jobs on other stories never lose each other's entries, and it is written even
when the storyboard fails.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import posixpath
from typing import TYPE_CHECKING, Any

from ..io.lease import Lease, LeaseHeldError
from ..io.sink import ParquetFrameSink, read_manifest, write_bytes, write_manifest
from ..io.storyboard import storyboard_sheets

if TYPE_CHECKING:
    from .job import JobPlan

log = logging.getLogger("storysync")

__all__ = ["MANIFEST_FORMAT", "STORYBOARD_DIR", "update_manifest", "write_storyboards"]

MANIFEST_FORMAT = "storysync-dataset/2"
STORYBOARD_DIR = "storyboards"
FRAMES_PER_SHEET = 48
MANIFEST_LEASE_WAIT = 120.0


def sheet_path(story_id: str, number: int) -> str:
    """``storyboards/<id>.png`` for the first sheet, ``storyboards/<id>-p002.png`` on."""
    return f"{STORYBOARD_DIR}/{story_id}.png" if number == 0 else f"{STORYBOARD_DIR}/{story_id}-p{number + 1:03d}.png"


def write_storyboards(sink: ParquetFrameSink, plan: JobPlan, previous: list[str]) -> list[str]:
    """Write the story's storyboard sheets; return their paths relative to the dataset root.

    Sheets that an earlier, longer version of the story had and this one has not are deleted.
    """
    spec, options = plan.spec, plan.options
    wanted = {frame.id: plan.fingerprints[frame.id] for frame in spec.frames}

    def tiles():
        for row in sink.iter_rows(spec.id, wanted, ["prompt", "image", "mask"]):
            yield f"{row['frame_id']}: {row['prompt']}", row["image"]["bytes"], row["mask"]

    written: list[str] = []
    for number, sheet in enumerate(storyboard_sheets(tiles(), per_sheet=FRAMES_PER_SHEET)):
        relpath = sheet_path(spec.id, number)
        write_bytes(options.out, relpath, sheet, storage_options=options.storage_options)
        written.append(relpath)
    for old in previous:
        if old not in written and old.startswith(f"{STORYBOARD_DIR}/"):
            with contextlib.suppress(FileNotFoundError):
                sink.fs.rm(posixpath.join(sink._fs_root, old))
    return written


def update_manifest(plan: JobPlan, entry_for: Any) -> str:
    """Replace this story's entry of ``manifest.json`` under the manifest lease; return its URL.

    ``entry_for(previous_entry_or_None, stories)`` builds the new entry (it may write files).
    """
    options = plan.options
    lease = Lease(options.out, "manifest", storage_options=options.storage_options, ttl=30.0,
                  purpose=f"manifest update for story {plan.spec.id}")
    try:
        lease.acquire(wait=MANIFEST_LEASE_WAIT)
    except LeaseHeldError as exc:
        raise RuntimeError(f"{options.out}: manifest.json stayed locked for {MANIFEST_LEASE_WAIT:.0f}s ({exc})") from None
    try:
        manifest = read_manifest(options.out, storage_options=options.storage_options) or {}
        stories = dict(manifest.get("stories", {}))
        entry = entry_for(stories.get(plan.spec.id), stories)
        stories[plan.spec.id] = entry
        return write_manifest(options.out, {"format": MANIFEST_FORMAT, "stories": stories},
                              storage_options=options.storage_options)
    finally:
        lease.release()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
