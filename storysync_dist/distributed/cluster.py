"""Joining or starting Ray, and deciding what each actor asks the cluster for.

Ray waits silently on a request it cannot satisfy, so the resource check here fails at once with
a message when the cluster is too small, and the executor gives up with one (``start_timeout``)
when the cluster is big enough but busy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from ..engine.devices import DTYPES, default_dtype
from ..errors import StorySyncUserError
from ..interrupts import reclaim_sigterm

log = logging.getLogger("storysync")

# Ray's switch for its single-machine mode (named for macOS/Windows, where it is the default).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Quiet the worker processes: they import diffusers and transformers, which warn about optional
# packages (torchvision) that a renderer does not need.
WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}

# Ray gives a node whose GPUs it detected (NVML) a resource "accelerator_type:<model>", e.g.
# "accelerator_type:A10G"; GPUs only declared (`ray start --num-gpus 2`, `ray.init(num_gpus=2)`)
# have none.
ACCELERATOR_TYPE_PREFIX = "accelerator_type:"

# Seconds the driver waits for a cluster address to accept a connection. Ray's own connect retries
# an unreachable address for about 13 minutes (20 tries of ~40 s each in Ray 2.60), logging a
# warning every few seconds, before it raises.
REACH_TIMEOUT = 10.0

# Keyword arguments of ``.options()`` for Ray's predefined resources; the rest go in ``resources=``.
_OPTION_NAMES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def connect(address: str | None, workers: int, object_store_memory: int | None = None,
            spill_dir: str | None = None) -> None:
    """Use the Ray already initialized in this process, join ``address``/RAY_ADDRESS, or start a
    local Ray bound to loopback (``address="local"``: a plain ``ray.init()`` would attach to any
    cluster already running on this machine), with ``object_store_memory`` bytes of object store
    and spilling to ``spill_dir`` when given (only a Ray started here takes them)."""
    if ray.is_initialized():
        if object_store_memory is not None or spill_dir is not None:
            flag = "--object-store-memory" if object_store_memory is not None else "--spill-dir"
            raise StorySyncUserError(f"{flag}: Ray is already running in this process, with its own; "
                                     "pass it to your ray.init, or call ray.shutdown() first")
        return
    where = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address, where)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise StorySyncUserError(f"{where}: cannot reach the Ray cluster ({exc})") from None
        reclaim_sigterm()  # ray.init put its own SIGTERM handler (sys.exit(15)) in place
        return
    _loopback_only()
    with _quiet_embedded_start():
        sizing: dict[str, Any] = {}
        if object_store_memory is not None:
            sizing["object_store_memory"] = int(object_store_memory)
        if spill_dir is not None:
            sizing["object_spilling_directory"] = os.path.abspath(spill_dir)
        ray.init(
            address="local",
            # Logical CPUs: one per worker (and one spare) even on a small machine.
            num_cpus=max(os.cpu_count() or 1, workers + 1),
            include_dashboard=False,
            logging_level=logging.WARNING,
            **sizing,
        )
    reclaim_sigterm()


class _EmbeddedStartNotices(logging.Filter):
    """Drops the notices Ray logs while starting a cluster that mean nothing for one this job starts
    for itself on 127.0.0.1 and stops at exit: "Token authentication is enabled for this Ray
    cluster. Set RAY_AUTH_MODE=disabled to opt out" (Ray 2.60, when RAY_AUTH_MODE is unset; the
    cluster still uses the token). Nothing else is dropped, and joining a cluster drops nothing."""

    NOTICES = (("_warn_token_auth_enabled", "Token authentication is enabled for this Ray cluster"),)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.funcName == func or message.startswith(text) for func, text in self.NOTICES)


# The loggers that log _EmbeddedStartNotices' notices.
_EMBEDDED_START_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


@contextlib.contextmanager
def _quiet_embedded_start() -> Iterator[None]:
    """While an embedded Ray starts: without the notices of :class:`_EmbeddedStartNotices`."""
    notices = _EmbeddedStartNotices()
    loggers = [logging.getLogger(name) for name in _EMBEDDED_START_LOGGERS]
    for logger in loggers:
        logger.addFilter(notices)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notices)


def _check_reachable(address: str, where: str) -> None:
    """Fail at once, in one line naming ``where`` the address came from, when nothing accepts a
    connection at ``host:port`` (or ``ray://host:port``), instead of Ray's minutes of retries;
    ``auto`` and other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StorySyncUserError(f"{where}: cannot reach the Ray cluster ({reason})") from None


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


@dataclass(frozen=True)
class ActorResources:
    """What every actor of a job (each FrameWorker) asks Ray for, and the
    device it renders on.

    ``amounts`` uses Ray's resource names (``GPU``, ``CPU``, ``memory``, custom ones); ``device``
    is ``"cuda"``, ``"cpu"`` or the explicit ``--device``; ``dtype`` the pipeline's dtype name.
    """

    amounts: dict[str, float]
    device: str
    dtype: str

    def ray_options(self) -> dict[str, Any]:
        """The ``.options()`` keywords: num_gpus/num_cpus/memory, the rest in ``resources``."""
        options: dict[str, Any] = {}
        custom: dict[str, float] = {}
        for name, amount in self.amounts.items():
            if name in _OPTION_NAMES:
                options[_OPTION_NAMES[name]] = amount
            else:
                custom[name] = amount
        if custom:
            options["resources"] = custom
        return options

    def describe(self) -> str:
        """``"1 GPU, 1 CPU"``."""
        return ", ".join(f"{amount:g} {name}" for name, amount in self.amounts.items()) or "no resources"

    def fits(self, available: dict[str, float], actors: int) -> bool:
        """Whether ``available`` holds the resources of ``actors`` actors."""
        return all(available.get(name, 0) >= amount * actors for name, amount in self.amounts.items())


def cluster_usage(names: list[str]) -> str:
    """``"GPU 0 of 2 free, CPU 3 of 4 free"`` for the resource ``names``, right now."""
    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{name} {free.get(name, 0):g} of {total.get(name, 0):g} free" for name in names)


def gpus_are_physical(total: dict[str, float] | None = None) -> bool:
    """Whether the cluster's GPUs were detected by Ray (a node reports an accelerator type) rather
    than only declared (``--num-gpus`` on a machine without them, as the tests do)."""
    total = ray.cluster_resources() if total is None else total
    return any(name.startswith(ACCELERATOR_TYPE_PREFIX) for name in total)


def actor_resources(
    workers: int,
    device: str | None = None,
    resources_per_worker: dict[str, float] | None = None,
    dtype: str | None = None,
    model: str | None = None,
) -> ActorResources:
    """Resources and device of one actor (one pipeline), following ``--device``:

    - ``--device cpu``: one CPU, even on a cluster with GPUs;
    - ``--device cuda``: one GPU (an error at once when the cluster has none); with Ray each
      worker sees only its own GPU (CUDA_VISIBLE_DEVICES), so an index (``cuda:1``) is an error;
    - no ``--device``: one GPU (and one CPU) when the cluster has GPUs, else one CPU. The actors
      render on CUDA when Ray detected the GPUs, and on the CPU when the GPUs are only declared;
    - ``resources_per_worker`` (``{"GPU": 1, "CPU": 2}``, custom resources) replaces the request.

    ``dtype`` is ``--dtype``; without it the engine's default for the device and ``model``
    (``engine.devices.default_dtype``), the one ``prepare_job`` plans the frames with.

    Raises StorySyncUserError at once when the cluster, idle, could not hold ``workers`` actors.
    """
    if dtype is not None and dtype not in DTYPES:
        raise StorySyncUserError(f"--dtype {dtype!r}: choose float16, bfloat16 or float32")
    device = _check_device(device)
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    if resources_per_worker is not None:
        amounts = _check_amounts(resources_per_worker)
    elif device is None:
        amounts = {"GPU": 1.0, "CPU": 1.0} if gpus > 0 else {"CPU": 1.0}
    elif device.startswith("cuda"):
        if gpus <= 0:
            raise StorySyncUserError(
                f"--device {device}: the Ray cluster has no GPUs ({cluster_usage(['CPU'])}); "
                "pass --device cpu, or use a cluster with GPUs"
            )
        amounts = {"GPU": 1.0, "CPU": 1.0}
    else:
        amounts = {"CPU": 1.0}

    wants_gpu = amounts.get("GPU", 0) > 0
    if device is not None and device.startswith("cuda") and not wants_gpu:
        raise StorySyncUserError(
            f"--device {device}: resources_per_worker {resources_per_worker} reserves no GPU for the actors; "
            "add \"GPU\": 1, or pass --device cpu"
        )
    if device is None:
        device = "cpu"
        if wants_gpu:
            if gpus_are_physical(total):
                device = "cuda"
            else:
                log.warning("the Ray cluster's GPUs are declared, not detected (no node reports an accelerator "
                            "type): each actor holds a GPU and renders on the CPU; pass --device cuda to insist")
    _check_totals(workers, amounts, total, device, explicit=resources_per_worker is not None)
    return ActorResources(amounts=amounts, device=device, dtype=dtype or default_dtype(device, model))


def _check_device(device: str | None) -> str | None:
    """``--device`` as the actors get it (``cuda:0`` is ``cuda``); an index other than 0 is an error."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise StorySyncUserError(f"--device {device!r}: not a torch device (e.g. cpu, cuda)") from None
    if parsed.type == "cuda":
        if parsed.index not in (None, 0):
            raise StorySyncUserError(
                f"--device {device}: with --workers, Ray assigns each worker its own GPU (through "
                "CUDA_VISIBLE_DEVICES, so every worker sees it as cuda:0); pass --device cuda"
            )
        return "cuda"
    return device


def _check_amounts(resources: dict[str, float]) -> dict[str, float]:
    amounts: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise StorySyncUserError(f"resources_per_worker: {name!r} is not a resource name")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount < 0:
            raise StorySyncUserError(f"resources_per_worker: {name!r} must be a number >= 0, got {amount!r}")
        amounts[name] = float(amount)
    if not any(amounts.values()):
        raise StorySyncUserError("resources_per_worker: ask for at least one resource (e.g. {\"GPU\": 1})")
    return amounts


def _check_totals(workers: int, amounts: dict[str, float], total: dict[str, float], device: str,
                  *, explicit: bool) -> None:
    """Whether an idle cluster could hold ``workers`` actors at once (the anchor actor borrows a
    worker's share before the workers start, so ``workers`` is the peak)."""
    for name, amount in amounts.items():
        need, have = amount * workers, total.get(name, 0)
        if need <= have:
            continue
        if explicit:
            raise StorySyncUserError(
                f"--workers {workers} with resources_per_worker {amounts} needs {need:g} {name}, "
                f"but the Ray cluster has {have:g}"
            )
        if name == "GPU":
            raise StorySyncUserError(
                f"--workers {workers} needs {need:g} GPUs (one pipeline per GPU), but the Ray cluster has {have:g}"
            )
        reason = "--device cpu" if device == "cpu" and total.get("GPU", 0) > 0 else "the cluster has no GPUs"
        raise StorySyncUserError(
            f"--workers {workers} needs {need:g} CPUs (one pipeline per CPU: {reason}), but it has {have:g}"
        )


# The share of the smallest node's object store that open stories' anchor steps may fill: the
# rest is for the frames in flight and the anchors streaming.
OBJECT_STORE_SHARE = 0.8


def object_store_budget() -> int | None:
    """Bytes of anchor steps the job may keep open at once: ``OBJECT_STORE_SHARE`` of the smallest
    object store among the cluster's alive nodes (every node with frame workers holds the steps of
    each story they render), or None when Ray reports none."""
    stores = [node.get("Resources", {}).get("object_store_memory", 0) for node in ray.nodes() if node.get("Alive")]
    stores = [s for s in stores if s > 0]
    return int(OBJECT_STORE_SHARE * min(stores)) if stores else None

