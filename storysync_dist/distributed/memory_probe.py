"""The free memory where Ray workers will render, read before their pool starts
(``engine.memory.check_memory`` through ``RayExecutor.worker_free_memory``)."""

from __future__ import annotations

import logging
import socket
from typing import Any

import ray

from ..engine.free_memory import FreeMemory, cap_free, device_free, device_type, host_available

__all__ = ["PROBE_TIMEOUT", "all_nodes_here", "free_memory_on_workers", "worker_free_memory"]

log = logging.getLogger("storysync")

# Seconds a probe of the workers' free memory may wait for Ray to place it.
PROBE_TIMEOUT = 60.0


def _probe(device: str) -> tuple[str, int | None]:
    return socket.gethostname(), device_free(device)


def free_memory_on_workers(ray_options: dict[str, Any], device: str, workers: int,
                           timeout: float = PROBE_TIMEOUT) -> FreeMemory | None:
    """The free memory one worker will see, for a Ray pool that has not started yet.

    On a GPU: a Ray task asking for what one worker asks (``ray_options``) reads
    ``torch.cuda.mem_get_info`` of the GPU Ray gives it and exits (``max_calls=1``, so its CUDA
    context is gone before the workers start). On a CPU: when every live node of the cluster is
    this machine, its ``MemAvailable`` (capped by ``STORYSYNC_MEMORY_LIMIT``) shared by the
    ``workers``, each of which loads its own pipeline; on a cluster of other machines, the same
    probe as on a GPU. None when the probe is not placed within ``timeout`` seconds (the check
    is then skipped, with a log line).
    """
    kind = device_type(device)
    if kind == "cpu" and all_nodes_here():
        machine = cap_free(host_available(), "this machine")
        if machine is None or workers <= 1:
            return machine
        return FreeMemory(machine.bytes // workers, f"this machine (1/{workers} of it per worker)", machine.capped)
    task = ray.remote(max_calls=1, max_retries=0)(_probe).options(**ray_options)
    ref = task.remote(device)
    ready, _ = ray.wait([ref], timeout=timeout)
    if not ready:
        ray.cancel(ref, force=True)
        log.warning("memory check skipped: a probe of the workers' free memory was not placed within %.0f s", timeout)
        return None
    host, free = ray.get(ref)
    return cap_free(free, f"{device} on {host}")


def all_nodes_here() -> bool:
    """Whether every live node of the cluster is this machine."""
    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") == here for n in nodes)


def worker_free_memory(resources: Any, device: str, workers: int, start_timeout: float) -> FreeMemory | None:
    """The free memory one worker of a pool not started yet will see (``resources``: its
    ``cluster.ActorResources``). On a GPU or a cluster of other machines the probe takes a
    worker's resources for a moment: only while the cluster has them free, so a busy cluster never
    waits on it (the pool's own ``--start-timeout`` rules that wait)."""
    if device_type(device) != "cpu" or not all_nodes_here():
        if not resources.fits(ray.available_resources(), 1):
            log.info("memory check skipped: no free worker slot to read the free memory of %s", device)
            return None
    return free_memory_on_workers(resources.ray_options(), device, workers, min(PROBE_TIMEOUT, float(start_timeout)))
