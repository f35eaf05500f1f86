"""``ray job submit`` of ``jobs/render_story.py`` to a real ``ray start --head`` cluster: the
dashboard and its job server on 127.0.0.1, token authentication, the command docs/cluster.md and
the README show. The cluster is this module's own (private ports and ``--temp-dir``), and its
processes, found by that temp dir, are the only ones stopped at the end: a bare ``ray stop``
would stop every Ray on the machine."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from storysync_dist.io.sink import open_dataset
from storysync_dist.spec import load_story

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
EXAMPLE = ROOT / "examples" / "story.yaml"
SMALL = ["--model", "tiny-sdxl", "--steps", "3", "--height", "64", "--width", "64", "--no-progress"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster whose temp dir is ``temp_dir``: those naming it on their
    command line (gcs_server, raylet, dashboard, monitors) and all their descendants (workers,
    agents, the job's driver)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            roots.append(proc)
    found = {proc.pid: proc for proc in roots}
    for proc in roots:
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(temp_dir: str) -> None:
    procs = cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    # Short: Ray's unix sockets live under it, and their paths are limited to ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-js-", dir="/tmp")
    dashboard = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        # `python` in the job's entrypoint is this virtual environment's (the driver inherits the
        # head's environment).
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's single-machine mode: every server on 127.0.0.1
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
    )
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=3",
        "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Ports that default to fixed numbers, which another Ray on this machine may hold.
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        stop_cluster(temp_dir)
        assert not cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(ray_head: dict, *entrypoint: str) -> subprocess.CompletedProcess[str]:
    """``ray job submit --address http://127.0.0.1:PORT --working-dir ROOT -- python ...``; it
    uploads the checkout, starts the driver on the head and follows its log until it ends."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT), "--", "python",
         *entrypoint],
        cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=900, check=False,
    )


def test_ray_job_submit_renders_the_story_on_the_cluster(ray_head: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = submit(ray_head, "jobs/render_story.py", "examples/story.yaml", *SMALL, "--out", str(out),
                  "--workers", "1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "succeeded" in log and "rendered 6 frame(s)" in log
    table = open_dataset(out).to_table()
    assert table.num_rows == 6
    assert sorted(table.column("frame_id").to_pylist()) == sorted(f.id for f in load_story(str(EXAMPLE)).frames)


@pytest.mark.parametrize(("device", "error"), [
    ("cuda:1", "--device cuda:1: with --workers, Ray assigns each worker its own GPU"),
    ("cuda", "--device cuda: the Ray cluster has no GPUs (CPU "),
])
def test_a_user_error_in_a_submitted_job_is_one_line_and_fails_the_job(
    ray_head: dict, tmp_path: Path, device: str, error: str
) -> None:
    proc = submit(ray_head, "jobs/render_story.py", "examples/story.yaml", *SMALL, "--out", str(tmp_path / "out"),
                  "--workers", "1", "--device", device)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-6000:]
    assert f"render_story: error: {error}" in log
    assert "Traceback" not in log and "failed" in log
    assert not (tmp_path / "out").exists()
