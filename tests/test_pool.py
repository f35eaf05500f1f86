"""The pool scheduler across stories: anchors of upcoming stories render while other stories'
frames do, frames start while their anchors stream, a killed worker costs only its call, and the
pixels are those of rendering each story in this process. On the session's shared Ray head."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker
from _ray import crash_worker

from storysync_dist.api import RenderOptions, render_stories, render_story
from storysync_dist.distributed.executor import RayExecutor

FAST = {"model": "tiny-sdxl", "steps": 4, "height": 64, "width": 64, "progress": False}
FRAMES = [3, 4, 3, 4]


pytestmark = pytest.mark.usefixtures("ray_cluster")


def write_story(folder: Path, story_id: str, frames: int, steps: int = 4) -> str:
    story = {
        "id": story_id,
        "subjects": [{"name": "fox", "description": "a red fox", "tokens": ["fox"]}],
        "defaults": {"steps": steps, "height": 64, "width": 64, "seed": sum(map(ord, story_id))},
        "frames": [{"id": f"s{k}", "prompt": f"{{fox}} in place number {k}"} for k in range(frames)],
    }
    path = folder / f"{story_id}.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def images(out: Path) -> dict:
    return frame_pixels(out, by_story=True)


def reference(paths: list[str], out: Path, **settings) -> dict:
    """The stories rendered one by one in this process, as a Ray worker renders them."""
    with like_a_ray_worker():
        for path in paths:
            render_story(path, RenderOptions(out=str(out), **{**FAST, **settings}))
    return images(out)


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict]:
    """Four stories of 3, 4, 3 and 4 frames (2 anchors each), and their pixels rendered one by
    one in this process. The odd frame counts matter: with an even number of frames ready at
    once, two workers stay in step and no anchors need to start while a frame renders."""
    folder = tmp_path_factory.mktemp("stories")
    paths = [write_story(folder, f"fox-{i}", FRAMES[i]) for i in range(4)]
    return paths, reference(paths, folder / "reference")


class Timeline:
    """The executor's events, with the time each arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, info: dict) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, info))

    def of(self, kind: str) -> list[dict]:
        return [info for _, k, info in self.events if k == kind]


def overlaps(timeline: Timeline) -> list[tuple[str, str]]:
    """(story whose anchors were rendering, story whose frame was rendering meanwhile on another
    worker) pairs: the two calls' [dispatched, done] intervals intersect."""
    spans: dict[tuple, list] = {}
    for when, kind, info in timeline.events:
        if kind in ("anchors_dispatched", "frame_dispatched"):
            key = ("anchors", info["story"], None) if kind == "anchors_dispatched" else ("frame", info["story"], info["frame"])
            spans[key] = [when, None, info["worker"]]
        elif kind == "anchors_done":
            spans[("anchors", info["story"], None)][1] = when
        elif kind == "frame_done":
            spans[("frame", info["story"], info["frame"])][1] = when
    anchors = [(k[1], *v) for k, v in spans.items() if k[0] == "anchors" and v[1] is not None]
    frames = [(k[1], *v) for k, v in spans.items() if k[0] == "frame" and v[1] is not None]
    return [(a, f) for a, a0, a1, aw in anchors for f, f0, f1, fw in frames
            if a != f and aw != fw and a0 < f1 and f0 < a1]


def test_the_pool_renders_anchors_while_other_stories_frames_render(tmp_path: Path, stories) -> None:
    paths, want = stories
    timeline = Timeline()
    options = RenderOptions(out=str(tmp_path / "pooled"), workers=2, **FAST)
    with RayExecutor(options, on_event=timeline) as executor:
        # Both pipelines loaded first: a worker that loads late would leave the other alone.
        assert sorted(executor.warm_up()) == sorted(executor.worker_names)
        results = list(render_stories(paths, options, executor=executor))
    assert sorted(r.story_id for r in results) == [f"fox-{i}" for i in range(4)]
    assert [len(r.rendered) for r in sorted(results, key=lambda r: r.story_id)] == FRAMES
    # Some story's anchors streamed while another story's frame was rendering on the other worker.
    # No race: with both workers ready, the first two stories' anchors go out at once (one per
    # worker); the driver sees one anchor stream end first and hands that worker a frame of its
    # story while the other stream is still open in the driver's view (its end, even if already
    # reached, is handled on a later turn of the loop), and the intervals are the driver's.
    assert overlaps(timeline), timeline.events
    # Both workers rendered, and the pool was reused: two processes for all four stories.
    pids = {s["pid"] for r in results for s in r.stats["worker_stats"] if s}
    assert len(pids) == 2
    busy = {i for r in results for i in r.stats["worker_busy_seconds"]}
    assert busy == {0, 1}  # each took one of the first two stories' anchors (see above)
    # The manifest records, per story, each worker's busy seconds on it (utilisation afterwards).
    manifest = json.loads((tmp_path / "pooled" / "manifest.json").read_text())
    recorded = [manifest["stories"][f"fox-{i}"]["render"] for i in range(4)]
    assert {w for r in recorded for w in r["worker_busy_seconds"]} == {"0", "1"}
    assert all(0 < sum(r["worker_busy_seconds"].values()) <= 2 * r["story_seconds"] + 1e-6 for r in recorded)
    assert_same_pixels(images(tmp_path / "pooled"), want)
    assert_worker_threads(results[0].stats)
    # A rerun into the finished dataset renders nothing.
    again = list(render_stories(paths, options))
    assert [len(r.skipped) for r in sorted(again, key=lambda r: r.story_id)] == FRAMES
    assert all(r.rendered == [] for r in again)


def test_frames_start_while_the_anchors_stream(tmp_path: Path) -> None:
    story = write_story(tmp_path, "long-fox", 6, steps=12)
    settings = {**FAST, "steps": 12}
    want = reference([story], tmp_path / "reference", steps=12)

    timeline = Timeline()
    options = RenderOptions(out=str(tmp_path / "streamed"), workers=2, **settings)
    with RayExecutor(options, on_event=timeline) as executor:
        # Load both pipelines first, so the second worker is free while the anchors render.
        assert len(executor.warm_up()) == 2
        result = render_story(story, options, executor=executor)
    # The other worker is free from the start, and the driver hands out work after each anchor
    # item it receives: so a frame goes out as soon as step 0 is published, whatever the speeds.
    kinds = [kind for _, kind, _ in timeline.events]
    early = [e for e in timeline.of("frame_dispatched") if e["story"] == "long-fox" and e["steps_published"] < 12]
    assert early, "no frame was handed out before the anchors finished"
    assert all(e["steps_published"] >= 1 for e in early)  # never before anchor step 0
    assert kinds.index("frame_dispatched") < kinds.index("anchors_done")
    assert kinds.index("anchor_step") < kinds.index("frame_dispatched")
    assert sorted(result.rendered) == [f"s{k}" for k in range(6)]
    stats = result.stats
    assert 0 < stats["anchor_first_step_seconds"] <= stats["first_non_anchor_seconds"] <= stats["story_seconds"]
    assert_same_pixels(images(tmp_path / "streamed"), want)


def test_a_worker_killed_during_overlapped_stories_loses_only_its_frame(tmp_path: Path, stories) -> None:
    paths, want = stories
    killed: list[tuple[str, str]] = []

    def kill_once(kind: str, info: dict) -> None:
        # Kill the worker of a frame of the second story as it is handed out: other stories are
        # open then (their anchors or frames on the other worker).
        if kind == "frame_dispatched" and info["story"] == "fox-1" and not killed:
            killed.append((info["story"], info["frame"]))
            crash_worker(info["worker"])  # Ray restarts it

    options = RenderOptions(out=str(tmp_path / "faulty"), workers=2, **FAST)
    with RayExecutor(options, on_event=kill_once) as executor:
        results = {r.story_id: r for r in render_stories(paths, options, executor=executor)}
    assert killed
    story_id, frame_id = killed[0]
    assert frame_id in results[story_id].stats["retried"]
    assert all(not r.stats.get("retried") for s, r in results.items() if s != story_id)
    assert_same_pixels(images(tmp_path / "faulty"), want)  # every frame once, same pixels


def test_frame_batches_on_the_pool_equal_the_same_batches_in_process(tmp_path: Path) -> None:
    story = write_story(tmp_path, "batched-fox", 7)  # 2 anchors, then batches of 2, 2 and 1
    settings = {**FAST, "frame_batch": 2}
    with like_a_ray_worker():
        local = render_story(story, RenderOptions(out=str(tmp_path / "reference"), **settings))
    assert local.stats["frame_batch"] == 2
    timeline = Timeline()
    # The workers also offload (diffusers' model offload hooks): the pixels stay the same.
    options = RenderOptions(out=str(tmp_path / "pooled"), workers=2, bundle_on="host", offload="model", **settings)
    with RayExecutor(options, on_event=timeline) as executor:
        result = render_story(story, options, executor=executor)
    assert sorted(result.rendered) == [f"s{k}" for k in range(7)]
    # Three calls for the five non-anchor frames, each handed out with its batch.
    batches = sorted(e["batch"] for e in timeline.of("frame_dispatched"))
    assert batches == [1, 2, 2, 2, 2]
    assert_same_pixels(images(tmp_path / "pooled"), images(tmp_path / "reference"))
    # With --bundle-on host no worker held more than two anchor steps on its device at once.
    peaks = [s["peak_resident_steps"] for s in result.stats["worker_stats"] if s]
    assert peaks and max(peaks) <= 2
    assert {p for s in result.stats["worker_stats"] if s for p in s["bundle_on"]} == {"host"}


def test_a_killed_worker_loses_only_its_batch_and_it_renders_again_whole(tmp_path: Path) -> None:
    story = write_story(tmp_path, "killed-batch", 6)  # 2 anchors, then batches of 2 and 2
    settings = {**FAST, "frame_batch": 2}
    want = reference([story], tmp_path / "reference", frame_batch=2)
    killed: list[list[str]] = []
    batch: list[str] = []

    def kill_first_batch(kind: str, info: dict) -> None:
        if kind != "frame_dispatched" or killed:
            return
        batch.append(info["frame"])
        if len(batch) == info["batch"]:  # the whole batch is out: kill the worker rendering it
            killed.append(list(batch))
            crash_worker(info["worker"])

    options = RenderOptions(out=str(tmp_path / "faulty"), workers=2, **settings)
    with RayExecutor(options, on_event=kill_first_batch) as executor:
        result = render_story(story, options, executor=executor)
    assert killed and len(killed[0]) == 2
    assert sorted(result.stats["retried"]) == sorted(killed[0])  # both frames of the batch, nothing else
    assert sorted(result.rendered) == [f"s{k}" for k in range(6)]
    assert_same_pixels(images(tmp_path / "faulty"), want)  # the same batches, once each
