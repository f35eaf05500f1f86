"""What a job writes besides the frames: the story's storyboard sheets and its manifest entry.

Both describe the story as it is now: only frames whose stored fingerprint is the current one,
in story order. The storyboard is built one sheet of thumbnails at a time, so its memory does not
grow with the story; it is only rebuilt when the job changed the story's frames. Each story's
manifest entry is its own file, rolled up into the dataset's ``manifest.json`` under a short lease
(``ManifestWriter``), so concurrent jobs on other stories never lose each other's entries; it is
written even when the storyboard fails.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import posixpath
import time
from typing import TYPE_CHECKING

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
from ..io.storage import resolve, url_of
from ..io.storyboard import storyboard_sheets

if TYPE_CHECKING:
    from .job import JobPlan

log = logging.getLogger("storysync")

__all__ = ["MANIFEST_FORMAT", "STORYBOARD_DIR", "STORY_ENTRY_DIR", "ManifestWriter", "story_entry_path",
           "write_story_outputs", "write_storyboards"]

MANIFEST_FORMAT = "storysync-dataset/2"
STORYBOARD_DIR = "storyboards"
STORY_ENTRY_DIR = "stories"
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


class ManifestWriter:
    """The dataset's manifest, kept at a cost that does not grow with the dataset.

    Each story's entry is its own file, ``stories/<story_id>.json``, written by the job that holds
    the story's lease (one small read and one small write per story). ``manifest.json`` is the
    roll-up of every entry (the file users and tools read): ``flush()`` merges the entries this job
    wrote into it under the short manifest lease, so concurrent jobs on other stories never lose
    each other's entries. A job of one story flushes when the story is done (as before); a job of
    many stories (``api.render_stories``) flushes every ``flush_every`` seconds and at its end, so
    the roll-up is rewritten a bounded number of times per job, not once per story. The roll-up is
    read once per job, for the entries of datasets written before per-story entries existed.
    """

    def __init__(self, out: str, storage_options: dict | None = None, *, flush_every: float | None = None) -> None:
        self.out = out
        self.storage_options = storage_options
        self.flush_every = flush_every
        self._rolled: dict | None = None
        self._pending: dict[str, dict] = {}
        self._last_flush = time.monotonic()

    def _rolled_up(self) -> dict:
        if self._rolled is None:
            self._rolled = read_manifest(self.out, storage_options=self.storage_options) or {}
        return self._rolled

    def previous(self, story_id: str) -> dict | None:
        """The story's entry as the dataset has it: its own file, else the roll-up's."""
        fs, root = resolve(self.out, self.storage_options)
        try:
            return json.loads(fs.cat_file(posixpath.join(root, story_entry_path(story_id))).decode("utf-8"))
        except FileNotFoundError:
            pass
        except (ValueError, UnicodeDecodeError):
            log.warning("unreadable manifest entry of %s; writing it again", story_id)
            return None
        return dict(self._rolled_up().get("stories", {})).get(story_id)

    def story_ids(self) -> set[str]:
        """The stories the roll-up and this job know of."""
        return {*self._rolled_up().get("stories", {}), *self._pending}

    def put(self, story_id: str, entry: dict, previous: dict | None) -> None:
        """Write the story's entry (unless it did not change) and queue it for the roll-up."""
        if previous is None or not _same_entry(previous, entry):
            write_bytes(self.out, story_entry_path(story_id), (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode(),
                        storage_options=self.storage_options)
        else:
            entry = previous
        rolled = dict(self._rolled_up().get("stories", {})).get(story_id)
        if rolled is None or not _same_entry(rolled, entry) or self._rolled_up().get("format") != MANIFEST_FORMAT:
            self._pending[story_id] = entry
        if self.flush_every is not None and time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> str:
        """Merge the queued entries into ``manifest.json`` under the manifest lease; return its URL."""
        self._last_flush = time.monotonic()
        url = url_of(self.out, MANIFEST_NAME, self.storage_options)
        if not self._pending:
            return url
        lease = Lease(self.out, "manifest", storage_options=self.storage_options, ttl=30.0,
                      purpose=f"manifest update for {len(self._pending)} story entries")
        try:
            lease.acquire(wait=MANIFEST_LEASE_WAIT)
        except LeaseHeldError as exc:
            raise RuntimeError(f"{self.out}: manifest.json stayed locked for {MANIFEST_LEASE_WAIT:.0f}s ({exc})") from None
        try:
            manifest = read_manifest(self.out, storage_options=self.storage_options) or {}
            stories = {**manifest.get("stories", {}), **self._pending}
            rolled = {"format": MANIFEST_FORMAT, "stories": stories}
            url = write_manifest(self.out, rolled, storage_options=self.storage_options)
            self._rolled, self._pending = rolled, {}
            write_dataset_card(self.out, self.storage_options)
            return url
        finally:
            lease.release()


DATASET_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/**/*.parquet
---
# A storysync-dist dataset

One row per rendered frame, in `data/<story_id>/part-*.parquet` (the `image` column is a Hugging
Face Image). `manifest.json` describes every story; `storyboards/` holds contact sheets. Read it
with `datasets.load_dataset("<this folder>")`, `pyarrow.dataset.dataset("<this folder>/data")` or
`ray.data.read_parquet("<this folder>/data")`.
"""


def write_dataset_card(out: str, storage_options: dict | None = None) -> None:
    """Write ``README.md`` at the dataset's root once: its ``configs`` tell Hugging Face
    ``datasets`` that the frames are ``data/**/*.parquet`` (without it, ``load_dataset(root)``
    would pick the storyboard PNGs, which can outnumber the compacted part files)."""
    fs, root = resolve(out, storage_options)
    path = posixpath.join(root, "README.md")
    if not fs.exists(path):
        write_bytes(out, "README.md", DATASET_CARD.encode("utf-8"), storage_options=storage_options)


def story_entry_path(story_id: str) -> str:
    """``stories/<story_id>.json``: the story's manifest entry (ids are validated)."""
    return f"{STORY_ENTRY_DIR}/{story_id}.json"


def _render_record(stats: dict) -> dict:
    keys = ("workers", "story_seconds", "anchor_seconds", "anchor_first_step_seconds", "first_non_anchor_seconds",
            "first_frame_seconds", "frame_batch", "bundle_on", "peak_resident_steps")
    record = {key: stats[key] for key in keys if stats.get(key) is not None}
    if "worker_busy_seconds" in stats:
        record["worker_busy_seconds"] = {str(k): v for k, v in stats["worker_busy_seconds"].items()}
    return record if len(record) > 1 or "worker_busy_seconds" in record else {}


def _same_entry(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "updated"} == {k: v for k, v in b.items() if k != "updated"}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_story_outputs(sink: ParquetFrameSink, plan: JobPlan, stats: dict, *, changed: bool,
                        removed: list[str], manifest: ManifestWriter | None = None) -> tuple[str, str]:
    """Write the storyboard sheets and this story's manifest entry from what the dataset holds.

    ``manifest`` is the job's ``ManifestWriter`` (a job of many stories shares one); without one,
    the entry is rolled up into ``manifest.json`` at once."""
    spec, options = plan.spec, plan.options
    stored = sink.existing(spec.id)
    done = {f.id for f in spec.frames if any(r.fingerprint == plan.fingerprints[f.id] for r in stored.get(f.id, []))}
    root_url = sink.url(sink._fs_root)
    board: dict[str, str] = {}

    def entry_for(previous: dict | None, stories: set[str]) -> dict:
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
            # How the last job that rendered frames of the story spent its workers' time (seconds):
            # busy time per worker index on this story's calls, the story's wall time, when its
            # first anchor step and first non-anchor frame came (a job that renders nothing keeps it).
            "render": _render_record(stats) or previous.get("render", {}),
            "damaged": list(sink.damaged),
            "updated": now_iso(),
        }

    own = manifest is None
    writer = manifest or ManifestWriter(options.out, options.storage_options)
    try:
        previous = writer.previous(spec.id)
        writer.put(spec.id, entry_for(previous, writer.story_ids() | {spec.id}), previous)
        url = writer.flush() if own else url_of(options.out, MANIFEST_NAME, options.storage_options)
    except OSError as exc:
        raise StorySyncUserError(f"--out {options.out}: cannot write the manifest ({one_line(exc)})") from None
    return board.get("url", ""), url
