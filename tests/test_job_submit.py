"""``ray job submit`` of ``jobs/render_story.py`` to a real ``ray start --head`` cluster: the
dashboard and its job server on 127.0.0.1, token authentication, the command docs/cluster.md and
the README show. The cluster is the session's authenticated head (conftest.py, tests/_ray.py):
private ports and ``--temp-dir``, and only its own processes are stopped at the end."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from _pixels import assert_same_pixels, frame_pixels, like_a_ray_worker
from _ray import RAY, RayHead, connected

from storysync_dist.cli import main
from storysync_dist.io.sink import open_dataset
from storysync_dist.story import load_story

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
SMALL = ["--model", "tiny-sdxl", "--steps", "3", "--height", "64", "--width", "64", "--no-progress"]


def submit(head: RayHead, *entrypoint: str) -> subprocess.CompletedProcess[str]:
    """``ray job submit --address http://127.0.0.1:PORT --working-dir ROOT -- python ...``; it
    uploads the checkout, starts the driver on the head and follows its log until it ends."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT), "--", "python",
         *entrypoint],
        cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=900, check=False,
    )


def test_ray_job_submit_renders_the_story_on_the_cluster(auth_ray_head: RayHead, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = submit(auth_ray_head, "jobs/render_story.py", "examples/story.yaml", *SMALL, "--out", str(out),
                  "--workers", "1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "succeeded" in log and "rendered 6 frame(s)" in log
    table = open_dataset(out).to_table()
    assert table.num_rows == 6
    assert sorted(table.column("frame_id").to_pylist()) == sorted(f.id for f in load_story(str(EXAMPLE)).frames)


def test_a_user_error_in_a_submitted_job_is_one_line_and_fails_the_job(auth_ray_head: RayHead, tmp_path: Path) -> None:
    # --device cuda on a cluster without GPUs, found on the cluster (one submitted job: the other
    # user errors of a Ray job are the driver's own, the same in a submitted job and in-process).
    proc = submit(auth_ray_head, "jobs/render_story.py", "examples/story.yaml", *SMALL, "--out", str(tmp_path / "out"),
                  "--workers", "1", "--device", "cuda")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-6000:]
    assert "render_story: error: --device cuda: the Ray cluster has no GPUs (CPU " in log
    assert "Traceback" not in log and "failed" in log
    assert not (tmp_path / "out").exists()


def test_a_gpu_index_is_a_user_error_on_the_cluster(auth_ray_head: RayHead, tmp_path: Path, capsys) -> None:
    # The same driver code, in this process joined to the head.
    with connected(auth_ray_head):
        code = main(["render", str(EXAMPLE), *SMALL, "--out", str(tmp_path / "out"), "--workers", "1",
                     "--device", "cuda:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("storysync: error: --device cuda:1: with --workers, Ray assigns each worker its own GPU")
    assert not (tmp_path / "out").exists()


def test_ray_job_stop_ends_a_two_worker_render_in_one_line_and_a_rerun_finishes_it(auth_ray_head: RayHead, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job_id = f"storysync-stop-{uuid.uuid4().hex[:8]}"
    slow = [*SMALL[:2], "--steps", "10", *SMALL[4:]]  # frames long enough to stop the job between them
    started = subprocess.run(
        [RAY, "job", "submit", "--address", auth_ray_head.dashboard, "--working-dir", str(ROOT), "--no-wait",
         "--submission-id", job_id, "--", "python", "jobs/render_story.py", "examples/story.yaml", *slow,
         "--out", str(out), "--workers", "2"],
        cwd=ROOT, env=auth_ray_head.env, capture_output=True, text=True, timeout=300, check=False)
    assert started.returncode == 0, started.stdout + started.stderr

    def ray_job(*args: str) -> str:
        proc = subprocess.run([RAY, "job", *args, "--address", auth_ray_head.dashboard, job_id], cwd=ROOT,
                              env=auth_ray_head.env, capture_output=True, text=True, timeout=120, check=False)
        return proc.stdout + proc.stderr

    deadline = time.monotonic() + 300
    while len(list(out.rglob("*.staged"))) < 2:  # two frames written: stop it between frames
        assert time.monotonic() < deadline, (ray_job("status"), sorted(out.rglob("*")), ray_job("logs")[-4000:])
        time.sleep(0.1)
    ray_job("stop")  # SIGTERM to the driver; it waits for the job to end
    while not any(s in (status := ray_job("status")) for s in ("was stopped", "failed", "succeeded")):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert f"Job '{job_id}' was stopped" in status
    log = ray_job("logs")
    ends = [line for line in log.splitlines() if "interrupted" in line]
    assert len(ends) == 1 and ends[0].startswith("render_story: interrupted (SIGTERM): "), log[-4000:]
    assert ends[0].endswith("; run the same command again to finish") and "Traceback" not in log
    entry = json.loads((out / "manifest.json").read_text())["stories"]["ginger-cat"]
    done = [f["id"] for f in entry["frames"] if f["done"]]
    assert entry["complete"] is False and 2 <= len(done) < 6
    assert f"{len(done)} of 6 frames written to {out}" in ends[0]
    # The same command again (in this process here: --workers N equals it) finishes it, equal to an
    # uninterrupted run.
    with like_a_ray_worker():
        assert main(["render", str(EXAMPLE), *slow, "--out", str(out)]) == 0
        assert main(["render", str(EXAMPLE), *slow, "--out", str(tmp_path / "whole")]) == 0
    assert_same_pixels(frame_pixels(out), frame_pixels(tmp_path / "whole"))
