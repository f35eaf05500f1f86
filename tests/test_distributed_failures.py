"""Ray jobs that fail say why: the causes from the workers reach the driver's error, devices are
checked where the frames render, resources follow --device, a job that cannot get its resources
gives up after start_timeout naming them, a frame or an anchor stream that raises inside a worker
ends the job with its cause (a frame after 3 attempts), and a dead anchor actor is replaced without
deadlock when the GPUs are as many as the workers.

One Ray head for the module: 4 CPUs and 2 GPUs that Ray believes it detected (the
``accelerator_type:A10G`` resource Ray gives a node whose GPUs it found), on a machine whose torch
has no CUDA. So a job without --device means "render on CUDA" here and must fail with the
cause, while ``device="cpu"`` with ``resources_per_worker={"GPU": 1, "CPU": 1}`` schedules
actors by GPU and renders on the CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker
from _ray import KillAnchorsOnDispatch, RayHead, connected, started_head
from safetensors.torch import load_file, save_file

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.distributed.actors import choose_device
from storysync_dist.distributed.cluster import gpus_are_physical
from storysync_dist.distributed.executor import NAMESPACE, RayExecutor
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.run import run_job
from storysync_dist.errors import RenderError, StorySyncUserError
from storysync_dist.models.presets import preset_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "story.yaml")
FAST = {"steps": 2, "height": 64, "width": 64, "progress": False}
FAST_ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress"]
CPU_ON_GPU = {"device": "cpu", "resources_per_worker": {"GPU": 1, "CPU": 1}}
HOST = socket.gethostname()


@pytest.fixture(scope="module", autouse=True)
def detected_gpus_head() -> Iterator[RayHead]:
    # Not the shared head (conftest.ray_head): its GPUs are only declared, these must look detected.
    detected = ("--resources", json.dumps({"accelerator_type:A10G": 1}))
    with started_head(num_cpus=4, num_gpus=2, extra=detected) as head, connected(head):
        assert gpus_are_physical() and ray.cluster_resources()["GPU"] == 2
        yield head


@pytest.fixture(autouse=True)
def cluster_is_idle_between_tests():
    yield
    # A failed job leaves no actors behind: everything is free again soon after.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < 2 or ray.available_resources().get("CPU", 0) < 4:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def model_copy(tmp_path: Path) -> Path:
    """A private copy of the tiny-sdxl folder: valid for the driver's planning, then broken."""
    folder = tmp_path / "model"
    shutil.copytree(preset_path("tiny-sdxl"), folder)
    return folder


def planned(options: RenderOptions, story: str = EXAMPLE, on_event=None) -> tuple:
    executor = RayExecutor(options, on_event=on_event)
    return prepare_job(story, options, device=executor.device), executor


# ---- causes from the workers --------------------------------------------------------------
def test_a_model_folder_missing_on_the_workers_is_a_user_error_naming_it(tmp_path: Path) -> None:
    model = model_copy(tmp_path)
    # Frames only (vanilla): the two workers are the only actors.
    options = RenderOptions(model=str(model), out=str(tmp_path / "out"), method="vanilla", workers=2,
                            **CPU_ON_GPU, **FAST)
    plan, executor = planned(options)
    shutil.rmtree(model)  # the driver planned with it; the worker "nodes" do not have it
    with pytest.raises(StorySyncUserError) as caught:
        run_job(plan, executor)
    message = str(caught.value)
    assert message.startswith(f"--model: unknown model or preset {str(model)!r}: not a local folder")
    assert message.endswith(f"(workers 0, 1 on {HOST})") and "\n" not in message
    assert executor.live_workers() == []  # nothing left running

    # With anchors, the one worker (which would render them) meets the same cause and says so.
    model = model_copy(tmp_path / "again")
    options = RenderOptions(model=str(model), out=str(tmp_path / "out2"), workers=1, **CPU_ON_GPU, **FAST)
    plan, executor = planned(options)
    shutil.rmtree(model)
    with pytest.raises(StorySyncUserError, match=rf"^--model: unknown model .*\(worker 0 on {HOST}\)$"):
        run_job(plan, executor)


def test_a_model_folder_whose_weights_do_not_fit_names_the_exception(tmp_path: Path) -> None:
    model = model_copy(tmp_path)
    options = RenderOptions(model=str(model), out=str(tmp_path / "out"), method="vanilla", workers=2,
                            **CPU_ON_GPU, **FAST)
    plan, executor = planned(options)
    # On the worker "nodes" the UNet's config no longer fits its weights (a half-synced folder).
    config_file = model / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "in_channels": 5}))
    with pytest.raises(RenderError) as caught:  # a failure (exit code 1), not the user's mistake
        run_job(plan, executor)
    message = str(caught.value)
    assert message.startswith(f"the job's actors could not start: workers 0, 1 on {HOST}: ValueError: Cannot load ")
    assert "conv_in.weight expected shape" in message and "\n" not in message
    # The worker's exception, with its remote traceback, is chained for the job log.
    assert "conv_in.weight" in str(caught.value.__cause__) and 'File "' in str(caught.value.__cause__)


def long_story(folder: Path, frames: int, steps: int, size: int) -> str:
    story = {
        "id": "long-cat",
        "subjects": [{"name": "cat", "description": "a ginger cat", "tokens": ["cat"]}],
        "defaults": {"steps": steps, "height": size, "width": size, "seed": 3},
        "frames": [{"prompt": f"{{cat}} in scene number {k}"} for k in range(frames)],
    }
    path = folder / "long.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def test_workers_that_die_for_good_end_the_job_with_their_causes(tmp_path: Path) -> None:
    story = long_story(tmp_path, 8, 3, 64)
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), method="vanilla", workers=2,
                            **CPU_ON_GPU, **FAST)
    plan, executor = planned(options, story)

    def kill_every_worker(frame) -> None:
        for name in executor.live_workers():
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)

    with pytest.raises(RenderError) as caught:
        run_job(plan, executor, on_frame=kill_every_worker)
    message = str(caught.value)
    assert message.startswith("every frame worker failed, so the frames not yet written are lost for this run")
    assert "ActorDiedError: " in message and "ray.kill" in message
    # Both workers are named; a worker killed before it told the driver its host is "never placed".
    assert f"workers 0, 1 on {HOST}: " in message or ("worker 0 " in message and "worker 1 " in message)
    assert "\n" not in message
    written = pq.read_table(tmp_path / "out" / "data").column("frame_id").to_pylist()
    # What was written before the workers died stays. The upper bound leans on ray.kill (asked for
    # as the first frame is written) landing before the other 7 frames render: milliseconds against
    # hundreds of them. SIGKILL would be certain, but Ray restarts a crashed actor: no death for good.
    assert 1 <= len(written) < 8


# ---- devices ------------------------------------------------------------------------------
def test_device_cuda_on_workers_without_cuda_names_the_device_and_host(tmp_path: Path) -> None:
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=2, device="cuda", **FAST)
    with pytest.raises(StorySyncUserError) as caught:
        render_story(EXAMPLE, options)
    message = str(caught.value)
    assert message.startswith(f"--device cuda: torch on host {HOST} cannot use CUDA (")
    assert "Ray GPU ids: " in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_gpu_index_with_workers_is_a_user_error_at_once(tmp_path: Path) -> None:
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=1, device="cuda:1", **FAST)
    with pytest.raises(StorySyncUserError, match=r"^--device cuda:1: with --workers, Ray assigns .*pass --device cuda$"):
        RayExecutor(options)


def test_a_reserved_gpu_that_torch_cannot_use_is_an_error_not_a_cpu_render(tmp_path: Path) -> None:
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=1, **FAST)
    executor = RayExecutor(options)
    assert executor.device == "cuda" and executor.resources.amounts == {"GPU": 1, "CPU": 1}
    plan = prepare_job(EXAMPLE, options, device=executor.device)
    with pytest.raises(StorySyncUserError) as caught:
        run_job(plan, executor)
    message = str(caught.value)
    # The one worker holds one of the two GPUs (id 0 or 1).
    assert message.startswith(f"host {HOST}: this actor holds Ray GPU ")
    assert "but torch there cannot use CUDA" in message and "or pass --device cpu" in message
    assert message.endswith(f"(worker 0 on {HOST})")


def test_device_choice_on_the_actor() -> None:
    # What each actor decides, on this CUDA-less machine, without Ray.
    assert choose_device("cpu", "cpu", ["1"], "node-a") == "cpu"
    assert choose_device("cpu", None, [], "node-a") == "cpu"
    with pytest.raises(StorySyncUserError, match=r"^host node-a: this actor holds Ray GPU 3, but torch there"):
        choose_device("cuda", None, ["3"], "node-a")
    with pytest.raises(StorySyncUserError, match=r"^--device cuda: torch on host node-a cannot use CUDA"):
        choose_device("cuda", "cuda", ["3"], "node-a")
    assert gpus_are_physical({"GPU": 2, "accelerator_type:H100": 1})
    assert not gpus_are_physical({"GPU": 2, "CPU": 4})


def test_device_cpu_requests_no_gpu(tmp_path: Path) -> None:
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=2, device="cpu", **FAST)
    executor = RayExecutor(options)
    assert executor.device == "cpu" and executor.resources.amounts == {"CPU": 1}
    plan = prepare_job(EXAMPLE, options, device=executor.device)
    free_gpus: list[float] = []
    result = run_job(plan, executor, on_frame=lambda frame: free_gpus.append(ray.available_resources().get("GPU", 0)))
    executor.close()
    assert len(result.rendered) == 6 and free_gpus and set(free_gpus) == {2.0}
    devices = result.stats["devices"]
    assert [(d["role"], d["index"]) for d in devices] == [("worker", 0), ("worker", 1)]
    for d in devices:
        assert d["device"] == "cpu" and d["gpu_ids"] == [] and d["host"] == HOST
        assert isinstance(d["pid"], int) and d["threads"] >= 1


def test_a_cluster_without_the_resource_fails_at_once(tmp_path: Path) -> None:
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=2, device="cpu",
                            resources_per_worker={"CPU": 1, "big-memory-node": 1}, **FAST)
    with pytest.raises(StorySyncUserError, match=r"needs 2 big-memory-node, but the Ray cluster has 0$"):
        RayExecutor(options)
    bad = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), workers=1, device="cuda",
                        resources_per_worker={"CPU": 1}, **FAST)
    with pytest.raises(StorySyncUserError, match=r"^--device cuda: resources_per_worker .* reserves no GPU"):
        RayExecutor(bad)


# ---- resources that do not come -----------------------------------------------------------
@ray.remote(num_gpus=2, num_cpus=0)
class Placeholder:
    """Another job's actor holding both GPUs."""

    def ready(self) -> bool:
        return True


START_TIMEOUT = 2  # seconds: the workers can never be placed here, so any timeout shows the rule


@pytest.mark.parametrize(("method", "workers", "who"), [
    ("storysync", 1, "1 of 1 frame worker(s)"),  # the worker that would render the anchors
    ("vanilla", 2, "2 of 2 frame worker(s)"),
])
def test_a_job_that_cannot_get_its_gpus_gives_up_after_start_timeout(
    tmp_path: Path, method: str, workers: int, who: str
) -> None:
    holder = Placeholder.remote()
    ray.get(holder.ready.remote(), timeout=60)
    try:
        options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), method=method, workers=workers,
                                start_timeout=START_TIMEOUT, **CPU_ON_GPU, **FAST)
        plan, executor = planned(options)
        start = time.monotonic()
        with pytest.raises(StorySyncUserError) as caught:  # the event: the job gives up, by itself
            run_job(plan, executor)
        waited = time.monotonic() - start
    finally:
        ray.kill(holder)
    message = str(caught.value)
    assert message.startswith(f"--start-timeout {START_TIMEOUT}: the Ray cluster did not place {who} within "
                              f"{START_TIMEOUT}s; each asks for 1 GPU, 1 CPU, and the cluster has GPU 0 of 2 free, CPU ")
    assert "\n" not in message
    # Not before the timeout (a lower bound only: the pool starts its clock after this one). How
    # long after it is up to the machine's load, so it is not asserted.
    assert waited >= START_TIMEOUT


# ---- a frame or an anchor stream that raises inside a worker --------------------------------
def nan_model(tmp_path: Path) -> Path:
    """tiny-sdxl with a NaN in the UNet's last bias, as a checkpoint that overflowed would have.
    The driver plans with it (it reads configs and the tokenizer, not weights) and the workers
    load it, and then every denoising run raises ``NonFiniteOutputError`` inside the worker: a
    real render-time failure, with no fault point in the product."""
    folder = model_copy(tmp_path)
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, weights_file)
    return folder


def nothing_written(out: Path) -> bool:
    """No frame in the dataset, committed (a part) or staged."""
    return not [*out.rglob("*.parquet"), *out.rglob("*.staged")]


def test_a_frame_that_raises_in_the_worker_is_retried_then_given_up_after_3_attempts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["render", EXAMPLE, "--model", str(nan_model(tmp_path)), "--out", str(out), "--method", "vanilla",
            "--only", "beach", "--workers", "1", "--device", "cpu", *FAST_ARGS]
    with caplog.at_level(logging.WARNING, logger="storysync"):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err  # a failure, not the user's mistake
    cause = "NonFiniteOutputError: frame 'beach': the denoiser produced NaN/inf latents for image(s) [0]"
    assert err.startswith(f"storysync: error: frame 'beach' of story 'ginger-cat' failed 3 times; the last time "
                          f"on worker 0 ({HOST}): {cause}")
    assert err.count("\n") == 1 and err.endswith("\n")  # one line, no traceback
    # Attempts 1 and 2 were lost and retried with the same cause; attempt 3 gave up.
    retried = [r.getMessage() for r in caplog.records if "retrying on the next free worker" in r.getMessage()]
    assert len(retried) == 2, retried
    assert all(m.startswith("frame(s) beach lost on worker 0 (") and cause in m for m in retried), retried
    assert nothing_written(out)


def test_an_anchor_stream_that_raises_ends_the_job_with_its_cause(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # One worker, so no frame follows the stream: the stream's own error is what ends the job.
    options = RenderOptions(model=str(nan_model(tmp_path)), out=str(out), workers=1, **CPU_ON_GPU, **FAST)
    events: list[tuple[str, dict]] = []
    plan, executor = planned(options, on_event=lambda kind, info: events.append((kind, info)))
    with pytest.raises(RenderError) as caught:
        run_job(plan, executor)
    message = str(caught.value)
    assert message.startswith(f"the anchors of story 'ginger-cat' failed on worker 0 ({HOST}): "
                              "NonFiniteOutputError: anchors ['beach', 'kitchen']: the denoiser produced NaN/inf "
                              "latents for image(s) [0, 1]")
    assert "\n" not in message
    # The worker's exception, with its remote traceback, is chained for the job log.
    assert "NonFiniteOutputError" in str(caught.value.__cause__) and 'File "' in str(caught.value.__cause__)
    kinds = [kind for kind, _ in events]
    # It was a stream: steps arrived before the error. An exception is not a worker's death, so
    # the anchors are not rendered again, and no anchor frame is written.
    assert kinds.count("anchors_dispatched") == 1 and "anchor_step" in kinds and "anchors_done" not in kinds
    assert nothing_written(out)


# ---- the worker rendering the anchors dies with every GPU taken -----------------------------
def test_a_worker_dying_with_the_anchors_is_replaced_when_gpus_equal_workers(tmp_path: Path) -> None:
    # About 15 s: two workers load their pipelines, and the killed one starts and loads again.
    story = long_story(tmp_path, 3, 2, 64)
    size = {"steps": 2, "height": 64, "width": 64, "progress": False}
    reference = tmp_path / "reference"
    with like_a_ray_worker():
        render_story(story, RenderOptions(model="tiny-sdxl", out=str(reference), device="cpu", **size))

    out = tmp_path / "out"
    # 2 GPUs, 2 workers: every GPU is a worker's. The worker rendering the anchors dies; Ray
    # restarts it on the GPU it freed, and the anchors render again on the next free worker.
    # start_timeout bounds every wait for a worker to be placed, so a deadlock here is an error.
    options = RenderOptions(model="tiny-sdxl", out=str(out), workers=2, start_timeout=120, **CPU_ON_GPU, **size)
    hook = KillAnchorsOnDispatch()
    plan, executor = planned(options, story, on_event=hook)
    executor.warm_up()
    with hook.pause(executor.worker_names):
        result = run_job(plan, executor)
    executor.close()
    # The anchors went again to the other worker (the killed one was restarting).
    (dead,) = hook.killed
    (other,) = set(executor.worker_names) - {dead}
    assert hook.dispatched == [(dead, 1), (other, 2)]
    assert result.stats["anchor_attempts"] == 2
    assert sorted(result.rendered) == sorted(frame_pixels(reference))
    devices = result.stats["devices"]
    assert [(d["role"], d["index"]) for d in devices] == [("worker", 0), ("worker", 1)]
    worker_gpus = [tuple(d["gpu_ids"]) for d in devices if d["role"] == "worker"]
    assert all(len(g) == 1 for g in worker_gpus) and worker_gpus[0] != worker_gpus[1]
    assert_worker_threads(result.stats)
    assert_same_pixels(frame_pixels(out), frame_pixels(reference))
