"""Ray clusters the tests start for themselves: a head of their own, on 127.0.0.1, with free
ports and a private ``--temp-dir``, stopped at the end by that temp dir, so no test stops a Ray
it did not create (a bare ``ray stop`` stops every Ray on the machine).

``conftest.py`` starts one such head for the whole session (``ray_head``); a module that needs a
cluster connects its pytest process to it for the module (``ray_cluster``), so the head's start
(several seconds) is paid once, not once per module.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    """A running head: its GCS ``address`` (``127.0.0.1:PORT``), the ``env`` to join it with,
    and the dashboard's job-server URL when it has one."""

    address: str
    temp_dir: str
    env: dict[str, str] = field(default_factory=dict)
    dashboard: str | None = None


def cluster_processes(temp_dir: str, also: tuple[str, ...] = ()) -> list[psutil.Process]:
    """The processes of the cluster whose temp dir is ``temp_dir``: those naming it on their
    command line (gcs_server, raylet, dashboard, monitors), those with an argument in ``also``
    (the Ray client server's proxy names only the GCS address, ``--address=HOST:PORT``, and its
    parent, ``ray start``, has exited), and all their descendants (workers, agents, a submitted
    job's driver)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if any(temp_dir in part for part in cmdline) or any(part in also for part in cmdline):
                roots.append(proc)
        except psutil.Error:
            pass
    found = {proc.pid: proc for proc in roots}
    for proc in roots:
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(temp_dir: str, also: tuple[str, ...] = ()) -> None:
    """SIGTERM, then SIGKILL after 2 s, to every process of that cluster only (nothing of a
    test cluster needs a graceful end: its temp dir goes next)."""
    procs = cluster_processes(temp_dir, also)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=2)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def started_head(*, num_cpus: int, num_gpus: int = 0, dashboard: bool = False,
                 env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> Iterator[RayHead]:
    """``ray start --head`` on 127.0.0.1 with free ports and its own temp dir; stopped (by that
    temp dir) when the block ends."""
    # Short: Ray's unix sockets live under it, and their paths are limited to ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-t-", dir="/tmp")
    head_env = dict(os.environ)
    head_env.pop("RAY_ADDRESS", None)
    head_env.update(
        # `python` in a submitted job's entrypoint is this virtual environment's.
        PATH=f"{VENV_BIN}{os.pathsep}{head_env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's single-machine mode: every server on 127.0.0.1
        **(env or {}),
    )
    port = free_port()
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}", f"--temp-dir={temp_dir}", f"--object-store-memory={300 * 1024**2}",
        # Ports that default to fixed numbers, which another Ray on this machine may hold.
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats", *extra,
    ]
    dashboard_url = None
    if dashboard:
        dashboard_port = free_port()
        command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    else:
        command.append("--include-dashboard=false")
    try:
        started = subprocess.run(command, env=head_env, capture_output=True, text=True, timeout=180, check=False)
        assert started.returncode == 0, started.stdout + started.stderr
        yield RayHead(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=head_env, dashboard=dashboard_url)
    finally:
        gcs = (f"--address=127.0.0.1:{port}",)
        stop_cluster(temp_dir, gcs)
        leftover = cluster_processes(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, leftover


@contextmanager
def connected(head: RayHead) -> Iterator[None]:
    """This pytest process as a driver of ``head`` for the block: the product's ``connect()``
    then finds Ray initialized and uses it, as in a notebook on a cluster."""
    import ray

    ray.init(address=head.address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def worker_pid(actor_name: str) -> int:
    """The process of a FrameWorker now (its ``stats`` runs in the control group, so it answers
    while the worker renders)."""
    import ray

    from storysync_dist.distributed.executor import NAMESPACE

    return ray.get(ray.get_actor(actor_name, namespace=NAMESPACE).stats.remote(), timeout=60)["pid"]


def crash_worker(actor_name: str) -> int:
    """SIGKILL a FrameWorker's process at once, as a crash would (Ray then restarts the actor).

    Unlike ``ray.kill``, which asks Ray to end the actor some milliseconds later, the signal ends
    it before this returns, so a call handed to it just before cannot finish first."""
    pid = worker_pid(actor_name)
    os.kill(pid, signal.SIGKILL)
    return pid


class PausedWorkers:
    """FrameWorkers paused with SIGSTOP (from before a job starts), so that a call handed to one
    of them cannot make any progress until the test decides: ``kill(name)`` ends one with SIGKILL
    (Ray restarts it), ``resume()`` lets the rest go. Leaving the block resumes whatever is still
    paused, so a failing test never leaves a stopped process behind."""

    def __init__(self, names: list[str]) -> None:
        self.pids = {name: worker_pid(name) for name in names}

    def __enter__(self) -> PausedWorkers:
        for pid in self.pids.values():
            os.kill(pid, signal.SIGSTOP)
        return self

    def kill(self, name: str) -> None:
        os.kill(self.pids.pop(name), signal.SIGKILL)

    def resume(self) -> None:
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.pids.clear()

    def __exit__(self, *exc: object) -> None:
        self.resume()


class KillAnchorsOnDispatch:
    """An executor ``on_event`` hook: when the anchors of ``story`` (any story when None) are handed
    out for the first time, the worker that got them is killed (SIGKILL; Ray restarts it) and the
    other paused workers go on. Pause the workers with ``pause(names)`` before the job starts: the
    worker then cannot render a single step before it dies, however loaded the machine is."""

    def __init__(self, story: str | None = None) -> None:
        self.story = story
        self.paused: PausedWorkers | None = None
        self.killed: list[str] = []
        self.dispatched: list[tuple[str, int]] = []  # (worker, attempt) of the story's anchors

    def pause(self, names: list[str]) -> PausedWorkers:
        self.paused = PausedWorkers(names)
        return self.paused

    def __call__(self, kind: str, info: dict) -> None:
        if kind != "anchors_dispatched" or (self.story is not None and info["story"] != self.story):
            return
        self.dispatched.append((info["worker"], info["attempt"]))
        if info["attempt"] == 1 and self.paused is not None and info["worker"] in self.paused.pids:
            self.paused.kill(info["worker"])
            self.killed.append(info["worker"])
            self.paused.resume()
