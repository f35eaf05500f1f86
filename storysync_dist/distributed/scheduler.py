"""The pool scheduler: one loop on the driver that keeps every FrameWorker busy across stories.

A job is a sequence of stories (one for ``storysync render``, hundreds for ``jobs/make_dataset.py``).
Each story is a set of calls: its anchors (one streaming call, one object per denoising step, then
the anchor images) and one call per batch of non-anchor frames (``--frame-batch``; the batches
are ``renderer.frame_batches`` of the plan, the same as in-process). A free worker takes, in this
order:

1. a frame batch of a story whose anchors are done (oldest story first);
2. the anchors of a story whose anchor worker died (frames may be waiting on them);
3. the anchors of the next story, if fewer than ``max_in_flight`` stories are open;
4. a frame batch of a story whose anchors are still streaming, once anchor step 0 is published: the
   frame carries the step refs published so far and the driver pushes each later one to the
   workers rendering that story's frames (``FrameWorker.add_steps``); a frame's step t waits only
   for anchor step t, so the pixels are those of a frame started after the anchors.

So a worker never waits for another story's anchors: it renders the next story's anchors while the
others finish the current story's frames. The number of open stories is bounded because each
worker keeps the anchor steps of every open story it has frames of (in host memory, and on the
device with ``--bundle-on device``) until the story is finished (``FrameWorker.forget``): ``max_in_flight`` is the resident-bundle budget divided by
the largest bundle seen so far (two stories until one is known), at most ``workers + 1``.

The driver owns every anchor step object (a Ray generator's items belong to its caller), so the
steps outlive the worker that rendered them; it writes every frame itself, once, as it arrives.
Faults: a worker that dies costs only its call (its frame batch goes back to the front of its story's
queue; dead anchors render again on the next free worker, and frames already following them keep
going with the new stream's steps, which are the same); Ray restarts the worker and it rejoins.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..core.anchors import AnchorBundle
from ..engine.job import JobPlan
from ..engine.renderer import FrameJob, FrameOutput, bundle_meta, frame_batches
from ..engine.run import JobContext
from ..errors import RenderError
from .failures import failure_of
from .pool import Worker, WorkerPool

log = logging.getLogger("storysync")

MAX_FRAME_ATTEMPTS = 3
MAX_ANCHOR_ATTEMPTS = 2
DEFAULT_BUNDLE_BUDGET = 4 << 30  # bytes of resident anchor steps per worker

EventHook = Callable[[str, dict[str, Any]], None]


class StorySource(Protocol):
    """A story the scheduler can open (lease it, plan it against the dataset) and close."""

    def start(self) -> tuple[JobPlan, JobContext] | None:
        """Open the story: its plan and context, or None when it has nothing to render (then
        ``finish({})`` is called at once)."""

    def finish(self, stats: dict) -> Any:
        """The story's work is done: commit, write its outputs; return its result."""

    def abort(self) -> None:
        """The job failed while the story was open: let go of it (its written frames stay)."""


@dataclass
class _Story:
    source: StorySource
    plan: JobPlan
    ctx: JobContext
    opened: float
    key: str | None = None
    meta: dict | None = None
    steps: list[Any] = field(default_factory=list)  # anchor step refs published so far
    anchors: str = "none"  # none | waiting | running | done
    anchor_attempts: int = 0
    anchor_items: int = 0  # items received from the current anchor stream
    anchor_started: float = 0.0
    last_anchor_item: Any = None
    queue: deque[list[FrameJob]] = field(default_factory=deque)  # frame batches still to hand out
    attempts: Counter = field(default_factory=Counter)
    followers: set[int] = field(default_factory=set)  # workers rendering its frames now
    in_flight: int = 0
    written: set[str] = field(default_factory=set)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def story_id(self) -> str:
        return self.plan.spec.id

    @property
    def finished(self) -> bool:
        return self.anchors in ("none", "done") and not self.queue and self.in_flight == 0

    def story_args(self) -> tuple[dict, dict]:
        return self.plan.config.to_dict(), dataclasses.asdict(self.plan.settings)


@dataclass
class _Call:
    kind: str  # "anchors" or "frame"
    story: _Story
    worker: Worker
    started: float
    jobs: list[FrameJob] = field(default_factory=list)  # a frame call's batch


class PoolScheduler:
    """Runs stories on a ``WorkerPool`` (see the module docstring)."""

    def __init__(self, pool: WorkerPool, *, bundle_budget: int | None = None,
                 on_event: EventHook | None = None) -> None:
        self.pool = pool
        self.bundle_budget = DEFAULT_BUNDLE_BUDGET if bundle_budget is None else int(bundle_budget)
        self.on_event = on_event
        self._largest_bundle = 0

    @property
    def max_in_flight(self) -> int:
        if self._largest_bundle <= 0:
            limit = 2
        else:
            limit = max(1, self.bundle_budget // self._largest_bundle)
        return max(1, min(limit, self.pool.count + 1))

    def _event(self, kind: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, info)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, sources: Iterable[StorySource]) -> Iterator[tuple[StorySource, dict]]:
        """Render every story of ``sources``; yield (source, what its ``finish`` returned) as each
        one finishes. A story's finish (commit, storyboard, manifest entry) runs on one helper
        thread, in order, so the loop goes on handing out work meanwhile."""
        pending = iter(sources)
        exhausted = False
        active: list[_Story] = []
        calls: dict[Any, _Call] = {}
        done: deque[tuple[StorySource, Future]] = deque()
        self.pool.start()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="story-finish") as finisher:
            try:
                while True:
                    for worker in self._free_workers(calls):
                        story, kind = self._next_task(active, admit=not exhausted)
                        if kind == "admit":
                            exhausted = not self._admit(pending, active, done, finisher)
                            story, kind = self._next_task(active, admit=False)
                        if story is None:
                            break
                        self._dispatch(kind, story, worker, calls)
                    while done and done[0][1].done():
                        source, future = done.popleft()
                        yield source, future.result()
                    if exhausted and not active and not calls:
                        while done:
                            source, future = done.popleft()
                            yield source, future.result()
                        return
                    if not calls and self.pool.all_gone():
                        raise self.pool.failed_error()
                    ref = self.pool.wait(list(calls), timeout=0.05 if done else None)
                    if ref is None:
                        continue
                    call = calls.pop(ref)
                    if call.kind == "anchors":
                        self._on_anchor_item(ref, call, calls)
                    else:
                        self._on_frame(ref, call)
                    self._close_finished(active, done, finisher)
            except BaseException:
                for story in active:
                    story.source.abort()
                raise

    def _free_workers(self, calls: dict[Any, _Call]) -> list[Worker]:
        busy = {call.worker.index for call in calls.values()}
        return [w for w in self.pool.workers if w.usable and w.index not in busy]

    def _next_task(self, active: list[_Story], *, admit: bool) -> tuple[_Story | None, str]:
        """What a free worker does next (the order of the module docstring): a (story, kind) with
        kind "frame" or "anchors", (None, "admit") to open the next story first, or (None, "")."""
        for story in active:
            if story.anchors in ("none", "done") and story.queue:
                return story, "frame"
        for story in active:
            if story.anchors == "waiting":
                return story, "anchors"
        if admit and len(active) < self.max_in_flight:
            return None, "admit"
        for story in active:
            if story.anchors == "running" and story.steps and story.queue:
                return story, "frame"
        return None, ""

    def _admit(self, pending: Iterator[StorySource], active: list[_Story], done: deque,
               finisher: ThreadPoolExecutor) -> bool:
        """Open the next story that has work; False when there are none left."""
        for source in pending:
            opened = source.start()
            if opened is None:
                done.append((source, finisher.submit(source.finish, {})))
                continue
            try:
                story = self._opened(source, *opened)
            except BaseException:  # an interrupt before the story is active: let go of it here
                source.abort()
                raise
            active.append(story)
            return True
        return False

    def _opened(self, source: StorySource, plan: JobPlan, ctx: JobContext) -> _Story:
        """The scheduler's record of a story ``source`` just opened."""
        story = _Story(source, plan, ctx, time.monotonic(),
                       queue=deque(frame_batches(plan.frame_jobs, plan.frame_batch)))
        story.stats = {"workers": self.pool.count, "retried": [], "worker_busy_seconds": {},
                       "frame_batch": plan.frame_batch}
        if plan.anchor_jobs:
            story.key = uuid.uuid4().hex
            story.meta = bundle_meta(plan.config, plan.settings, plan.anchor_jobs)
            story.anchors = "waiting"
        elif plan.bundle is not None:
            story.key = uuid.uuid4().hex
            story.meta = plan.bundle.meta
            # ray.put from the driver: the driver owns these objects.
            count = max(plan.bundle.steps, default=-1) + 1
            story.steps = [ray.put(s.to_numpy()) if (s := plan.bundle.step(t)) is not None else ray.put(None)
                           for t in range(count)]
            story.stats["anchor_bytes"] = plan.bundle.nbytes()
            self._largest_bundle = max(self._largest_bundle, plan.bundle.nbytes())
            story.anchors = "done"
        return story

    def _dispatch(self, kind: str, story: _Story, worker: Worker, calls: dict[Any, _Call]) -> None:
        now = time.monotonic()
        if kind == "anchors":
            story.anchor_attempts += 1
            story.anchor_items = 0
            story.last_anchor_item = None
            story.anchors = "running"
            if story.anchor_attempts == 1:
                story.anchor_started = now
            gen = worker.handle.render_anchors.remote(story.plan.anchor_jobs, *story.story_args())
            calls[gen] = _Call("anchors", story, worker, now)
            self._event("anchors_dispatched", story=story.story_id, worker=worker.actor_name,
                        attempt=story.anchor_attempts)
            return
        jobs = story.queue.popleft()
        ref = worker.handle.render.remote(jobs, *story.story_args(), story.key, story.meta, list(story.steps),
                                          story.anchors == "done")
        calls[ref] = _Call("frame", story, worker, now, jobs)
        story.in_flight += 1
        story.followers.add(worker.index)
        for job in jobs:
            self._event("frame_dispatched", story=story.story_id, frame=job.frame_id, worker=worker.actor_name,
                        steps_published=len(story.steps), batch=len(jobs))

    def _account(self, call: _Call) -> None:
        seconds = time.monotonic() - call.started
        call.worker.busy_seconds += seconds
        busy = call.story.stats["worker_busy_seconds"]
        busy[call.worker.index] = busy.get(call.worker.index, 0.0) + seconds

    # ---- anchors ----------------------------------------------------------------------------
    def _on_anchor_item(self, gen: Any, call: _Call, calls: dict[Any, _Call]) -> None:
        """The anchor stream has a new item, or ended. Items are the steps' payloads, then the tail
        (anchor images, metadata, size); how many steps a sampler runs is its own business (PNDM
        runs one more than ``steps``), so an item is known to be a step when the next one comes,
        and the last item before the end is the tail. Step refs are never fetched here."""
        story, worker = call.story, call.worker
        try:
            ref = next(gen)
        except StopIteration:
            ref = None
        except RayActorError as exc:
            self._anchors_lost(call, exc)
            return
        if ref is not None:
            calls[gen] = call  # more items to come
            previous, story.last_anchor_item = story.last_anchor_item, ref
            if previous is not None:
                self._publish(story, worker, previous)
            return
        tail_ref, story.last_anchor_item = story.last_anchor_item, None
        try:
            if tail_ref is None:
                raise RuntimeError("the anchor stream ended without an item")
            tail = ray.get(tail_ref)  # a generator that raised ends with an item holding its error
        except RayActorError as exc:
            self._anchors_lost(call, exc)
            return
        except RayTaskError as exc:
            raise RenderError(f"the anchors of story {story.story_id!r} failed on {worker.name} ({worker.host}): "
                              f"{failure_of(exc).summary}") from exc
        if not isinstance(tail, dict) or "frames" not in tail:
            self._anchors_lost(call, RuntimeError("the anchor stream ended before the anchor images"))
            return
        for index in story.followers:
            follower = self.pool.workers[index]
            if follower.usable:
                follower.handle.end_steps.remote(story.key, story.meta)
        self._account(call)
        story.anchors = "done"
        story.stats["anchor_seconds"] = time.monotonic() - story.anchor_started
        story.stats["anchor_bytes"] = tail["nbytes"]
        story.stats["anchor_attempts"] = story.anchor_attempts
        self._event("anchors_done", story=story.story_id, worker=worker.actor_name)
        self._largest_bundle = max(self._largest_bundle, int(tail["nbytes"]))
        for frame in tail["frames"]:
            if frame.job.frame_id in story.plan.anchor_writes:
                story.ctx.emit(frame)
        if story.plan.save_bundle:
            payloads = (ray.get(r) for r in story.steps)
            story.ctx.save_bundle(AnchorBundle.from_payloads(story.meta, payloads))

    def _publish(self, story: _Story, worker: Worker, ref: Any) -> None:
        """Anchor step ``story.anchor_items`` is out: keep it, and push it to the story's followers."""
        t = story.anchor_items
        story.anchor_items += 1
        if t < len(story.steps):
            return  # a re-render: the driver already holds this step (the same values)
        story.steps.append(ref)
        if t == 0:
            story.stats["anchor_first_step_seconds"] = time.monotonic() - story.opened
        for index in story.followers:
            follower = self.pool.workers[index]
            if follower.usable:
                follower.handle.add_steps.remote(story.key, story.meta, t, [ref])
        self._event("anchor_step", story=story.story_id, step=t, worker=worker.actor_name,
                    attempt=story.anchor_attempts)

    def _anchors_lost(self, call: _Call, exc: BaseException) -> None:
        story, worker = call.story, call.worker
        self._account(call)
        if isinstance(exc, RayActorError):
            self.pool.lost(worker, exc)
        summary = failure_of(exc).summary
        if story.anchor_attempts >= MAX_ANCHOR_ATTEMPTS:
            raise RenderError(f"the anchors of story {story.story_id!r} failed {story.anchor_attempts} times; the "
                              f"last time {worker.name} on {worker.host} died: {summary}") from exc
        # The anchors are deterministic: render them again on the next free worker.
        log.warning("%s died while rendering the anchors of %s (%s); rendering them again", worker.name,
                    story.story_id, summary)
        story.anchors = "waiting"

    # ---- frames -----------------------------------------------------------------------------
    def _on_frame(self, ref: Any, call: _Call) -> None:
        story, worker, jobs = call.story, call.worker, call.jobs
        story.in_flight -= 1
        story.followers.discard(worker.index)
        self._account(call)
        try:
            outputs: list[FrameOutput] = ray.get(ref)
        except RayActorError as exc:
            # The worker died (or is restarting): its frame goes back to the queue, and the worker
            # rejoins once Ray has restarted it.
            self.pool.lost(worker, exc)
            self._requeue(story, jobs, worker)
            return
        except RayTaskError as exc:
            # An exception inside the frame (out of memory, say): try it on another worker.
            worker.error = failure_of(exc)
            self._requeue(story, jobs, worker)
            return
        for output in outputs:
            self._event("frame_done", story=story.story_id, frame=output.job.frame_id, worker=worker.actor_name)
            if output.job.frame_id in story.written:  # never write a frame twice
                continue
            story.written.add(output.job.frame_id)
            if "first_non_anchor_seconds" not in story.stats:
                story.stats["first_non_anchor_seconds"] = time.monotonic() - story.opened
            story.ctx.emit(output)

    def _requeue(self, story: _Story, jobs: list[FrameJob], worker: Worker) -> None:
        """A lost call's batch goes back to the front of its story's queue, whole: the same
        batch renders again, so its pixels are those it would have had."""
        summary = worker.error.summary if worker.error is not None else "unknown"
        for job in jobs:
            story.stats["retried"].append(job.frame_id)
            story.attempts[job.frame_id] += 1
            if story.attempts[job.frame_id] >= MAX_FRAME_ATTEMPTS:
                raise RenderError(f"frame {job.frame_id!r} of story {story.story_id!r} failed "
                                  f"{story.attempts[job.frame_id]} times; the last time on {worker.name} "
                                  f"({worker.host}): {summary}")
        names = ", ".join(job.frame_id for job in jobs)
        log.warning("frame(s) %s lost on %s (%s); retrying on the next free worker", names, worker.name, summary)
        story.queue.appendleft(jobs)

    # ---- closing stories --------------------------------------------------------------------
    def _close_finished(self, active: list[_Story], done: deque, finisher: ThreadPoolExecutor) -> None:
        for story in [s for s in active if s.finished]:
            active.remove(story)
            if story.key is not None:
                for worker in self.pool.workers:
                    if worker.usable:
                        worker.handle.forget.remote(story.key)
            story.steps = []  # the driver's refs go: Ray frees the steps
            stats = dict(story.stats)
            stats["story_seconds"] = time.monotonic() - story.opened
            stats["worker_stats"] = self.pool.stats()
            stats["devices"] = self.pool.device_list()
            done.append((story.source, finisher.submit(story.source.finish, stats)))
