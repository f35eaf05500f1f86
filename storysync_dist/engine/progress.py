"""Progress of a job that renders many stories, possibly concurrently: a terminal bar and Ray metrics.

A :class:`JobProgress` is told how many frames the job will render for each story
(:meth:`JobProgress.add_story`), then about each rendered frame (:meth:`JobProgress.frame_done`) and
each finished story (:meth:`JobProgress.story_done`). It shows one tqdm bar for the whole job, prints
one line per finished story, and (on a Ray cluster) exports the numbers as Ray metrics, which Ray's
Prometheus endpoint serves and the Ray dashboard / Grafana can chart.

What the numbers mean (all times in seconds of ``clock``, ``time.monotonic`` by default):

- ``done``: frames rendered so far; ``total``: frames the job will render (the sum of the ``total``
  given to ``add_story``; it grows as stories are added). Frames skipped because they are already
  stored are not counted in either.
- ``elapsed``: seconds since the job's progress was created (or until :meth:`JobProgress.close`).
- ``fps``: frames per second over the job, ``done / elapsed`` (0.0 while nothing is done).
- ``eta_seconds``: estimated seconds left, ``(total - done) / fps``; ``None`` until a frame is done.
- Per story the same, with the story's own clock: it starts at ``add_story`` for that story (or
  at ``open_story``, when the story was added ahead of rendering) and stops at ``story_done`` (so a finished story's fps stays what it was when it finished);
  ``finished`` says whether ``story_done`` was called.

Ray metrics (created once per process; exported when ``metrics`` is True, or when it is None and
Ray is initialized):

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
:class:`JobProgress`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

__all__ = ["METRIC_DESCRIPTIONS", "JobProgress"]

#: name -> (kind, tag keys, description) of every Ray metric a JobProgress exports.
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


def _ray_metrics() -> dict[str, Any]:
    """The process's Ray metric objects, by name (made on first use)."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            from ray.util import metrics as ray_metrics

            made: dict[str, Any] = {}
            for name, (kind, tag_keys, description) in METRIC_DESCRIPTIONS.items():
                made[name] = getattr(ray_metrics, kind)(name, description=description, tag_keys=tag_keys)
            _METRICS = made
        return _METRICS


def _ray_is_initialized() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized())


def _rate(done: int, seconds: float) -> float:
    return done / seconds if done and seconds > 0 else 0.0


def _eta(done: int, total: int, fps: float) -> float | None:
    return max(total - done, 0) / fps if fps > 0 else None


@dataclass
class _Story:
    total: int
    added_at: float
    done: int = 0
    render_seconds: float = 0.0
    finished_at: float | None = None


class JobProgress:
    """Frames rendered by a job over many stories: a tqdm bar, a line per finished story, Ray metrics.

    ``show`` turns the bar and the per-story lines on; ``metrics`` exports Ray metrics (None: when Ray
    is initialized at construction); ``clock`` gives the time in seconds. The job's clock starts at
    construction; each story's clock starts at its ``add_story``. See the module docstring for what
    each number means. The methods may be called from several threads.
    """

    def __init__(self, job_name: str, *, show: bool = True, metrics: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job_name = job_name
        self.show = show
        self._clock = clock
        self._lock = threading.RLock()
        self._start = clock()
        self._closed_at: float | None = None
        self._stories: dict[str, _Story] = {}
        self._done = 0
        self._total = 0
        if metrics is None:
            metrics = _ray_is_initialized()
        self._metrics: dict[str, Any] | None = _ray_metrics() if metrics else None
        self._bar = tqdm(total=0, desc=job_name, unit="frame", disable=not show, dynamic_ncols=True)

    @property
    def metrics_enabled(self) -> bool:
        """Whether this progress exports Ray metrics."""
        return self._metrics is not None

    # -- recording ---------------------------------------------------------------------------------

    def add_story(self, story_id: str, total: int) -> None:
        """Count ``total`` frames (may be 0) the job will render for ``story_id``; starts the story's clock."""
        if total < 0:
            raise ValueError(f"story {story_id!r}: total must be >= 0, got {total}")
        with self._lock:
            if story_id in self._stories:
                raise ValueError(f"story {story_id!r} was already added to job {self.job_name!r}")
            self._stories[story_id] = _Story(total=total, added_at=self._clock())
            self._total += total
            self._bar.total = self._total
            self._refresh_bar()
            self._export(story_id, frame=False)

    def open_story(self, story_id: str, total: int) -> None:
        """The story starts rendering now with ``total`` frames: add it, or, when it was added ahead
        (a job that knows all its stories at the start, so the job's total and ETA cover them
        from the first frame), set its total anew and restart its clock."""
        if total < 0:
            raise ValueError(f"story {story_id!r}: total must be >= 0, got {total}")
        with self._lock:
            story = self._stories.get(story_id)
            if story is None:
                self.add_story(story_id, total)
                return
            self._total += total - story.total
            story.total = total
            story.added_at = self._clock()
            self._bar.total = self._total
            self._refresh_bar()
            self._export(story_id, frame=False)

    def frame_done(self, story_id: str, seconds: float = 0.0) -> None:
        """Count one rendered frame of ``story_id``; ``seconds``: how long it took to render (optional,
        only shown in the story's line as the mean render time per frame)."""
        with self._lock:
            story = self._story(story_id)
            story.done += 1
            story.render_seconds += seconds
            self._done += 1
            self._refresh_bar(advance=1)
            self._export(story_id, frame=True)

    def story_done(self, story_id: str) -> None:
        """Mark ``story_id`` finished (stops its clock) and print its line: frames, wall time, fps.

        Calling it again for a finished story does nothing."""
        with self._lock:
            story = self._story(story_id)
            if story.finished_at is not None:
                return
            story.finished_at = self._clock()
            self._refresh_bar()
            if self.show:
                tqdm.write(self._story_line(story_id, story))

    def close(self) -> None:
        """Stop the job's clock and close the bar (idempotent)."""
        with self._lock:
            if self._closed_at is not None:
                return
            self._closed_at = self._clock()
            self._refresh_bar()
            self._bar.close()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The numbers now: ``{"done", "total", "fps", "eta_seconds", "elapsed", "stories": {id: {"done",
        "total", "fps", "eta_seconds", "finished"}}}`` (meanings in the module docstring)."""
        with self._lock:
            now = self._clock()
            elapsed = self._elapsed(now)
            fps = _rate(self._done, elapsed)
            stories = {}
            for story_id, story in self._stories.items():
                story_fps = _rate(story.done, self._story_seconds(story, now))
                stories[story_id] = {
                    "done": story.done,
                    "total": story.total,
                    "fps": story_fps,
                    "eta_seconds": _eta(story.done, story.total, story_fps),
                    "finished": story.finished_at is not None,
                }
            return {
                "done": self._done,
                "total": self._total,
                "fps": fps,
                "eta_seconds": _eta(self._done, self._total, fps),
                "elapsed": elapsed,
                "stories": stories,
            }

    # -- internals ---------------------------------------------------------------------------------

    def _story(self, story_id: str) -> _Story:
        try:
            return self._stories[story_id]
        except KeyError:
            raise KeyError(f"story {story_id!r} was not added to job {self.job_name!r}") from None

    def _elapsed(self, now: float) -> float:
        return (self._closed_at if self._closed_at is not None else now) - self._start

    def _story_seconds(self, story: _Story, now: float) -> float:
        return (story.finished_at if story.finished_at is not None else now) - story.added_at

    def _story_line(self, story_id: str, story: _Story) -> str:
        wall = self._story_seconds(story, self._clock())
        line = (f"{self.job_name}: story {story_id}: {story.done}/{story.total} frames in "
                f"{wall:.1f}s ({_rate(story.done, wall):.2f} fps)")
        if story.done and story.render_seconds > 0:
            line += f", {story.render_seconds / story.done:.2f}s/frame rendering"
        return line

    def _refresh_bar(self, advance: int = 0) -> None:
        if self._bar.disable:
            return
        elapsed = self._elapsed(self._clock())
        fps = _rate(self._done, elapsed)
        eta = _eta(self._done, self._total, fps)
        finished = sum(story.finished_at is not None for story in self._stories.values())
        eta_text = "?" if eta is None else tqdm.format_interval(eta)
        self._bar.set_postfix_str(f"fps={fps:.2f}, eta={eta_text}, stories={finished}/{len(self._stories)}",
                                  refresh=not advance)
        if advance:
            self._bar.update(advance)

    def _export(self, story_id: str, *, frame: bool) -> None:
        if self._metrics is None:
            return
        job = {"job": self.job_name}
        story_tags = {"job": self.job_name, "story": story_id}
        fps = _rate(self._done, self._elapsed(self._clock()))
        eta = _eta(self._done, self._total, fps)
        if frame:
            self._metrics["storysync_frames_done"].inc(1, tags=story_tags)
        self._metrics["storysync_story_frames_done"].set(self._stories[story_id].done, tags=story_tags)
        self._metrics["storysync_frames_total"].set(self._total, tags=job)
        self._metrics["storysync_frames_per_second"].set(fps, tags=job)
        if eta is not None:
            self._metrics["storysync_eta_seconds"].set(eta, tags=job)
