"""docs/notebook.ipynb runs, top to bottom, against a running Ray cluster (the session's
token-authenticated ``ray start --head`` on 127.0.0.1, conftest.py), so the documented Python API
cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pyarrow.parquet as pq
from _ray import RayHead
from nbclient import NotebookClient

from storysync_dist.io.sink import FRAME_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_runs_against_a_running_cluster(auth_ray_head: RayHead, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the same token as the head's
        monkeypatch.setenv(name, auth_ray_head.env[name])
    monkeypatch.setenv("RAY_ADDRESS", auth_ray_head.address)
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
