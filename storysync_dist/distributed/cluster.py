"""Joining or starting Ray, and checking that the cluster can hold the job before it starts.

Ray waits silently on a request it cannot satisfy, so the resource check fails at once with a
message instead.
"""

from __future__ import annotations

import logging
import os

import ray

from ..errors import StorySyncUserError

# Quiet the worker processes: they import diffusers and transformers, which warn about optional
# packages (torchvision) that a renderer does not need.
# Ray's switch for its single-machine mode (named for macOS/Windows, where it is the default).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def connect(address: str | None, workers: int) -> None:
    """Use the Ray already initialized in this process, join ``address``/RAY_ADDRESS, or start a
    local Ray bound to loopback (``address="local"``: a plain ``ray.init()`` would attach to any
    cluster already running on this machine)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise StorySyncUserError(f"--address {address}: cannot reach the Ray cluster ({exc})") from None
        return
    _loopback_only()
    ray.init(
        address="local",
        # Logical CPUs: one per actor (the anchor actor and every worker) even on a small machine.
        num_cpus=max(os.cpu_count() or 1, workers + 1),
        include_dashboard=False,
        logging_level=logging.WARNING,
    )


def _loopback_only() -> None:
    """Make an embedded local Ray listen on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` is rewritten to the machine's reachable IP, and the
    gRPC servers then listen on every interface; with Ray's single-machine mode (the one it uses on
    macOS and Windows) the node IP is loopback and every server binds there. Nothing outside this
    machine needs to reach an embedded Ray.
    """
    os.environ[LOCAL_ONLY_ENV] = "0"  # for the processes Ray starts
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; the env var only at import
    except (ImportError, AttributeError):  # a future Ray without the switch keeps its default
        pass


def actor_resources(workers: int) -> dict[str, float]:
    """Resources of one actor (one pipeline): a whole GPU on a GPU cluster, else one CPU.

    Raises StorySyncUserError at once when the cluster cannot hold ``workers`` of them.
    """
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus > 0:
        if workers > gpus:
            raise StorySyncUserError(
                f"--workers {workers} needs {workers} GPUs (one pipeline per GPU), "
                f"but the Ray cluster has {gpus}"
            )
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = int(total.get("CPU", 0))
    if workers > cpus:
        raise StorySyncUserError(
            f"--workers {workers} needs {workers} CPUs (the cluster has no GPUs), but it has {cpus}"
        )
    return {"num_cpus": 1}
