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

from collections.abc import Callable
from typing import TYPE_CHECKING

from .engine.job import JobResult, RenderOptions, local_executor, prepare_job, run_job
from .engine.renderer import FrameOutput
from .spec import StorySpec, load_story

if TYPE_CHECKING:
    from .distributed.executor import RayExecutor

__all__ = ["JobResult", "RenderOptions", "render_story"]


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
    local Ray). ``executor`` is a pooled executor to reuse from story to story, so its workers load
    their pipelines once::

        with RayExecutor(options) as executor:
            for story in stories:
                render_story(story, options, executor=executor)

    ``on_frame`` is called on the driver for every frame written. With ``options.dry_run`` the
    story is planned against the dataset and nothing is written: the result's ``notes`` say what
    a real run would render, replace and remove. A dataset whose rows of the story were rendered
    with other settings is refused (``StorySyncUserError``) unless ``options.replace_config``.
    """
    if options.workers == 0 and executor is not None:
        raise ValueError("executor= is only for workers >= 1")
    if options.workers > 0 and pipe is not None:
        raise ValueError("pipe= is only for workers=0: Ray workers load their own pipelines")
    spec = load_story(story) if isinstance(story, str) else story  # a bad story fails before Ray starts
    device = None
    if options.workers > 0:
        if executor is None:
            from .distributed.executor import RayExecutor

            executor = RayExecutor(options)
        else:
            pooled = executor.options
            for name in ("model", "device", "dtype", "workers", "address", "resources_per_worker"):
                if getattr(pooled, name) != getattr(options, name):
                    raise ValueError(f"executor= was made for {name}={getattr(pooled, name)!r}, this story asks "
                                     f"for {getattr(options, name)!r}")
        device = executor.device
    plan = prepare_job(spec, options, pipe=pipe, device=device)
    if options.dry_run:
        return JobResult(
            out=options.out, story_id=plan.spec.id, rendered=[], skipped=plan.skipped, storyboard="",
            manifest="", seconds=0.0, replaced=list(plan.replace), removed=list(plan.remove),
            stale=list(plan.stale), damaged=list(plan.damaged), dry_run=True,
            notes=[*plan.notes, *plan.summary()],
        )
    return run_job(plan, executor if executor is not None else local_executor(pipe), on_frame)
