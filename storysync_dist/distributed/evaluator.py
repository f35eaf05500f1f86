"""``storysync eval --workers N``: N ``EvalWorker`` actors, each holding one set of encoders on one
device, score stories handed out one at a time (``ray.util.ActorPool``). Every remote call takes
and returns plain data: a story's ids, prompts and PNG bytes in, rows of floats out.

The actors take the resources a FrameWorker would (``cluster.actor_resources``: one GPU each on a
GPU cluster, one CPU each otherwise), so eval runs on the same clusters render does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray

from ..eval.story import EvalOptions, StoryFrames, load_scorers, score_story_frames
from .cluster import actor_resources, connect

__all__ = ["EvalWorker", "score_on_ray"]


class EvalWorker:
    """One set of encoders (and the background remover) on one device; scores whole stories."""

    def __init__(self, metrics: list[str], weights: str | None, encoders: str | None, device: str) -> None:
        self.metrics = tuple(metrics)
        self.encoders, self.remover = load_scorers(self.metrics, EvalOptions(dataset="", weights=weights,
                                                                     encoders=encoders, device=device))

    def score(self, story: StoryFrames) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        frames, row = score_story_frames(story, self.encoders, self.remover, self.metrics)
        return story.story_id, frames, row


def score_on_ray(
    stories: Iterable[StoryFrames], count: int, metrics: Sequence[str], options: EvalOptions,
    on_scored: Callable[[str, int], None] | None = None,
    into: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] | None = None,
) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Score the ``count`` ``stories`` on ``options.workers`` actors, one story in flight per actor
    (the iterable is consumed as actors free up, so only those stories' images are held);
    ``{story_id: (frame rows, story row)}``. ``on_scored(story_id, frames)`` is called on the
    driver as each story's scores arrive (the progress of ``storysync eval``). ``into``: the dict to
    fill (and return), so a caller interrupted midway keeps the stories scored so far."""
    connect(options.address, options.workers)
    resources = actor_resources(options.workers, options.device)
    remote = ray.remote(EvalWorker).options(**resources.ray_options())
    actors = [remote.remote(list(metrics), options.weights, options.encoders, resources.device)
              for _ in range(max(1, min(options.workers, count)))]
    results: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {} if into is None else into
    pending = iter(stories)
    try:
        in_flight = {}
        for actor in actors:
            story = next(pending, None)
            if story is not None:
                in_flight[actor.score.remote(story)] = actor
        while in_flight:
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(done)
            story_id, frames, row = ray.get(done)
            results[story_id] = (frames, row)
            if on_scored is not None:
                on_scored(story_id, len(frames))
            story = next(pending, None)
            if story is not None:
                in_flight[actor.score.remote(story)] = actor
        return results
    finally:
        for actor in actors:
            ray.kill(actor)
