"""Rendering on Ray: same pixels as in-process, one pipeline per (fake) GPU, fail-fast resource
checks, a worker killed mid-story, and resume. On the session's shared Ray head (conftest.py); the
in-process references render as a Ray worker does (tests/_pixels.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker
from _ray import KillAnchorsOnDispatch, crash_worker

from storysync_dist.api import JobResult, RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.distributed.executor import RayExecutor
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.run import run_job
from storysync_dist.errors import StorySyncUserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "story.yaml")
FAST = {"model": "tiny-sdxl", "steps": 3, "height": 64, "width": 64, "progress": False}
POOLED = {**FAST, "workers": 2, "device": "cpu", "resources_per_worker": {"CPU": 1}}


pytestmark = pytest.mark.usefixtures("ray_cluster")


def reference(story: str, out: Path, **settings) -> dict[str, np.ndarray]:
    """The story rendered in this process, as a Ray worker renders it."""
    with like_a_ray_worker():
        render_story(story, RenderOptions(out=str(out), **{**FAST, **settings}))
    return frame_pixels(out)


class Relay:
    """The shared pool's ``on_event``: hands each event to the hook the running test set."""

    def __init__(self) -> None:
        self.hook = None

    def __call__(self, kind: str, info: dict) -> None:
        if self.hook is not None:
            self.hook(kind, info)


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayExecutor, Relay]]:
    """Two workers for the tests that need a Ray render but not their own pool: their pipelines
    load once for the module (a pool serves any number of stories: see the pooled-executor test).
    They ask for CPUs only, so the head's two GPUs stay free for the tests that start their own."""
    relay = Relay()
    options = RenderOptions(out=str(tmp_path_factory.mktemp("pool")), **POOLED)
    with RayExecutor(options, on_event=relay) as executor:
        yield executor, relay


@pytest.fixture
def pool(shared_pool: tuple[RayExecutor, Relay]) -> Iterator[tuple[RayExecutor, Relay]]:
    yield shared_pool
    shared_pool[1].hook = None


def on_pool(story: str, out: Path, pool: tuple[RayExecutor, Relay], **options) -> JobResult:
    return render_story(story, RenderOptions(out=str(out), **POOLED, **options), executor=pool[0])


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return reference(EXAMPLE, tmp_path_factory.mktemp("w0") / "out")


def test_two_workers_render_the_same_pixels_as_in_process(tmp_path: Path, in_process) -> None:
    out = tmp_path / "w2"
    options = RenderOptions(out=str(out), workers=2, **FAST)
    with RayExecutor(options) as executor:
        # Both workers placed and loaded first: the job's stats list only placed workers, and this
        # story is small enough for one worker to finish it before the other is placed (one CI
        # run: the second worker's stats were {}).
        assert len(executor.warm_up()) == 2
        result = render_story(EXAMPLE, options, executor=executor)
    assert sorted(result.rendered) == sorted(in_process)
    assert_same_pixels(frame_pixels(out), in_process)
    # One pipeline per GPU: each worker got its own (fake) GPU.
    gpu_ids = [tuple(s["gpu_ids"]) for s in result.stats["worker_stats"]]
    assert len(gpu_ids) == 2 and all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    # Each worker pulled the anchor stream at most once, whatever the number of its frames.
    for s in result.stats["worker_stats"]:
        assert s["pulled_bytes"] <= result.stats["anchor_bytes"]
    assert sum(s["frames"] for s in result.stats["worker_stats"]) == 4  # the 4 non-anchor frames


def test_consistory_two_passes_on_ray_workers_render_the_in_process_pixels(tmp_path: Path, pool) -> None:
    """ConsiStory's pass-2 frames read only what the anchors published (both passes' steps, the
    injection outputs and references), so they spread over workers like any frame."""
    want = reference(EXAMPLE, tmp_path / "local", method="consistory")
    result = on_pool(EXAMPLE, tmp_path / "ray", pool, method="consistory")
    assert sorted(result.rendered) == sorted(want)
    assert_same_pixels(frame_pixels(tmp_path / "ray"), want)


def test_too_many_gpus_fails_fast_with_a_message(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w3"
    # Fast: the executor refuses before it asks Ray for any actor (no pipeline loads anywhere).
    with pytest.raises(StorySyncUserError, match=r"needs 3 GPUs.*has 2"):
        RayExecutor(RenderOptions(out=str(out), workers=3, **FAST))
    code = main(["render", EXAMPLE, "--model", "tiny-sdxl", "--out", str(out), "--workers", "5", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs 5 GPUs" in err and "\n" not in err
    assert not out.exists()


def long_story(tmp_path: Path, frames: int, story_id: str = "long-cat") -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    story = {
        "id": story_id,
        "subjects": [{"name": "cat", "description": "a ginger cat", "tokens": ["cat"]}],
        "defaults": {"steps": FAST["steps"], "height": FAST["height"], "width": FAST["width"], "seed": 3},
        "frames": [{"prompt": f"{{cat}} in scene number {k}"} for k in range(frames)],
    }
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def test_killing_a_worker_mid_story_loses_only_its_frame(tmp_path: Path, pool) -> None:
    story = long_story(tmp_path, 10)
    want = reference(story, tmp_path / "reference")

    out = tmp_path / "faulty"
    killed: list[str] = []
    dispatched: list[str] = []

    def kill_a_busy_worker(kind: str, info: dict) -> None:
        # The worker a frame was just handed to dies (the 3rd and the 6th frame handed out).
        if kind == "frame_dispatched":
            dispatched.append(info["frame"])
            if len(dispatched) in (3, 6):
                killed.append(info["frame"])
                crash_worker(info["worker"])  # Ray restarts it

    pool[1].hook = kill_a_busy_worker
    result = on_pool(story, out, pool)
    assert len(killed) == 2 and set(killed) <= set(result.stats["retried"])
    got = frame_pixels(out)  # asserts that no frame is there twice
    assert len(got) == 10 and sorted(result.rendered) == sorted(got)
    assert_same_pixels(got, want)
    assert_worker_threads(result.stats)


def test_resumed_job_renders_only_missing_frames(tmp_path: Path, in_process, pool) -> None:
    out = tmp_path / "resume"
    first = on_pool(EXAMPLE, out, pool, only=["garden", "home"])
    assert sorted(first.rendered) == ["garden", "home"]
    second = on_pool(EXAMPLE, out, pool)
    assert sorted(second.rendered) == ["beach", "kitchen", "market", "rooftop"]
    assert sorted(second.skipped) == ["garden", "home"]
    assert_same_pixels(frame_pixels(out), in_process)


def test_saved_anchors_are_reused_by_ray_workers(tmp_path: Path, in_process, pool) -> None:
    bank = tmp_path / "bank"
    first = on_pool(EXAMPLE, bank, pool, save_anchors=True, only=["beach"])
    bundle = bank / "anchors" / "ginger-cat.safetensors"
    assert first.anchor_bundle and bundle.is_file()
    # A second job with --anchors renders its frames on the workers without rendering anchors: the
    # driver puts the bundle's steps in the object store itself.
    reuse = tmp_path / "reuse"
    second = on_pool(EXAMPLE, reuse, pool, anchors=str(bundle), only=["market", "rooftop"])
    assert sorted(second.rendered) == ["market", "rooftop"] and "anchor_seconds" not in second.stats
    # The workers rendered them (their frame counts run from the pool's start).
    frames = [sum(s["frames"] for s in r.stats["worker_stats"]) for r in (first, second)]
    assert frames[1] - frames[0] == 2
    assert_same_pixels(frame_pixels(reuse), {k: in_process[k] for k in ("market", "rooftop")})
    assert_same_pixels(frame_pixels(bank), {"beach": in_process["beach"]})


def test_a_worker_dying_with_the_anchors_is_replaced_and_the_anchors_recomputed(tmp_path: Path) -> None:
    story = long_story(tmp_path, 3)
    want = reference(story, tmp_path / "reference")
    out = tmp_path / "anchor-fault"
    options = RenderOptions(out=str(out), workers=1, **FAST)
    hook = KillAnchorsOnDispatch("long-cat")
    executor = RayExecutor(options, on_event=hook)
    plan = prepare_job(story, options, device=executor.device)
    executor.warm_up()
    with hook.pause(executor.worker_names):
        result = run_job(plan, executor)
    executor.close()
    # The one worker died with the anchors; Ray restarted it, and it rendered them again.
    (name,) = executor.worker_names
    assert hook.killed == [name] and hook.dispatched == [(name, 1), (name, 2)]
    assert result.stats["anchor_attempts"] == 2
    assert sorted(result.rendered) == sorted(want)
    assert_same_pixels(frame_pixels(out), want)


def test_a_pooled_executor_keeps_its_workers_from_story_to_story(tmp_path: Path, in_process) -> None:
    story = long_story(tmp_path, 3)
    want = reference(story, tmp_path / "reference")

    options = RenderOptions(out=str(tmp_path / "pooled"), workers=2, **FAST)
    hook = KillAnchorsOnDispatch("long-cat-again")
    with RayExecutor(options, on_event=hook) as executor:
        first = render_story(EXAMPLE, options, executor=executor)
        pids = sorted(s["pid"] for s in first.stats["worker_stats"])
        second = render_story(story, options, executor=executor)
        # The same two processes rendered both stories: no pipeline was loaded twice.
        assert sorted(s["pid"] for s in second.stats["worker_stats"]) == pids
        assert len(executor.live_workers()) == 2
        # A third story whose anchors' worker dies with them: the next free worker renders them again.
        again = long_story(tmp_path / "again", 3, story_id="long-cat-again")
        third_out = tmp_path / "pooled-again"
        with hook.pause(executor.worker_names):
            third = render_story(again, RenderOptions(out=str(third_out), workers=2, **FAST), executor=executor)
        assert len(hook.killed) == 1 and third.stats["anchor_attempts"] == 2
    assert executor.live_workers() == []  # leaving the block stopped the pool
    assert sum(s["frames"] for s in second.stats["worker_stats"]) == 4 + 1  # counted since the pool started
    assert sorted(third.rendered) == sorted(want)

    both = frame_pixels(tmp_path / "pooled")
    assert_same_pixels({k: v for k, v in both.items() if k in in_process}, in_process)
    assert_same_pixels({k: v for k, v in both.items() if k not in in_process}, want)
    # Another story id, the same prompts and seeds: the same pixels.
    assert_same_pixels(frame_pixels(third_out), want)
