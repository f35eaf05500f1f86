"""Joining a Ray cluster that is already running: ``--address`` and ``RAY_ADDRESS`` join the
session's shared head (conftest.py), and an address where nothing listens is a one-line user
error, exit code 2, with nothing written.

The CLI runs in this process (``main()`` returns its exit code), which must be no Ray driver
before it: ``connect()`` uses a Ray already initialized in the process and would never look at
the address. So this module does not use the ``ray_cluster`` fixture, and each test leaves the
process as it found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from _pixels import frame_pixels
from _ray import RayHead, free_port

from storysync_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "story.yaml")
# One vanilla frame on one worker: what is shown is where the job ran, not how it renders.
ONE_FRAME = ["render", EXAMPLE, "--model", "tiny-sdxl", "--method", "vanilla", "--only", "beach", "--workers", "1",
             "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture
def not_a_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process is no Ray driver and has no RAY_ADDRESS when the test starts, and is no driver
    when it ends."""
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("given_by", ["--address", "RAY_ADDRESS"])
def test_render_joins_a_running_cluster(tmp_path: Path, ray_head: RayHead, given_by: str,
                                        monkeypatch: pytest.MonkeyPatch, not_a_driver: None) -> None:
    out = tmp_path / "out"
    argv = [*ONE_FRAME, "--out", str(out)]
    if given_by == "--address":
        argv += ["--address", ray_head.address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    assert main(argv) == 0
    # The driver joined the head (an embedded Ray would have a GCS of its own, and no GPUs).
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_head.address
    assert ray.cluster_resources().get("GPU") == 2
    assert set(frame_pixels(out)) == {"beach"}


@pytest.mark.parametrize("given_by", ["--address", "RAY_ADDRESS"])
def test_an_unreachable_address_is_a_one_line_user_error(tmp_path: Path, given_by: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str], not_a_driver: None) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "out"
    argv = [*ONE_FRAME, "--out", str(out)]
    if given_by == "--address":
        argv += ["--address", address]
        where = f"--address {address}"
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
        where = f"RAY_ADDRESS={address}"
    assert main(argv) == 2
    # Everything written to the process's stderr (file descriptor 2, where Ray's own C++ logging
    # goes too) is the one line.
    captured = capfd.readouterr()
    assert captured.err == f"storysync: error: {where}: cannot reach the Ray cluster (Connection refused)\n"
    assert not out.exists()  # nothing written
    assert not ray.is_initialized()  # and no Ray was started instead
