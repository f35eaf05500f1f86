"""The Ray executor: the driver plans and writes, actors render.

1. The AnchorActor renders the anchor frames and streams one object per denoising step; the
   objects are owned by the driver (returned by a generator method), so they survive the actor,
   which is released as soon as the anchors are done.
2. FrameWorker actors (one pipeline on one GPU each, or one CPU each, following ``--device``)
   load their pipelines while the anchors render, then take frames one at a time as they free up,
   so a slow worker never holds a queue. Each worker pulls the anchor steps once and keeps them
   resident.
3. A worker that dies mid-frame costs only that frame: it goes back to the queue for the next free
   worker while Ray restarts the actor. The driver writes each frame once, as it arrives.
4. If the anchor actor dies, a FrameWorker that is ready renders the anchors again (never a fresh
   AnchorActor: with as many GPUs as workers, the dead actor's GPU goes to a queued worker and a
   new AnchorActor would wait for a GPU forever).
5. Every wait for an actor to be placed is bounded by ``RenderOptions.start_timeout``; a job whose
   actors fail to start fails with their causes (``StorySyncUserError`` when they are the user's).

Used as a context manager (``with RayExecutor(options) as executor:``) the executor is *pooled*:
its FrameWorkers stay up from one story to the next (a dataset of many short stories loads each
pipeline once, not once per story), and each story's anchors render on one of them
(``FrameWorker.render_anchors``) instead of on a separate AnchorActor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError, RayTaskError

from ..core.anchors import AnchorBundle
from ..engine.job import JobContext, JobPlan, RenderOptions
from ..engine.renderer import FrameJob, FrameOutput
from ..errors import StorySyncUserError
from .actors import AnchorActor, FrameWorker
from .cluster import WORKER_ENV, actor_resources, cluster_usage, connect
from .failures import UNKNOWN_HOST, Failure, describe_actors, failure_of

log = logging.getLogger("storysync")

MAX_FRAME_ATTEMPTS = 3
MAX_ANCHOR_ATTEMPTS = 2
WORKER_RESTARTS = 3
LOG_EVERY = 15.0  # seconds between "still waiting for resources" lines
RETRY_DELAY = 1.0  # seconds before asking a restarting actor again (Ray refuses calls meanwhile)


@dataclass
class _Actor:
    """The driver's view of one actor: where it is in starting up, and its last failure."""

    role: str  # "anchor" or "worker"
    index: int
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

    @property
    def name(self) -> str:
        return "the anchor actor" if self.role == "anchor" else f"worker {self.index}"

    def watch(self, *, restart: bool = False) -> None:
        """Ask where the actor is (``placed``) and for its pipeline (``ready``), anew."""
        self.placed_ref, self.ready_ref = self.handle.placed.remote(), self.handle.ready.remote()
        self.placed = self.ready = False
        self.retry_at = None
        if not restart:
            self.since = time.monotonic()


class RayExecutor:
    """Renders a planned job on ``options.workers`` Ray actors (see the module docstring).

    ``device`` is the device kind the actors render on, decided here from ``--device`` and the
    cluster (``"cuda"`` when the cluster's GPUs were detected by Ray, ``"cpu"``, or the explicit
    ``--device``); the engine derives the default dtype, part of every frame's identity, from it.
    """

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self.pooled = False  # set by __enter__: keep the workers between jobs
        connect(options.address, options.workers)
        # Fails fast when the cluster is too small, or --device does not fit it.
        self.resources = actor_resources(options.workers, options.device, options.resources_per_worker,
                                         options.dtype)
        self.device: str = self.resources.device
        self.workers: list[Any] = []  # the FrameWorker handles, by index
        self.anchor_actor: Any = None  # whatever renders the anchors right now (AnchorActor or worker)
        self.anchor_attempts = 0
        # Called on the driver as each anchor object arrives (its index); for progress and tests.
        self.on_anchor_object: Callable[[int], None] | None = None
        self.busy: dict[int, str] = {}  # worker index -> frame id in flight (for tests and logs)
        self.retried: list[str] = []
        self._pool: list[_Actor] = []
        self._anchor: _Actor | None = None
        self._devices: dict[tuple[str, int], dict[str, Any]] = {}
        self._last_wait_log = 0.0

    def __enter__(self) -> RayExecutor:
        self.pooled = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor this executor started."""
        for actor in [self._anchor, *self._pool]:
            if actor is not None:
                ray.kill(actor.handle)
        self._pool, self._anchor = [], None
        self.workers, self.anchor_actor = [], None

    # ---- starting actors ------------------------------------------------------------------
    def _actor_args(self) -> tuple:
        return (self.options.model, self.resources.device, self.options.device, self.resources.dtype)

    @staticmethod
    def _story_args(plan: JobPlan) -> tuple[dict, dict]:
        """What a job tells an actor with each call: the config and sampling settings (plain dicts)."""
        return plan.config.to_dict(), dataclasses.asdict(plan.settings)

    def _options(self, **extra: Any) -> dict[str, Any]:
        return {**self.resources.ray_options(), "runtime_env": {"env_vars": WORKER_ENV}, **extra}

    def _start_anchor_actor(self) -> None:
        handle = ray.remote(AnchorActor).options(**self._options(max_restarts=0)).remote(*self._actor_args())
        self._anchor = _Actor("anchor", 0, handle)
        self._anchor.watch()

    def _start_workers(self) -> None:
        options = self._options(max_restarts=WORKER_RESTARTS, max_task_retries=0)
        for w in range(self.options.workers):
            actor = _Actor("worker", w, ray.remote(FrameWorker).options(**options).remote(*self._actor_args()))
            actor.watch()
            self._pool.append(actor)
        self.workers = [a.handle for a in self._pool]

    def _on_start_event(self, actor: _Actor, ref: Any) -> None:
        """A ``placed`` or ``ready`` call of ``actor`` finished: note where it is, or why it failed."""
        try:
            info = ray.get(ref)
        except RayTaskError as exc:  # raised while loading: a bad --model/--device, a broken folder
            _learn_host(actor)
            actor.error = dataclasses.replace(failure_of(exc), at_start=True)
            actor.gone = True
            ray.kill(actor.handle)
            log.warning("%s could not start on %s: %s", actor.name, actor.host, actor.error.summary)
            return
        except ActorUnavailableError:  # Ray is restarting it
            actor.retry_at = time.monotonic() + RETRY_DELAY
            return
        except RayActorError as exc:  # dead for good (restarts used up, or died in __init__)
            _learn_host(actor)
            actor.error = dataclasses.replace(failure_of(exc), at_start=actor.error is None)
            actor.gone = True
            log.warning("%s is gone: %s", actor.name, actor.error.summary)
            return
        actor.host = info["host"]
        actor.placed = True
        if ref is actor.ready_ref:
            actor.ready = True
            entry = {"role": actor.role, "index": actor.index, "host": info["host"], "pid": info["pid"],
                     "device": info["device"], "gpu_ids": list(info["gpu_ids"]), "threads": info["threads"]}
            self._devices[(actor.role, actor.index)] = entry
            log.info("%s ready on %s (pid %d): device %s, Ray GPU ids %s, %d torch threads", actor.name,
                     entry["host"], entry["pid"], entry["device"], entry["gpu_ids"] or "none", entry["threads"])

    def _poll(self, actors: list[_Actor], frames: Collection[Any] = ()) -> Any | None:
        """Wait (one tick at most) for the next event. Start events of ``actors`` are handled here;
        a finished ref of ``frames`` is returned. Raises the start-timeout error when none of
        ``actors`` could be placed within ``start_timeout`` and nothing else is running."""
        now = time.monotonic()
        for actor in actors:
            if not actor.gone and actor.retry_at is not None and actor.retry_at <= now:
                actor.watch(restart=True)
        start: dict[Any, _Actor] = {}
        for actor in actors:
            if not (actor.gone or actor.ready or actor.retry_at is not None):
                if not actor.placed:
                    start[actor.placed_ref] = actor
                start[actor.ready_ref] = actor
        self._check_start(actors, running=bool(frames))
        refs = [*start, *frames]  # start events first: they are quick to handle, and name the hosts
        timeout = self._tick(actors)
        if not refs:
            time.sleep(timeout)
            return None
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            return None
        if done[0] in start:
            self._on_start_event(start[done[0]], done[0])
            return None
        return done[0]

    def _tick(self, actors: list[_Actor]) -> float:
        now = time.monotonic()
        until = [LOG_EVERY]
        until += [a.since + self.options.start_timeout - now for a in actors if not (a.gone or a.placed)]
        until += [a.retry_at - now for a in actors if not a.gone and a.retry_at is not None]
        return max(0.05, min([t for t in until if t > 0] or [LOG_EVERY]))

    def _check_start(self, actors: list[_Actor], *, running: bool) -> None:
        """Log what unplaced actors wait for every LOG_EVERY seconds; raise once ``start_timeout``
        passed with none of ``actors`` placed and no frame running."""
        waiting = [a for a in actors if not (a.gone or a.placed)]
        if not waiting:
            return
        now = time.monotonic()
        progress = running or any(a.placed and not a.gone for a in actors)
        if not progress and now - max(a.since for a in waiting) >= self.options.start_timeout:
            raise StorySyncUserError(self._timeout_message(waiting))
        longest = now - min(a.since for a in waiting)
        if longest >= LOG_EVERY and now - self._last_wait_log >= LOG_EVERY:
            self._last_wait_log = now
            log.warning("waiting %.0fs (of --start-timeout %g) for the Ray cluster to place %s, each asking for "
                        "%s; the cluster has %s", longest, self.options.start_timeout, self._who_waits(waiting),
                        self.resources.describe(), cluster_usage(list(self.resources.amounts)))

    def _who_waits(self, waiting: list[_Actor]) -> str:
        parts = []
        if any(a.role == "anchor" for a in waiting):
            parts.append("the anchor actor")
        workers = sum(a.role == "worker" for a in waiting)
        if workers:
            parts.append(f"{workers} of {self.options.workers} frame worker(s)")
        return " and ".join(parts)

    def _timeout_message(self, waiting: list[_Actor]) -> str:
        timeout = self.options.start_timeout
        return (
            f"--start-timeout {timeout:g}: the Ray cluster did not place {self._who_waits(waiting)} within "
            f"{timeout:g}s; each asks for {self.resources.describe()}, and the cluster has "
            f"{cluster_usage(list(self.resources.amounts))} (other jobs or actors hold the rest): free them, "
            "add nodes, lower --workers, or raise --start-timeout"
        )

    def _first_ready(self, candidates: list[_Actor]) -> _Actor:
        """Wait until one of ``candidates`` is ready (its pipeline loaded) and return it. The anchor
        actor, when among them, wins whenever it is placed: a worker takes its place only if the
        anchor actor cannot be placed or failed for a reason not the user's."""
        while True:
            anchor = next((a for a in candidates if a.role == "anchor"), None)
            if anchor is not None and anchor.gone and anchor.error is not None and anchor.error.user:
                raise self._failed_error([anchor])  # the workers would fail the same way
            live = [a for a in candidates if not a.gone]
            if not live:
                raise self._failed_error(candidates)
            for actor in live:
                if actor.ready:
                    if actor.role == "worker" and anchor is not None and not anchor.gone and anchor.placed:
                        break  # the anchor actor is loading: wait for it
                    return actor
            self._poll(live)

    # ---- anchors --------------------------------------------------------------------------
    def _anchor_renderer(self, exclude: _Actor | None) -> _Actor:
        """The actor to render the anchors on: the AnchorActor, else a ready worker (not ``exclude``,
        which just died while rendering them, unless no other worker is left)."""
        candidates = [self._anchor] if self._anchor is not None else []  # if gone, its cause still counts
        workers = [a for a in self._pool if not a.gone and a is not exclude]
        if not workers and exclude is not None and not exclude.gone:
            workers = [exclude]
        now = time.monotonic()
        for actor in workers:
            if not actor.placed:
                actor.since = now  # until now the anchors held what these wait for
        chosen = self._first_ready(candidates + workers)
        if chosen is not self._anchor and self._anchor is not None:
            ray.kill(self._anchor.handle)  # it would only hold resources now
            self._anchor = None
        return chosen

    def _render_anchors(self, plan: JobPlan) -> tuple[list[Any], dict]:
        """Run the anchors (again on a ready worker if their actor dies); return step refs and the tail."""
        exclude: _Actor | None = None
        for attempt in range(1, MAX_ANCHOR_ATTEMPTS + 1):
            self.anchor_attempts = attempt
            actor = self._anchor_renderer(exclude)
            self.anchor_actor = actor.handle
            try:
                refs = []
                for ref in actor.handle.render_anchors.remote(plan.anchor_jobs, *self._story_args(plan)):
                    refs.append(ref)
                    if self.on_anchor_object is not None:
                        self.on_anchor_object(len(refs) - 1)
                tail = ray.get(refs.pop())
                return refs, tail
            except RayActorError as exc:
                actor.error = failure_of(exc)
                if attempt == MAX_ANCHOR_ATTEMPTS:
                    raise RuntimeError(f"the anchors failed {attempt} times; the last time {actor.name} on "
                                       f"{actor.host} died: {actor.error.summary}") from exc
                # The anchors are deterministic: render them again on a ready worker.
                log.warning("%s died while rendering the anchors (%s); rendering them again on a worker",
                            actor.name, actor.error.summary)
                if actor.role == "anchor":
                    ray.kill(actor.handle)
                    self._anchor = None
                else:
                    actor.failures += 1
                    actor.watch()  # Ray restarts it; it rejoins the pool when ready
                    exclude = actor
            except RayTaskError as exc:
                raise RuntimeError(f"the anchors failed on {actor.name} ({actor.host}): "
                                   f"{failure_of(exc).summary}") from exc
        raise AssertionError("unreachable")

    # ---- the job --------------------------------------------------------------------------
    def __call__(self, plan: JobPlan, ctx: JobContext) -> dict:
        stats: dict[str, Any] = {"workers": self.options.workers}
        if not plan.anchor_jobs and not plan.frame_jobs:
            return stats  # nothing renders (an imported bundle to save, say): start no actors
        try:
            if not self.pooled:
                self._devices.clear()
            if plan.anchor_jobs and not self.pooled:
                self._start_anchor_actor()
                if self.resources.fits(ray.available_resources(), self.options.workers + 1):
                    self._start_workers()  # room for all of them: every pipeline loads at once
                else:
                    # The anchor actor is placed (and ready) first, so workers queued behind it on
                    # a full cluster cannot starve it; they get its GPU once the anchors are done.
                    assert self._anchor is not None
                    self._first_ready([self._anchor])
                    self._start_workers()
            elif not self._pool:
                self._start_workers()
            step_refs, meta = None, None
            if plan.anchor_jobs:
                t0 = time.perf_counter()
                step_refs, tail = self._render_anchors(plan)
                stats["anchor_seconds"] = time.perf_counter() - t0
                stats["anchor_bytes"] = tail["nbytes"]
                meta = tail["meta"]
                if self._anchor is not None:
                    ray.kill(self._anchor.handle)  # its GPU goes to a waiting worker; the steps stay
                    self._anchor = None
                self.anchor_actor = None
                for frame in tail["frames"]:
                    if frame.job.frame_id in plan.anchor_writes:
                        ctx.emit(frame)
                if plan.save_bundle:
                    ctx.save_bundle(AnchorBundle.from_payloads(meta, (ray.get(r) for r in step_refs if r is not None)))
            elif plan.bundle is not None:
                meta = plan.bundle.meta
                # ray.put from the driver: the driver owns these objects.
                step_refs = [
                    ray.put(s.to_numpy()) if (s := plan.bundle.step(t)) is not None else None
                    for t in range(plan.settings.steps)
                ]
                stats["anchor_bytes"] = plan.bundle.nbytes()
            bundle_key = uuid.uuid4().hex if meta is not None else None
            self._dispatch(plan, ctx, bundle_key, meta, step_refs)
            stats["worker_stats"] = self._worker_stats()
            stats["devices"] = [self._devices[key] for key in sorted(self._devices, key=_device_order)]
        except BaseException:
            self.close()  # a failed job leaves no actors behind, pooled or not
            raise
        finally:
            if not self.pooled:
                self.close()
            self.anchor_actor = None
        return stats

    def _dispatch(
        self, plan: JobPlan, ctx: JobContext, bundle_key: str | None, meta: dict | None, step_refs: list | None
    ) -> None:
        """Hand frames to workers as they free up; requeue the frame of a worker that dies."""
        queue: deque[FrameJob] = deque(plan.frame_jobs)
        attempts: Counter[str] = Counter()
        frames: dict[Any, tuple[_Actor, FrameJob]] = {}
        written: set[str] = set()
        story_args = self._story_args(plan)
        now = time.monotonic()
        for actor in self._pool:
            if not (actor.gone or actor.placed):
                actor.since = now  # until now the anchors held the resources these wait for

        while queue or frames:
            busy = {actor.index for actor, _ in frames.values()}
            for actor in self._pool:
                if queue and actor.ready and not actor.gone and actor.index not in busy:
                    job = queue.popleft()
                    frames[actor.handle.render.remote(job, *story_args, bundle_key, meta, step_refs)] = (actor, job)
                    self.busy[actor.index] = job.frame_id
            if not frames and all(actor.gone for actor in self._pool):
                raise self._failed_error(self._pool)
            ref = self._poll(self._pool, frames)
            if ref is None:
                continue
            actor, job = frames.pop(ref)
            self.busy.pop(actor.index, None)
            try:
                output: FrameOutput = ray.get(ref)
            except RayActorError as exc:
                # The worker died (or is restarting): its frame goes back to the queue, and the
                # worker rejoins once Ray has restarted it.
                actor.error = failure_of(exc)
                self._requeue(job, queue, attempts, actor)
                actor.failures += 1
                if actor.failures <= WORKER_RESTARTS:
                    actor.watch()
                else:
                    actor.gone = True
                    log.warning("%s is gone for good: %s", actor.name, actor.error.summary)
                continue
            except RayTaskError as exc:
                # An exception inside the frame (out of memory, say): try it on another worker.
                actor.error = failure_of(exc)
                self._requeue(job, queue, attempts, actor)
                continue
            if output.job.frame_id not in written:  # never write a frame twice
                written.add(output.job.frame_id)
                ctx.emit(output)

    def _requeue(self, job: FrameJob, queue: deque, attempts: Counter, actor: _Actor) -> None:
        self.retried.append(job.frame_id)
        attempts[job.frame_id] += 1
        summary = actor.error.summary if actor.error is not None else "unknown"
        if attempts[job.frame_id] >= MAX_FRAME_ATTEMPTS:
            raise RuntimeError(f"frame {job.frame_id!r} failed {attempts[job.frame_id]} times; the last time on "
                               f"{actor.name} ({actor.host}): {summary}")
        log.warning("frame %s lost on %s (%s); retrying on the next free worker", job.frame_id, actor.name, summary)
        queue.appendleft(job)

    def _failed_error(self, actors: list[_Actor]) -> Exception:
        """The error of a job none of whose ``actors`` is left: their causes, one line."""
        failed = [a for a in actors if a.gone]
        if failed and all(a.error is not None and a.error.user and a.error.at_start for a in failed):
            users: dict[str, list[_Actor]] = {}
            for actor in failed:
                users.setdefault(actor.error.user if actor.error and actor.error.user else "", []).append(actor)
            return StorySyncUserError("; ".join(f"{message} ({describe_actors(group)})" for message, group in users.items()))
        causes: dict[str, list[_Actor]] = {}
        for actor in failed:
            causes.setdefault(actor.error.summary if actor.error else "no cause reported", []).append(actor)
        details = "; ".join(f"{describe_actors(group)}: {summary}" for summary, group in causes.items())
        if all(a.error is not None and a.error.at_start for a in failed):
            error = RuntimeError(f"the job's actors could not start: {details}")
        else:
            error = RuntimeError("every frame worker failed, so the frames not yet written are lost for this "
                                 f"run (rerun the job to render them): {details}")
        error.__cause__ = next((a.error.exc for a in reversed(failed) if a.error and a.error.exc), None)
        return error

    def _worker_stats(self) -> list[dict]:
        """Each worker's ``stats()`` ({} for one that is gone or was never placed); a worker still
        loading its pipeline is waited for (30 s at most), and its device is noted."""
        stats = []
        for actor in self._pool:
            placed = actor.placed or (actor.placed_ref is not None and bool(ray.wait([actor.placed_ref], timeout=0)[0]))
            if actor.gone or not placed:
                stats.append({})
                continue
            try:
                info = ray.get(actor.handle.stats.remote(), timeout=30)
            except (RayActorError, RayTaskError, GetTimeoutError):
                stats.append({})
                continue
            stats.append(info)
            if (actor.role, actor.index) not in self._devices:
                self._devices[(actor.role, actor.index)] = {
                    "role": actor.role, "index": actor.index,
                    **{key: info[key] for key in ("host", "pid", "device", "gpu_ids", "threads")},
                }
        return stats


def _learn_host(actor: _Actor) -> None:
    """The actor's host from its ``placed()`` answer, when that came but was not handled yet."""
    if actor.host != UNKNOWN_HOST or actor.placed_ref is None or not ray.wait([actor.placed_ref], timeout=0)[0]:
        return
    try:
        actor.host = ray.get(actor.placed_ref)["host"]
    except RayError:
        pass


def _device_order(key: tuple[str, int]) -> tuple[int, int]:
    return (0 if key[0] == "anchor" else 1, key[1])
