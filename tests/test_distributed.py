"""Rendering on Ray: same pixels as in-process, one pipeline per (fake) GPU, fail-fast resource
checks, a worker killed mid-story, and resume. One local Ray cluster for the whole module."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.distributed.executor import NAMESPACE, RayExecutor
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.run import run_job
from storysync_dist.errors import StorySyncUserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "story.yaml")
FAST = {"model": "tiny-sdxl", "steps": 5, "height": 128, "width": 128, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # Two fake GPUs: actors are scheduled by GPU, and render on the CPU (no CUDA here).
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING)
    # The in-process references render with one torch thread, as each Ray worker does, so both
    # round the same way (with several threads CPU reductions round differently in the last bit,
    # and on the tiny random model's near-tie RFH matches that moves a few pixels by a level).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("w0") / "out"
    render_story(EXAMPLE, RenderOptions(out=str(out), **FAST))
    return images(out)


def images(out: Path) -> dict[str, np.ndarray]:
    rows = pq.read_table(out / "data").to_pylist()
    return {r["frame_id"]: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).astype(np.int16) for r in rows}


def assert_same_pixels(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    # Equal within float tolerance (both sides run torch with one thread here; see ray_cluster).
    assert set(a) == set(b)
    for frame_id in a:
        diff = np.abs(a[frame_id] - b[frame_id])
        assert diff.max() <= 2 and diff.mean() < 0.05, frame_id


def test_two_workers_render_the_same_pixels_as_in_process(tmp_path: Path, in_process) -> None:
    out = tmp_path / "w2"
    result = render_story(EXAMPLE, RenderOptions(out=str(out), workers=2, **FAST))
    assert sorted(result.rendered) == sorted(in_process)
    assert_same_pixels(images(out), in_process)
    # One pipeline per GPU: each worker got its own (fake) GPU.
    gpu_ids = [tuple(s["gpu_ids"]) for s in result.stats["worker_stats"]]
    assert len(gpu_ids) == 2 and all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    # Each worker pulled the anchor stream at most once, whatever the number of its frames.
    for s in result.stats["worker_stats"]:
        assert s["pulled_bytes"] <= result.stats["anchor_bytes"]
    assert sum(s["frames"] for s in result.stats["worker_stats"]) == 4  # the 4 non-anchor frames


def test_too_many_gpus_fails_fast_with_a_message(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w3"
    start = time.perf_counter()
    with pytest.raises(StorySyncUserError, match=r"needs 3 GPUs.*has 2"):
        render_story(EXAMPLE, RenderOptions(out=str(out), workers=3, **FAST))
    code = main(["render", EXAMPLE, "--model", "tiny-sdxl", "--out", str(out), "--workers", "5", "--no-progress"])
    assert code == 2 and "needs 5 GPUs" in capsys.readouterr().err
    assert time.perf_counter() - start < 30
    assert not out.exists()


def long_story(tmp_path: Path, frames: int) -> str:
    story = {
        "id": "long-cat",
        "subjects": [{"name": "cat", "description": "a ginger cat", "tokens": ["cat"]}],
        "defaults": {"steps": 5, "height": 128, "width": 128, "seed": 3},
        "frames": [{"prompt": f"{{cat}} in scene number {k}"} for k in range(frames)],
    }
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def test_killing_a_worker_mid_story_loses_only_its_frame(tmp_path: Path) -> None:
    story = long_story(tmp_path, 10)
    reference = tmp_path / "reference"
    render_story(story, RenderOptions(out=str(reference), **FAST))

    out = tmp_path / "faulty"
    options = RenderOptions(out=str(out), workers=2, **FAST)
    killed: list[str] = []
    dispatched: list[str] = []

    def kill_a_busy_worker(kind: str, info: dict) -> None:
        # The worker a frame was just handed to dies (the 3rd and the 6th frame handed out).
        if kind == "frame_dispatched":
            dispatched.append(info["frame"])
            if len(dispatched) in (3, 6):
                killed.append(info["frame"])
                ray.kill(ray.get_actor(info["worker"], namespace=NAMESPACE), no_restart=False)  # Ray restarts it

    executor = RayExecutor(options, on_event=kill_a_busy_worker)
    plan = prepare_job(story, options, device=executor.device)
    result = run_job(plan, executor)
    executor.close()
    assert len(killed) == 2 and set(killed) <= set(result.stats["retried"])
    table = pq.read_table(out / "data")
    ids = table.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10  # every frame exactly once
    assert sorted(result.rendered) == sorted(ids)
    assert_same_pixels(images(out), images(reference))


def test_resumed_job_renders_only_missing_frames(tmp_path: Path, in_process) -> None:
    out = tmp_path / "resume"
    first = render_story(EXAMPLE, RenderOptions(out=str(out), workers=1, only=["garden", "home"], **FAST))
    assert sorted(first.rendered) == ["garden", "home"]
    second = render_story(EXAMPLE, RenderOptions(out=str(out), workers=2, **FAST))
    assert sorted(second.rendered) == ["beach", "kitchen", "market", "rooftop"]
    assert sorted(second.skipped) == ["garden", "home"]
    assert_same_pixels(images(out), in_process)


def test_saved_anchors_are_reused_by_ray_workers(tmp_path: Path, in_process) -> None:
    bank = tmp_path / "bank"
    first = render_story(EXAMPLE, RenderOptions(out=str(bank), workers=2, save_anchors=True, only=["beach"], **FAST))
    bundle = bank / "anchors" / "ginger-cat.safetensors"
    assert first.anchor_bundle and bundle.is_file()
    # A second job with --anchors renders its frames on the workers without rendering anchors: the
    # driver puts the bundle's steps in the object store itself.
    reuse = tmp_path / "reuse"
    second = render_story(
        EXAMPLE, RenderOptions(out=str(reuse), workers=2, anchors=str(bundle), only=["market", "rooftop"], **FAST)
    )
    assert sorted(second.rendered) == ["market", "rooftop"] and "anchor_seconds" not in second.stats
    assert sum(s["frames"] for s in second.stats["worker_stats"]) == 2
    assert_same_pixels(images(reuse), {k: in_process[k] for k in ("market", "rooftop")})
    assert_same_pixels(images(bank), {"beach": in_process["beach"]})


# Anchor-death tests kill the anchor actor as the driver receives its second step object. The
# actor streams each step as it is published, so with many steps the kill lands while most of the
# steps are still to render (about a second on this CPU, against milliseconds for the kill).
SLOW = {**FAST, "steps": 30}


@pytest.fixture(scope="module")
def slow_story(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("slow")
    story = long_story(folder, 3)
    render_story(story, RenderOptions(out=str(folder / "reference"), **SLOW))
    return story, images(folder / "reference")


class KillAnchorsAtSecondStep:
    """An ``on_event`` hook: kills the worker rendering a story's anchors when the driver gets
    their second step object, the first time (or each time ``story`` is set anew)."""

    def __init__(self) -> None:
        self.story: str | None = None
        self.killed: list[str] = []

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "anchor_step" and info["step"] == 1 and info["attempt"] == 1 and info["story"] == self.story:
            self.killed.append(info["worker"])
            ray.kill(ray.get_actor(info["worker"], namespace=NAMESPACE), no_restart=False)  # Ray restarts it



def test_a_worker_dying_with_the_anchors_is_replaced_and_the_anchors_recomputed(tmp_path: Path, slow_story) -> None:
    story, reference = slow_story
    out = tmp_path / "anchor-fault"
    options = RenderOptions(out=str(out), workers=1, **SLOW)
    hook = KillAnchorsAtSecondStep()
    hook.story = "long-cat"
    executor = RayExecutor(options, on_event=hook)
    plan = prepare_job(story, options, device=executor.device)
    result = run_job(plan, executor)
    executor.close()
    assert len(hook.killed) == 1 and result.stats["anchor_attempts"] == 2
    assert sorted(result.rendered) == sorted(reference)
    assert_same_pixels(images(out), reference)


def test_a_pooled_executor_keeps_its_workers_from_story_to_story(tmp_path: Path, in_process, slow_story) -> None:
    story, slow_reference = slow_story
    reference = tmp_path / "reference"
    render_story(story, RenderOptions(out=str(reference), **FAST))

    options = RenderOptions(out=str(tmp_path / "pooled"), workers=2, **FAST)
    hook = KillAnchorsAtSecondStep()
    with RayExecutor(options, on_event=hook) as executor:
        first = render_story(EXAMPLE, options, executor=executor)
        pids = sorted(s["pid"] for s in first.stats["worker_stats"])
        second = render_story(story, options, executor=executor)
        # The same two processes rendered both stories: no pipeline was loaded twice.
        assert sorted(s["pid"] for s in second.stats["worker_stats"]) == pids
        assert len(executor.live_workers()) == 2
        # A third story whose anchors' worker is killed halfway: the next worker renders them again.
        hook.story = "long-cat"
        third_out = tmp_path / "pooled-slow"
        third = render_story(story, RenderOptions(out=str(third_out), workers=2, **SLOW), executor=executor)
        assert len(hook.killed) == 1 and third.stats["anchor_attempts"] == 2
    assert executor.live_workers() == []  # leaving the block stopped the pool
    assert sum(s["frames"] for s in second.stats["worker_stats"]) == 4 + 1  # counted since the pool started
    assert sorted(third.rendered) == sorted(slow_reference)

    both = images(tmp_path / "pooled")
    assert_same_pixels({k: v for k, v in both.items() if k in in_process}, in_process)
    assert_same_pixels({k: v for k, v in both.items() if k not in in_process}, images(reference))
    assert_same_pixels(images(third_out), slow_reference)
