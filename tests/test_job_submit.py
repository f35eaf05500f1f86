"""``ray job submit`` of ``jobs/render_story.py`` to a real ``ray start --head`` cluster: the
dashboard and its job server on 127.0.0.1, token authentication, the command docs/cluster.md and
the README show. The cluster is the session's authenticated head (conftest.py, tests/_ray.py):
private ports and ``--temp-dir``, and only its own processes are stopped at the end."""

from __future__ import annotations

import subprocess
from pathlib import Path

from _ray import RAY, RayHead, connected

from storysync_dist.cli import main
from storysync_dist.io.sink import open_dataset
from storysync_dist.spec import load_story

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
