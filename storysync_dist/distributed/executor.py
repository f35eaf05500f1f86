"""The Ray executor: the driver plans and writes, a pool of FrameWorkers renders.

``RayExecutor(options)`` owns ``options.workers`` FrameWorker actors (one pipeline on one GPU each,
or one CPU each, following ``--device``), started on first use and kept until ``close()`` (or the
end of a ``with`` block), so every story it renders reuses the loaded pipelines. It runs one
scheduler (``scheduler.PoolScheduler``) whatever the number of stories: ``executor(plan, ctx)``
renders one planned story (what ``engine.run.run_job`` calls), ``executor.render(sources)`` many
stories, overlapping one story's anchors with other stories' frames.

Every wait for a worker to be placed is bounded by ``RenderOptions.start_timeout``; a job whose
workers fail to start fails with their causes (``StorySyncUserError`` when they are the user's).
A failed job stops the pool and leaves no actors behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import ray

from ..engine.free_memory import FreeMemory
from ..engine.job import JobPlan, RenderOptions, check_efficiency_options
from ..engine.run import JobContext
from .cluster import actor_resources, connect, object_store_budget
from .memory_probe import worker_free_memory
from .pool import NAMESPACE, WorkerPool
from .scheduler import DEFAULT_BUNDLE_BUDGET, EventHook, PoolScheduler, StorySource

__all__ = ["NAMESPACE", "RayExecutor"]


class _Opened:
    """A story that ``run_job`` already opened: the scheduler only renders it."""

    def __init__(self, plan: JobPlan, ctx: JobContext) -> None:
        self.opened = (plan, ctx)

    def start(self) -> tuple[JobPlan, JobContext] | None:
        return self.opened

    def finish(self, stats: dict) -> dict:
        return stats

    def abort(self) -> None:
        pass


class RayExecutor:
    """Renders planned stories on ``options.workers`` Ray FrameWorkers (see the module docstring).

    ``device`` is the device kind the workers render on, decided here from ``--device`` and the
    cluster (``"cuda"`` when the cluster's GPUs were detected by Ray, ``"cpu"``, or the explicit
    ``--device``); the engine derives the default dtype, part of every frame's identity, from it
    and the model's family (``engine.devices.default_dtype``).
    ``worker_names`` are the workers' Ray actor names (namespace ``storysync``). ``on_event(kind,
    info)`` is called on the driver as the job goes, with the story id and the worker's actor name
    in ``info``: ``"anchors_dispatched"`` (attempt), ``"anchor_step"`` (step, attempt) as each
    anchor step arrives, ``"anchors_done"``, ``"frame_dispatched"`` (frame, steps_published: how
    many anchor steps existed then) and ``"frame_done"`` (frame).
    """

    def __init__(self, options: RenderOptions, *, on_event: EventHook | None = None) -> None:
        self.options = options
        check_efficiency_options(options)  # before Ray starts
        connect(options.address, options.workers, options.object_store_memory, options.spill_dir)
        # Fails fast when the cluster is too small, or --device does not fit it.
        self.resources = actor_resources(options.workers, options.device, options.resources_per_worker,
                                         options.dtype, options.model)
        self.device: str = self.resources.device
        self.on_event = on_event
        args = (options.model, self.resources.device, options.device, self.resources.dtype, options.offload,
                options.bundle_on)
        self._pool = WorkerPool(options.workers, self.resources, args, options.start_timeout)

    @property
    def worker_names(self) -> list[str]:
        return self._pool.names

    def worker_free_memory(self) -> FreeMemory | None:
        """The free memory one worker will see, for the memory check before a render
        (``engine.memory``): None once workers run (their devices hold the weights already), or
        when it cannot be read in time."""
        if self.live_workers():
            return None
        return worker_free_memory(self.resources, self.device, int(self.options.workers), self.options.start_timeout)

    def live_workers(self) -> list[str]:
        """The names of this executor's workers that Ray has as live actors now."""
        names = []
        for name in self.worker_names:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # never started, stopped, or dead for good
                continue
            names.append(name)
        return names

    def warm_up(self) -> list[str]:
        """Start the pool now and wait until every worker has loaded its pipeline (``--start-timeout``
        applies); return the actor names of the ready workers. Rendering starts the pool anyway;
        this is for timing a job without the load, or for failing early in a notebook."""
        return self._pool.wait_ready()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker this executor started (a later call starts them again)."""
        self._pool.close()

    def render(self, sources: Iterable[StorySource]) -> Iterator[tuple[StorySource, Any]]:
        """Render every story of ``sources`` on the pool; yield (source, what ``source.finish``
        returned) as each story finishes. The pool stops if the job fails."""
        budget = self.options.bundle_budget
        if budget is None:
            # From the object store, so one story's anchors overlap another's frames at 1024 px
            # (a 15 GB SDXL bundle) wherever the store holds two; never below the fixed default.
            budget = max(DEFAULT_BUNDLE_BUDGET, object_store_budget() or 0)
        scheduler = PoolScheduler(self._pool, bundle_budget=budget, on_event=self.on_event)
        try:
            yield from scheduler.run(sources)
        except BaseException:
            self.close()  # a failed job leaves no actors behind
            raise

    def __call__(self, plan: JobPlan, ctx: JobContext) -> dict:
        """Render one opened story (``engine.run.run_job``'s executor protocol); return its stats."""
        if not plan.anchor_jobs and not plan.frame_jobs:
            return {"workers": self.options.workers}  # nothing renders (an imported bundle to save, say)
        results = [stats for _, stats in self.render([_Opened(plan, ctx)])]
        return results[0]
