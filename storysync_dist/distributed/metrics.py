"""Ray metrics of a render's progress: what ``engine.progress.JobProgress`` reports, exported
through Ray's Prometheus endpoint (the Ray dashboard and Grafana read it). The engine knows no
Ray; the caller (``api.render_story``/``render_stories``) passes :func:`progress_metrics`.

=================================  =======  ============  ==============================================
name                               type     tags          description
=================================  =======  ============  ==============================================
``storysync_frames_done``          Counter  job, story    Frames rendered (a Prometheus counter, which
                                                          may be listed with a ``_total`` suffix).
``storysync_frames_total``         Gauge    job           Frames the job will render, over all its
                                                          stories added so far.
``storysync_frames_per_second``    Gauge    job           Frames rendered per second since the job
                                                          started.
``storysync_eta_seconds``          Gauge    job           Estimated seconds until the job has rendered
                                                          all its frames (set once a frame is done).
``storysync_story_frames_done``    Gauge    job, story    Frames of the story rendered so far by this
                                                          job.
=================================  =======  ============  ==============================================

The gauges are updated on every ``add_story`` and ``frame_done``; the counter on every
``frame_done``. Ray aggregates nothing across processes for a gauge: one driver should own a job's
``JobProgress``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["METRIC_DESCRIPTIONS", "RayProgressMetrics", "progress_metrics", "ray_metrics"]

#: name -> (kind, tag keys, description) of every Ray metric a render exports.
METRIC_DESCRIPTIONS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "storysync_frames_done": ("Counter", ("job", "story"), "Frames rendered."),
    "storysync_frames_total": ("Gauge", ("job",),
                               "Frames the job will render, over all its stories added so far."),
    "storysync_frames_per_second": ("Gauge", ("job",), "Frames rendered per second since the job started."),
    "storysync_eta_seconds": ("Gauge", ("job",),
                              "Estimated seconds until the job has rendered all its frames."),
    "storysync_story_frames_done": ("Gauge", ("job", "story"), "Frames of the story rendered so far."),
}

# Ray keeps one registration per metric name in a process: the metric objects are made once here.
_METRICS: dict[str, Any] | None = None
_METRICS_LOCK = threading.Lock()


def ray_metrics() -> dict[str, Any]:
    """The process's Ray metric objects, by name (made on first use)."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            from ray.util import metrics

            _METRICS = {name: getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)
                        for name, (kind, tag_keys, description) in METRIC_DESCRIPTIONS.items()}
        return _METRICS


class RayProgressMetrics:
    """An ``engine.progress.ProgressMetrics`` that sets the Ray metrics above."""

    def __init__(self) -> None:
        self.metrics = ray_metrics()

    def record(self, job: str, story: str, *, frames: int, story_frames_done: int, frames_total: int,
               fps: float, eta: float | None) -> None:
        tags, story_tags = {"job": job}, {"job": job, "story": story}
        if frames:
            self.metrics["storysync_frames_done"].inc(frames, tags=story_tags)
        self.metrics["storysync_story_frames_done"].set(story_frames_done, tags=story_tags)
        self.metrics["storysync_frames_total"].set(frames_total, tags=tags)
        self.metrics["storysync_frames_per_second"].set(fps, tags=tags)
        if eta is not None:
            self.metrics["storysync_eta_seconds"].set(eta, tags=tags)


def progress_metrics() -> RayProgressMetrics | None:
    """Ray's progress metrics when Ray is initialized in this process (a driver of ``ray job
    submit``, a notebook on a cluster, ``--workers N``), else None. Ray is not imported for it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return RayProgressMetrics()
