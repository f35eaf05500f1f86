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
import json
import logging
import posixpath
from typing import TYPE_CHECKING, Any

from ..errors import StorySyncUserError, one_line
from ..io.lease import Lease, LeaseHeldError
from ..io.sink import (
    MANIFEST_NAME,
    STORYBOARD_NAME,
    ParquetFrameSink,
    read_manifest,
    write_bytes,
    write_manifest,
)
from ..io.storage import url_of
from ..io.storyboard import storyboard_sheets

if TYPE_CHECKING:
    from .job import JobPlan

log = logging.getLogger("storysync")

__all__ = ["MANIFEST_FORMAT", "STORYBOARD_DIR", "update_manifest", "write_story_outputs", "write_storyboards"]

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
        previous = stories.get(plan.spec.id)
        entry = entry_for(previous, stories)
        if previous is not None and manifest.get("format") == MANIFEST_FORMAT and _same_entry(previous, entry):
            # Nothing changed (a rerun into a finished dataset): leave the file alone.
            return url_of(options.out, MANIFEST_NAME, options.storage_options)
        stories[plan.spec.id] = entry
        return write_manifest(options.out, {"format": MANIFEST_FORMAT, "stories": stories},
                              storage_options=options.storage_options)
    finally:
        lease.release()


def _same_entry(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "updated"} == {k: v for k, v in b.items() if k != "updated"}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_story_outputs(sink: ParquetFrameSink, plan: JobPlan, stats: dict, *, changed: bool,
                        removed: list[str]) -> tuple[str, str]:
    """Write the storyboard sheets and this story's manifest entry from what the dataset holds."""
    spec, options = plan.spec, plan.options
    stored = sink.existing(spec.id)
    done = {f.id for f in spec.frames if any(r.fingerprint == plan.fingerprints[f.id] for r in stored.get(f.id, []))}
    root_url = sink.url(sink._fs_root)
    board: dict[str, str] = {}

    def entry_for(previous: dict | None, stories: dict) -> dict:
        previous = previous or {}
        sheets = list(previous.get("storyboards") or [])
        before = {f.get("id"): (f.get("fingerprint"), f.get("done")) for f in previous.get("frames", [])}
        now = {f.id: (plan.fingerprints[f.id], f.id in done) for f in spec.frames}
        redrawn = changed or not sheets or before != now
        if redrawn:
            try:
                sheets = write_storyboards(sink, plan, sheets)
            except Exception as exc:  # the manifest matters more than the picture
                log.warning("storyboard of %s not written: %s", spec.id, one_line(exc))
                sheets = []
        root_board = posixpath.join(sink._fs_root, STORYBOARD_NAME)
        if sheets and set(stories) <= {spec.id} and (redrawn or not sink.fs.exists(root_board)):
            # storyboard.png at the root is the first sheet of a single-story dataset.
            first = sink.fs.cat_file(f"{sink._fs_root}/{sheets[0]}")
            board["url"] = write_bytes(options.out, STORYBOARD_NAME, first, storage_options=options.storage_options)
        elif sheets and set(stories) <= {spec.id}:
            board["url"] = sink.url(root_board)
        elif sheets:
            board["url"] = posixpath.join(root_url, sheets[0])
        return {
            "source": spec.source,
            "model": options.model,
            "model_revision": plan.settings.model_revision,
            "dtype": plan.settings.dtype,
            "method": options.method,
            # The resolved settings, exactly the frames' ``config`` column: method, model, dtype,
            # steps, size, guidance and negative prompt (model defaults filled in), the anchors and
            # the StorySync config; then where the config came from, for the record.
            "config": json.loads(plan.config_json),
            "config_sources": {
                "story": spec.storysync,
                "python_config": options.config.to_dict() if options.config is not None else None,
                "ablation": options.ablation,
                "set": dict(options.overrides or {}),
            },
            "anchors": plan.anchor_ids,
            "storyboard": sheets[0] if sheets else None,
            "storyboards": sheets,
            "complete": len(done) == len(spec.frames),
            "frames": [
                {"id": f.id, "index": f.index, "prompt": f.prompt, "seed": f.seed, "done": f.id in done,
                 "stale": f.id in stored and f.id not in done, "is_anchor": f.id in plan.anchor_ids,
                 "fingerprint": plan.fingerprints[f.id]}
                for f in spec.frames
            ],
            "removed": removed,
            "devices": stats.get("devices", previous.get("devices", [])),
            "damaged": list(sink.damaged),
            "updated": now_iso(),
        }

    try:
        manifest = update_manifest(plan, entry_for)
    except OSError as exc:
        raise StorySyncUserError(f"--out {options.out}: cannot write the manifest ({one_line(exc)})") from None
    return board.get("url", ""), manifest
