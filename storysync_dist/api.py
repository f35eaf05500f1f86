"""The Python API for notebooks and scripts: render a story in this process or over Ray.

    from storysync_dist.api import RenderOptions, render_story
    result = render_story("examples/story.yaml", RenderOptions(model="tiny-sdxl", out="out/demo", workers=2))
"""

from __future__ import annotations

from collections.abc import Callable

from .engine.job import JobResult, RenderOptions, local_executor, prepare_job, run_job
from .engine.renderer import FrameOutput
from .spec import StorySpec

__all__ = ["JobResult", "RenderOptions", "render_story"]


def render_story(
    story: str | StorySpec,
    options: RenderOptions,
    *,
    pipe: object | None = None,
    on_frame: Callable[[FrameOutput], None] | None = None,
) -> JobResult:
    """Render ``story`` (a path or a loaded spec) into the dataset at ``options.out``.

    ``options.workers == 0`` renders in this process (``pipe`` may be a pipeline already loaded);
    ``workers >= 1`` renders on Ray actors (joining ``options.address``/RAY_ADDRESS or starting a
    local Ray). ``on_frame`` is called on the driver for every frame written.
    """
    plan = prepare_job(story, options, pipe=pipe)
    if options.workers == 0:
        return run_job(plan, local_executor(pipe), on_frame)
    if pipe is not None:
        raise ValueError("pipe= is only for workers=0: Ray workers load their own pipelines")
    from .distributed.executor import RayExecutor

    return run_job(plan, RayExecutor(options), on_frame)
