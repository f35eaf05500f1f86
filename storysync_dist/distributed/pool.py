"""The driver's pool of FrameWorker actors: starting them, noticing when they are placed, ready,
restarting or gone, bounding every wait by ``--start-timeout``, and the errors a job ends with
when they fail. The scheduler (``scheduler.py``) decides what each ready worker does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError, RayTaskError

from ..errors import RenderError, StorySyncUserError
from .actors import FrameWorker
from .cluster import WORKER_ENV, ActorResources, cluster_usage
from .failures import UNKNOWN_HOST, Failure, describe_actors, failure_of

log = logging.getLogger("storysync")

WORKER_RESTARTS = 3
LOG_EVERY = 15.0  # seconds between "still waiting for resources" lines
RETRY_DELAY = 1.0  # seconds before asking a restarting actor again (Ray refuses calls meanwhile)
NAMESPACE = "storysync"


@dataclass
class Worker:
    """The driver's view of one FrameWorker: where it is in starting up, and its last failure."""

    index: int
    actor_name: str  # the Ray actor's name, in the storysync namespace
    handle: Any
    placed_ref: Any = None
    ready_ref: Any = None
    placed: bool = False
    ready: bool = False
    since: float = 0.0  # when the current wait for this actor to be placed began
    retry_at: float | None = None  # ask again then: Ray is restarting the actor
    failures: int = 0
    gone: bool = False
    host: str = UNKNOWN_HOST
    error: Failure | None = None
    role: str = "worker"
    busy_seconds: float = 0.0  # driver-side: time between handing out a call and its result

    def watch(self, *, restart: bool = False) -> None:
        """Ask where the actor is (``placed``) and for its pipeline (``ready``), anew."""
        self.placed_ref, self.ready_ref = self.handle.placed.remote(), self.handle.ready.remote()
        self.placed = self.ready = False
        self.retry_at = None
        if not restart:
            self.since = time.monotonic()

    @property
    def name(self) -> str:
        return f"worker {self.index}"

    @property
    def usable(self) -> bool:
        return self.ready and not self.gone


class WorkerPool:
    """``count`` FrameWorker actors with ``resources`` each, named ``storysync-<pool id>-worker-<i>``
    in the ``storysync`` namespace (``ray.get_actor(name, namespace="storysync")`` finds one)."""

    def __init__(self, count: int, resources: ActorResources, actor_args: tuple, start_timeout: float) -> None:
        self.count = count
        self.resources = resources
        self.actor_args = actor_args
        self.start_timeout = start_timeout
        self.pool_id = uuid.uuid4().hex[:8]
        self.workers: list[Worker] = []
        self.devices: dict[int, dict[str, Any]] = {}
        self._last_wait_log = 0.0

    @property
    def names(self) -> list[str]:
        return [f"storysync-{self.pool_id}-worker-{i}" for i in range(self.count)]

    def start(self) -> None:
        """Request every worker at once: they load their pipelines in parallel."""
        if self.workers:
            return
        cls = ray.remote(concurrency_groups=FrameWorker.CONCURRENCY_GROUPS)(FrameWorker)
        options = {**self.resources.ray_options(), "runtime_env": {"env_vars": WORKER_ENV},
                   "max_restarts": WORKER_RESTARTS, "max_task_retries": 0, "namespace": NAMESPACE}
        for index, name in enumerate(self.names):
            handle = cls.options(name=name, **options).remote(*self.actor_args)
            worker = Worker(index, name, handle)
            worker.watch()
            self.workers.append(worker)

    def wait_ready(self) -> list[str]:
        """Start the workers and wait until each is ready or gone (``start_timeout`` applies as
        in a job); return the names of the ready ones."""
        self.start()
        while True:
            waiting = [w for w in self.workers if not (w.ready or w.gone)]
            unplaced = [w for w in waiting if not w.placed]
            # Workers the cluster has not placed within start_timeout while others are ready: a job
            # would go on with the ready ones, and so does this (check_start raises when none is).
            overdue = bool(unplaced) and time.monotonic() - max(w.since for w in unplaced) >= self.start_timeout
            if not waiting or (overdue and len(unplaced) == len(waiting) and any(w.usable for w in self.workers)):
                break
            self.wait([])
        if self.all_gone():
            raise self.failed_error()
        return [w.actor_name for w in self.workers if w.usable]

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker.handle)
        self.workers = []

    # ---- events ---------------------------------------------------------------------------
    def start_refs(self) -> dict[Any, Worker]:
        """The pending ``placed``/``ready`` refs, after re-asking workers whose restart is due."""
        now = time.monotonic()
        refs: dict[Any, Worker] = {}
        for worker in self.workers:
            if not worker.gone and worker.retry_at is not None and worker.retry_at <= now:
                worker.watch(restart=True)
            if not (worker.gone or worker.ready or worker.retry_at is not None):
                if not worker.placed:
                    refs[worker.placed_ref] = worker
                refs[worker.ready_ref] = worker
        return refs

    def on_start_event(self, worker: Worker, ref: Any) -> None:
        """A ``placed`` or ``ready`` call finished: note where the worker is, or why it failed."""
        try:
            info = ray.get(ref)
        except RayTaskError as exc:  # raised while loading: a bad --model/--device, a broken folder
            _learn_host(worker)
            worker.error = dataclasses.replace(failure_of(exc), at_start=True)
            worker.gone = True
            ray.kill(worker.handle)
            log.warning("worker %d could not start on %s: %s", worker.index, worker.host, worker.error.summary)
            return
        except ActorUnavailableError:  # Ray is restarting it
            worker.retry_at = time.monotonic() + RETRY_DELAY
            return
        except RayActorError as exc:  # dead for good (restarts used up, or died in __init__)
            _learn_host(worker)
            worker.error = dataclasses.replace(failure_of(exc), at_start=worker.error is None)
            worker.gone = True
            log.warning("worker %d is gone: %s", worker.index, worker.error.summary)
            return
        worker.host = info["host"]
        worker.placed = True
        if ref is worker.ready_ref:
            worker.ready = True
            entry = {"role": "worker", "index": worker.index, "host": info["host"], "pid": info["pid"],
                     "device": info["device"], "gpu_ids": list(info["gpu_ids"]), "threads": info["threads"]}
            self.devices[worker.index] = entry
            log.info("worker %d ready on %s (pid %d): device %s, Ray GPU ids %s, %d torch threads", worker.index,
                     entry["host"], entry["pid"], entry["device"], entry["gpu_ids"] or "none", entry["threads"])

    def lost(self, worker: Worker, exc: RayActorError) -> None:
        """The worker died during a call: Ray restarts it (up to WORKER_RESTARTS times)."""
        worker.error = failure_of(exc)
        worker.failures += 1
        if worker.failures <= WORKER_RESTARTS:
            worker.watch()
        else:
            worker.gone = True
            log.warning("worker %d is gone for good: %s", worker.index, worker.error.summary)

    def tick(self) -> float:
        """How long the scheduler may wait for the next event."""
        now = time.monotonic()
        until = [LOG_EVERY]
        until += [w.since + self.start_timeout - now for w in self.workers if not (w.gone or w.placed)]
        until += [w.retry_at - now for w in self.workers if not w.gone and w.retry_at is not None]
        return max(0.05, min([t for t in until if t > 0] or [LOG_EVERY]))

    def check_start(self, *, running: bool) -> None:
        """Log what unplaced workers wait for every LOG_EVERY seconds; raise once ``start_timeout``
        passed with none of them placed and nothing running."""
        waiting = [w for w in self.workers if not (w.gone or w.placed)]
        if not waiting:
            return
        now = time.monotonic()
        progress = running or any(w.placed and not w.gone for w in self.workers)
        if not progress and now - max(w.since for w in waiting) >= self.start_timeout:
            raise StorySyncUserError(self._timeout_message(waiting))
        longest = now - min(w.since for w in waiting)
        if longest >= LOG_EVERY and now - self._last_wait_log >= LOG_EVERY:
            self._last_wait_log = now
            log.warning("waiting %.0fs (of --start-timeout %g) for the Ray cluster to place %d of %d frame worker(s), "
                        "each asking for %s; the cluster has %s", longest, self.start_timeout, len(waiting),
                        self.count, self.resources.describe(), cluster_usage(list(self.resources.amounts)))

    def _timeout_message(self, waiting: list[Worker]) -> str:
        timeout = self.start_timeout
        return (
            f"--start-timeout {timeout:g}: the Ray cluster did not place {len(waiting)} of {self.count} frame "
            f"worker(s) within {timeout:g}s; each asks for {self.resources.describe()}, and the cluster has "
            f"{cluster_usage(list(self.resources.amounts))} (other jobs or actors hold the rest): free them, "
            "add nodes, lower --workers, or raise --start-timeout"
        )

    def wait(self, calls: Collection[Any], timeout: float | None = None) -> Any | None:
        """Wait (one tick, or ``timeout``, at most) for the next event: a start event is handled
        here; a finished ref (or generator with a new item) of ``calls`` is returned."""
        start = self.start_refs()
        self.check_start(running=bool(calls))
        refs = [*start, *calls]  # start events first: quick to handle, and they name the hosts
        timeout = self.tick() if timeout is None else min(timeout, self.tick())
        if not refs:
            time.sleep(timeout)
            return None
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            return None
        if done[0] in start:
            self.on_start_event(start[done[0]], done[0])
            return None
        return done[0]

    def all_gone(self) -> bool:
        return bool(self.workers) and all(w.gone for w in self.workers)

    def failed_error(self) -> Exception:
        """The error of a job none of whose workers is left: their causes, one line (a
        ``RenderError``, exit code 1, unless every cause was the user's)."""
        failed = [w for w in self.workers if w.gone]
        if failed and all(w.error is not None and w.error.user and w.error.at_start for w in failed):
            users: dict[str, list[Worker]] = {}
            for worker in failed:
                users.setdefault(worker.error.user if worker.error and worker.error.user else "", []).append(worker)
            return StorySyncUserError("; ".join(f"{message} ({describe_actors(group)})" for message, group in users.items()))
        causes: dict[str, list[Worker]] = {}
        for worker in failed:
            causes.setdefault(worker.error.summary if worker.error else "no cause reported", []).append(worker)
        details = "; ".join(f"{describe_actors(group)}: {summary}" for summary, group in causes.items())
        if all(w.error is not None and w.error.at_start for w in failed):
            error = RenderError(f"the job's actors could not start: {details}")
        else:
            error = RenderError("every frame worker failed, so the frames not yet written are lost for this "
                                f"run (rerun the job to render them): {details}")
        error.__cause__ = next((w.error.exc for w in reversed(failed) if w.error and w.error.exc), None)
        return error

    def stats(self) -> list[dict]:
        """Each worker's ``stats()`` ({} for one that is gone or was never placed) plus the driver's
        view of its busy time; a worker still loading is waited for (30 s at most)."""
        stats = []
        for worker in self.workers:
            placed = worker.placed or (worker.placed_ref is not None and bool(ray.wait([worker.placed_ref], timeout=0)[0]))
            if worker.gone or not placed:
                stats.append({})
                continue
            try:
                info = ray.get(worker.handle.stats.remote(), timeout=30)
            except (RayActorError, RayTaskError, GetTimeoutError):
                stats.append({})
                continue
            stats.append({**info, "index": worker.index, "driver_busy_seconds": worker.busy_seconds})
            if worker.index not in self.devices:
                self.devices[worker.index] = {
                    "role": "worker", "index": worker.index,
                    **{key: info[key] for key in ("host", "pid", "device", "gpu_ids", "threads")},
                }
        return stats

    def device_list(self) -> list[dict[str, Any]]:
        return [self.devices[i] for i in sorted(self.devices)]


def _learn_host(worker: Worker) -> None:
    """The worker's host from its ``placed()`` answer, when that came but was not handled yet."""
    if worker.host != UNKNOWN_HOST or worker.placed_ref is None or not ray.wait([worker.placed_ref], timeout=0)[0]:
        return
    try:
        worker.host = ray.get(worker.placed_ref)["host"]
    except RayError:
        pass
