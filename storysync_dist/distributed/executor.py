"""The Ray executor: the driver plans and writes, actors render.

1. The AnchorActor renders the anchor frames and streams one object per denoising step; the
   objects are owned by the driver (returned by a generator method), so they survive the actor,
   which is released as soon as the anchors are done.
2. FrameWorker actors (one pipeline on one GPU each, or one CPU without GPUs) load their
   pipelines while the anchors render, then take frames one at a time as they free up, so a slow
   worker never holds a queue. Each worker pulls the anchor steps once and keeps them resident.
3. A worker that dies mid-frame costs only that frame: it goes back to the queue for the next free
   worker while Ray restarts the actor. The driver writes each frame once, as it arrives.

Used as a context manager (``with RayExecutor(options) as executor:``) the executor is *pooled*:
its FrameWorkers stay up from one story to the next (a dataset of many short stories loads each
pipeline once, not once per story), and each story's anchors render on one of them
(``FrameWorker.render_anchors``) instead of on a separate AnchorActor.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from ..core.anchors import AnchorBundle, AnchorStep
from ..engine.job import JobContext, JobPlan, RenderOptions
from ..engine.renderer import FrameJob, FrameOutput
from .actors import AnchorActor, FrameWorker
from .cluster import WORKER_ENV, actor_resources, connect

log = logging.getLogger("storysync")

MAX_FRAME_ATTEMPTS = 3
MAX_ANCHOR_ATTEMPTS = 2
WORKER_RESTARTS = 3
_RESOURCE_NAMES = {"num_gpus": "GPU", "num_cpus": "CPU"}


class RayExecutor:
    """Renders a planned job on ``options.workers`` Ray actors (see the module docstring)."""

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self.pooled = False  # set by __enter__: keep the workers between jobs
        connect(options.address, options.workers)
        self.resources = actor_resources(options.workers)  # fails fast when the cluster is too small
        self.workers: list[Any] = []
        self.anchor_actor: Any = None
        self.anchor_attempts = 0
        # Called on the driver as each anchor object arrives (its index); for progress and tests.
        self.on_anchor_object: Callable[[int], None] | None = None
        self.busy: dict[int, str] = {}  # worker index -> frame id in flight (for tests and logs)
        self.retried: list[str] = []

    def __enter__(self) -> RayExecutor:
        self.pooled = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor this executor started."""
        for actor in [self.anchor_actor, *self.workers]:
            if actor is not None:
                ray.kill(actor)
        self.workers, self.anchor_actor = [], None

    def _actor_args(self) -> tuple:
        return (self.options.model, self.options.device, self.options.dtype)

    @staticmethod
    def _story_args(plan: JobPlan) -> tuple[dict, dict]:
        """What a job tells an actor with each call: the config and sampling settings (plain dicts)."""
        s = plan.settings
        settings = {"model": s.model, "steps": s.steps, "height": s.height, "width": s.width,
                    "guidance_scale": s.guidance_scale}
        return plan.config.to_dict(), settings

    def _options(self, **extra: Any) -> dict[str, Any]:
        return {**self.resources, "runtime_env": {"env_vars": WORKER_ENV}, **extra}

    # ---- anchors --------------------------------------------------------------------------
    def _new_anchor_actor(self) -> Any:
        return ray.remote(AnchorActor).options(**self._options(max_restarts=0)).remote(*self._actor_args())

    def _start_anchor_actor(self) -> Any:
        actor = self._new_anchor_actor()
        ray.get(actor.ready.remote())
        return actor

    def _room_for(self, actors: int) -> bool:
        """Whether the cluster has the resources of ``actors`` actors free right now."""
        free = ray.available_resources()
        return all(free.get(_RESOURCE_NAMES[name], 0) >= amount * actors for name, amount in self.resources.items())

    def _anchor_stream(self, plan: JobPlan) -> Any:
        if self.pooled:
            return self.anchor_actor.render_anchors.remote(plan.anchor_jobs, *self._story_args(plan))
        return self.anchor_actor.render.remote(plan.anchor_jobs, *self._story_args(plan))

    def _replace_anchor_actor(self, attempt: int) -> None:
        if self.pooled:
            # The worker that died is restarting (or gone): the next worker takes the anchors.
            worker = self.workers[attempt % len(self.workers)]
            ray.get(worker.ready.remote())
            self.anchor_actor = worker
        else:
            ray.kill(self.anchor_actor)
            self.anchor_actor = self._start_anchor_actor()

    def _render_anchors(self, plan: JobPlan) -> tuple[list[Any], dict]:
        """Run the anchors (retrying on a fresh actor if one dies); return step refs and the tail."""
        for attempt in range(1, MAX_ANCHOR_ATTEMPTS + 1):
            self.anchor_attempts = attempt
            try:
                refs = []
                for ref in self._anchor_stream(plan):
                    refs.append(ref)
                    if self.on_anchor_object is not None:
                        self.on_anchor_object(len(refs) - 1)
                tail = ray.get(refs.pop())
                return refs, tail
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt == MAX_ANCHOR_ATTEMPTS:
                    raise
                # The anchors are deterministic: render them again on a fresh actor.
                log.warning("anchor actor died (%s); rendering the anchors again", type(exc).__name__)
                self._replace_anchor_actor(attempt)
        raise AssertionError("unreachable")

    # ---- the job --------------------------------------------------------------------------
    def __call__(self, plan: JobPlan, ctx: JobContext) -> dict:
        stats: dict[str, Any] = {"workers": self.options.workers}
        try:
            if self.pooled:
                if not self.workers:
                    self.workers = [self._new_worker() for _ in range(self.options.workers)]
                if plan.anchor_jobs:
                    self.anchor_actor = self.workers[0]
                    ray.get(self.anchor_actor.ready.remote())
            elif plan.anchor_jobs and self._room_for(self.options.workers + 1):
                # Room for the anchor actor and every worker at once: all load in parallel.
                self.anchor_actor = self._new_anchor_actor()
                self.workers = [self._new_worker() for _ in range(self.options.workers)]
                ray.get(self.anchor_actor.ready.remote())
            else:
                if plan.anchor_jobs:
                    # The anchor actor is placed (and ready) first, so workers queued behind it on
                    # a full cluster cannot starve it; they get its GPU once the anchors are done.
                    self.anchor_actor = self._start_anchor_actor()
                self.workers = [self._new_worker() for _ in range(self.options.workers)]
            step_refs, meta = None, None
            if plan.anchor_jobs:
                t0 = time.perf_counter()
                step_refs, tail = self._render_anchors(plan)
                stats["anchor_seconds"] = time.perf_counter() - t0
                stats["anchor_bytes"] = tail["nbytes"]
                meta = tail["meta"]
                if not self.pooled:
                    ray.kill(self.anchor_actor)  # its GPU goes to a waiting worker; the steps stay
                self.anchor_actor = None
                for frame in tail["frames"]:
                    if frame.job.frame_id in plan.anchor_writes:
                        ctx.emit(frame)
                if plan.options.save_anchors:
                    ctx.save_bundle(_assemble(meta, step_refs))
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
        except BaseException:
            self.close()  # a failed job leaves no actors behind, pooled or not
            raise
        finally:
            if not self.pooled:
                self.close()
            self.anchor_actor = None
        return stats

    def _new_worker(self) -> Any:
        options = self._options(max_restarts=WORKER_RESTARTS, max_task_retries=0)
        return ray.remote(FrameWorker).options(**options).remote(*self._actor_args())

    def _dispatch(
        self, plan: JobPlan, ctx: JobContext, bundle_key: str | None, meta: dict | None, step_refs: list | None
    ) -> None:
        """Hand frames to workers as they free up; requeue the frame of a worker that dies."""
        queue: deque[FrameJob] = deque(plan.frame_jobs)
        attempts: Counter[str] = Counter()
        failures: Counter[int] = Counter()
        idle: list[int] = []
        pending: dict[Any, tuple[str, int, FrameJob | None]] = {}
        for w, worker in enumerate(self.workers):
            pending[worker.ready.remote()] = ("ready", w, None)
        written: set[str] = set()
        story_args = self._story_args(plan)

        while queue or any(kind == "frame" for kind, _, _ in pending.values()):
            while idle and queue:
                w, job = idle.pop(0), queue.popleft()
                ref = self.workers[w].render.remote(job, *story_args, bundle_key, meta, step_refs)
                pending[ref] = ("frame", w, job)
                self.busy[w] = job.frame_id
            if not pending:
                raise RuntimeError("every frame worker died; the frames not yet written are lost for this run")
            done, _ = ray.wait(list(pending), num_returns=1)
            kind, w, job = pending.pop(done[0])
            if kind == "frame":
                self.busy.pop(w, None)
            try:
                value = ray.get(done[0])
            except (RayActorError, ActorUnavailableError, GetTimeoutError) as exc:
                # The worker died (or is restarting): its frame goes back to the queue, and the
                # worker rejoins once Ray has restarted it.
                if job is not None:
                    self._requeue(job, queue, attempts, exc)
                failures[w] += 1
                if failures[w] <= WORKER_RESTARTS + 1:
                    pending[self.workers[w].ready.remote()] = ("ready", w, None)
                else:
                    log.warning("frame worker %d is gone for good", w)
                continue
            except RayTaskError as exc:
                # An exception inside the frame (out of memory, say): try it on another worker.
                if job is not None:
                    self._requeue(job, queue, attempts, exc)
                idle.append(w)
                continue
            if kind == "frame":
                output: FrameOutput = value
                if output.job.frame_id not in written:  # never write a frame twice
                    written.add(output.job.frame_id)
                    ctx.emit(output)
            idle.append(w)

    def _requeue(self, job: FrameJob, queue: deque, attempts: Counter, exc: BaseException) -> None:
        self.retried.append(job.frame_id)
        attempts[job.frame_id] += 1
        if attempts[job.frame_id] >= MAX_FRAME_ATTEMPTS:
            raise RuntimeError(f"frame {job.frame_id!r} failed {attempts[job.frame_id]} times: {exc}") from exc
        log.warning("frame %s lost (%s); retrying on the next free worker", job.frame_id, type(exc).__name__)
        queue.appendleft(job)

    def _worker_stats(self) -> list[dict]:
        stats = []
        for worker in self.workers:
            try:
                stats.append(ray.get(worker.stats.remote(), timeout=30))
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                stats.append({})
        return stats


def _assemble(meta: dict, step_refs: list) -> AnchorBundle:
    """The whole bundle on the driver (only to save it)."""
    bundle = AnchorBundle(meta=meta)
    for ref in step_refs:
        payload = ray.get(ref) if ref is not None else None
        if payload is not None:
            anchor_step = AnchorStep.from_numpy(payload)
            bundle.steps[anchor_step.step] = anchor_step
    return bundle
