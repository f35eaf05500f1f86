"""The Python API for notebooks and scripts: render a story in this process or over Ray.

    from storysync_dist.api import RenderOptions, render_story
    result = render_story("examples/story.yaml", RenderOptions(model="tiny-sdxl", out="out/demo", workers=2))

The StorySync knobs of the CLI are ``RenderOptions`` fields: ``ablation="no-rfh"`` (``--ablation``),
``overrides={"rfh_gamma": 0.5}`` (``--set``), ``replace_config=True`` (``--replace-config``), and for
Python callers ``config=StorySyncConfig(...)``, which replaces the story's ``storysync:`` section
as the base (ablation and overrides still apply on top). Sampling settings left as ``None`` come
from the story, then from the model (``docs/configuration.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from .distributed.metrics import progress_metrics
from .engine.job import JobPlan, JobResult, RenderOptions, model_info, prepare_job
from .engine.memory import check_memory
from .engine.outputs import ManifestWriter
from .engine.progress import JobProgress
from .engine.renderer import FrameOutput
from .engine.run import StoryJob, local_executor, run_story
from .interrupts import note_written
from .story import StorySpec, load_story

if TYPE_CHECKING:
    from .distributed.executor import RayExecutor

__all__ = ["JobResult", "RenderOptions", "render_stories", "render_story"]

MANIFEST_FLUSH_SECONDS = 60.0


def _check_executor(options: RenderOptions, pipe: object | None, executor: RayExecutor | None) -> None:
    if options.workers == 0 and executor is not None:
        raise ValueError("executor= is only for workers >= 1")
    if options.workers > 0 and pipe is not None:
        raise ValueError("pipe= is only for workers=0: Ray workers load their own pipelines")
    if executor is not None:
        pooled = executor.options
        for name in ("model", "device", "dtype", "workers", "address", "resources_per_worker"):
            if getattr(pooled, name) != getattr(options, name):
                raise ValueError(f"executor= was made for {name}={getattr(pooled, name)!r}, this story asks "
                                 f"for {getattr(options, name)!r}")


@contextlib.contextmanager
def _noting_interrupts(progress: JobProgress, out: str) -> Iterator[None]:
    """An interrupted job says how far it got: frames written of those it was to render."""
    try:
        yield
    except KeyboardInterrupt as exc:  # interrupts.Interrupted, or Ray's KeyboardInterrupt for one
        numbers = progress.snapshot()
        note_written(exc, f"{numbers['done']} of {numbers['total']} frames written to {out}")
        raise


def _dry_run_result(plan: JobPlan, memory: str | None = None) -> JobResult:
    return JobResult(
        out=plan.options.out, story_id=plan.spec.id, rendered=[], skipped=plan.skipped, storyboard="",
        manifest="", seconds=0.0, replaced=list(plan.replace), removed=list(plan.remove),
        stale=list(plan.stale), damaged=list(plan.damaged), dry_run=True,
        notes=[*plan.notes, *plan.summary(), *([memory] if memory else [])], new=len(plan.new_frames()),
    )


def render_story(
    story: str | StorySpec,
    options: RenderOptions,
    *,
    pipe: object | None = None,
    executor: RayExecutor | None = None,
    on_frame: Callable[[FrameOutput], None] | None = None,
) -> JobResult:
    """Render ``story`` (a path or a loaded spec) into the dataset at ``options.out``.

    ``options.workers == 0`` renders in this process (``pipe`` may be a pipeline already loaded);
    ``workers >= 1`` renders on Ray actors (joining ``options.address``/RAY_ADDRESS or starting a
    local Ray). ``executor`` is a ``RayExecutor`` to reuse, so its workers load their pipelines
    once (without one, a pool is started for this story and stopped after it); to render many
    stories with their work overlapped on one pool, use :func:`render_stories`.

    ``on_frame`` is called on the driver for every frame written. With ``options.dry_run`` the
    story is planned against the dataset and nothing is written: the result's ``notes`` say what
    a real run would render, replace and remove. A dataset whose rows of the story were rendered
    with other settings is refused (``StorySyncUserError``) unless ``options.replace_config``.
    """
    _check_executor(options, pipe, executor)
    spec = load_story(story) if isinstance(story, str) else story  # a bad story fails before Ray starts
    with contextlib.ExitStack() as stack:
        if options.workers > 0 and executor is None:
            from .distributed.executor import RayExecutor

            executor = stack.enter_context(RayExecutor(options))
        plan = prepare_job(spec, options, pipe=pipe, device=executor.device if executor is not None else None)
        # The peak memory per worker against the free memory, before anything loads (engine.memory).
        memory = check_memory([plan], model_info(options, pipe), pipe=pipe, executor=executor)
        if options.dry_run:
            return _dry_run_result(plan, memory[0])
        # Frames, fps and ETA: a bar on a terminal, plain lines in a log, and Ray metrics when Ray
        # is up (engine.progress).
        progress = stack.enter_context(JobProgress(options.out, show=options.progress, log_every=options.log_every,
                                                         metrics=progress_metrics()))
        stack.enter_context(_noting_interrupts(progress, options.out))
        job = StoryJob(plan, on_frame, progress)
        return run_story(job, executor if executor is not None else local_executor(pipe))


def render_stories(
    stories: Iterable[str | StorySpec],
    options: RenderOptions,
    *,
    pipe: object | None = None,
    executor: RayExecutor | None = None,
    on_frame: Callable[[FrameOutput], None] | None = None,
) -> Iterator[JobResult]:
    """Render many stories into the dataset at ``options.out``; yield each one's result as it
    finishes (on Ray, in the order they finish, not necessarily the order given).

    Every story is loaded and planned before anything renders, so a bad story or a refused
    config change fails with nothing written. With ``workers >= 1`` all stories share one pool
    of workers (``executor``, or one started here and stopped at the end) and one scheduler:
    while some stories' frames render, free workers render the anchors of the next ones, and a
    story's frames start as soon as its first anchor step is published (docs/distributed.md).
    One progress bar (and Ray metrics, ``distributed.metrics``) covers the whole job.
    """
    _check_executor(options, pipe, executor)
    specs = [load_story(s) if isinstance(s, str) else s for s in stories]
    with contextlib.ExitStack() as stack:
        if options.workers > 0 and executor is None and specs:
            from .distributed.executor import RayExecutor

            executor = stack.enter_context(RayExecutor(options))  # starts no actor until it renders
        device = executor.device if executor is not None else None
        plans = [prepare_job(spec, options, pipe=pipe, device=device) for spec in specs]
        memory = check_memory(plans, model_info(options, pipe), pipe=pipe, executor=executor) if plans else []
        if options.dry_run:
            yield from (_dry_run_result(plan, note) for plan, note in zip(plans, memory, strict=True))
            return
        progress = stack.enter_context(JobProgress(options.out, show=options.progress, log_every=options.log_every,
                                                         metrics=progress_metrics()))
        for plan in plans:  # every story counts from the start: the job's total and ETA cover them all
            progress.add_story(plan.spec.id, plan.total)
        # One roll-up of manifest.json a minute and one at the end, not one per story.
        manifest = ManifestWriter(options.out, options.storage_options, flush_every=MANIFEST_FLUSH_SECONDS)
        stack.callback(manifest.flush)
        stack.enter_context(_noting_interrupts(progress, options.out))
        jobs = [StoryJob(plan, on_frame, progress, manifest) for plan in plans]
        if executor is None:
            run = local_executor(pipe)
            for job in jobs:
                yield run_story(job, run)
            return
        for _, result in executor.render(jobs):
            yield result
