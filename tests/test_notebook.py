"""docs/notebook.ipynb runs, top to bottom, against a running Ray cluster (started here with
`ray start --head` on 127.0.0.1), so the documented Python API cannot rot."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient

from storysync_dist.io.sink import FRAME_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Ray 2.60 token authentication, as docs/cluster.md tells a user to set it up: the same
    token for the head and for every driver (here a file made for this test, not ~/.ray)."""
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@pytest.fixture(scope="module")
def ray_head(auth_env: dict[str, str]):
    port = free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **auth_env)  # loopback only
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_notebook_runs_against_a_running_cluster(
    ray_head: str, auth_env: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    for name, value in auth_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    monkeypatch.setenv("STORYSYNC_OUT", str(out))
    monkeypatch.setenv("STORYSYNC_WORKERS", "2")
    notebook = nbformat.read(ROOT / "docs" / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(
        o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "rendered 6 frames" in outputs and "skipped 6 frames already written" in outputs
    assert pq.read_table(out / "data", schema=FRAME_SCHEMA).num_rows == 6
    assert (out / "storyboard.png").exists()
