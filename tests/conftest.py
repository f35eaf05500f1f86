"""Shared test setup: presets build into a per-session cache, never into the user's home; one
Ray head for every module that needs a cluster (tests/_ray.py)."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _ray import RayHead, connected, started_head
from _s3 import MotoS3, moto_s3

# The shared head: 4 logical CPUs and 2 GPUs that Ray believes are there (declared, not detected,
# so actors are scheduled by GPU and render on this machine's CPU). Modules that need another
# shape (detected GPUs, token authentication) start their own with tests/_ray.py.
SHARED_CPUS = 4
SHARED_GPUS = 2


def pytest_configure(config: pytest.Config) -> None:
    if "STORYSYNC_CACHE" not in os.environ:
        os.environ["STORYSYNC_CACHE"] = tempfile.mkdtemp(prefix="storysync-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Until the trained toyworld model is shipped (issue 21), the `toyworld` preset resolves to a
    # pipeline folder that the `toyworld_model` fixture trains for one step: it tests the preset's
    # path (CLI, API, Ray workers), not quality. Set before the Ray head starts, which inherits it.
    from storysync_dist.toyworld import MODEL_ENV, model_folder

    if MODEL_ENV not in os.environ and not (model_folder() / "model_index.json").is_file():
        os.environ[MODEL_ENV] = str(Path(os.environ["STORYSYNC_CACHE"]) / "toyworld-one-step")
    # torch in this process and in every subprocess a test starts runs with one thread, as a Ray
    # FrameWorker does (tests/_pixels.py, WORKER_THREADS): in-process renders then match the
    # workers' by construction, and on a loaded 2-CPU machine torch's spinning second thread
    # cannot slow a render tenfold. Set before any test module imports torch, which reads it then.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ray 2.60 turns token authentication on for every new cluster and, without a token path,
    # writes one into ~/.ray, which a head started later then requires of every driver. One token
    # for the whole session, in a file of its own: every Ray the tests start (the shared heads, a
    # CLI's embedded Ray, a job's subprocess) and every driver use it, and nothing is written
    # into the user's home.
    token = Path(tempfile.mkdtemp(prefix="storysync-test-ray-")) / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    # Every Ray the tests start listens on 127.0.0.1 only (Ray's single-machine mode); set before
    # any test module imports ray, which reads it at import.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # No usage statistics: tests send traffic only to 127.0.0.1, and Ray Data's usage collection
    # starts a daemon thread in this process (once a test has run ray.data) that asks a Prometheus
    # at 127.0.0.1:9090 every 10 s, for the rest of the session; test_model_loading's no_network
    # caught it at random.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


# Leave the process without the interpreter's finalization once pytest has reported. CI once
# printed "788 passed" and then "free(): corrupted unsorted chunks" and a segmentation fault, which
# made `make test` fail (2026-12-06): glibc found its heap damaged while this process (torch, Ray's
# gRPC core worker, onnxruntime, numba, pyarrow, aiobotocore, all loaded at once) freed memory at
# exit, after every test, fixture and Ray cluster had ended. A full run of the same commit here
# exited cleanly, so it is rare and not reproduced; no test's own process (the CLI's
# subprocesses, the Ray workers) has shown it. The status pytest reports is the exit status; set
# STORYSYNC_TEST_FINALIZE=1 to finalize normally (to chase it with gdb and core dumps).
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or os.environ.get("STORYSYNC_TEST_FINALIZE") == "1":
        return
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One head for the session, started on the first module that asks for it."""
    with started_head(num_cpus=SHARED_CPUS, num_gpus=SHARED_GPUS) as head:
        yield head


@pytest.fixture(scope="session")
def auth_ray_head() -> Iterator[RayHead]:
    """A head as docs/cluster.md tells a user to run one, for ``ray job submit`` and the notebook:
    Ray's token authentication (the session's token, see ``pytest_configure``), the dashboard's
    job server on 127.0.0.1, no GPUs. ``head.env`` holds what a driver needs to join it."""
    with started_head(num_cpus=3, num_gpus=0, dashboard=True) as head:
        yield head


@pytest.fixture(scope="session")
def toyworld_model() -> Path:
    """The `toyworld` preset's folder: the shipped model, or (until it is shipped) one trained for a
    single step of each stage and exported by train/train_toyworld.py, as a user would."""
    import subprocess
    import sys

    from storysync_dist.toyworld import model_folder

    folder = model_folder()
    if not (folder / "model_index.json").is_file():
        script = Path(__file__).resolve().parents[1] / "train" / "train_toyworld.py"
        work = folder.with_name(folder.name + "-training")
        for stage in ("vae", "unet"):
            extra = ["--export", str(folder)] if stage == "unet" else []
            subprocess.run([sys.executable, str(script), "--out", str(work), "--stage", stage, "--steps", "1",
                            "--batch-size", "2", "--save-every", "1", "--threads", "1", *extra],
                           check=True, capture_output=True, timeout=600)
    return folder


@pytest.fixture(scope="module")
def ray_cluster(ray_head: RayHead) -> Iterator[RayHead]:
    """This process is a driver of the shared head for the module; the module's actors go when
    it disconnects."""
    with connected(ray_head):
        yield ray_head


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    """A moto S3 server on 127.0.0.1 for the module, with its bucket, logging every request it
    serves; while it runs, every S3 client of this process (a plain ``s3://`` URL included) goes
    to it with fake credentials (tests/_s3.py)."""
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind() -> Iterator[None]:
    """A test that runs the CLI with --workers in this process starts an embedded Ray there, as
    the CLI does (it lives as long as the process): stop it when the module ends, so the next
    module starts from a process that is no Ray driver."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
