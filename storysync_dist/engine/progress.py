"""Progress of a job that renders many stories, possibly concurrently: a terminal bar or plain
log lines, and Ray metrics.

A :class:`JobProgress` is told how many frames the job will render for each story
(:meth:`JobProgress.add_story`), then about each rendered frame (:meth:`JobProgress.frame_done`) and
each finished story (:meth:`JobProgress.story_done`). It shows the job's progress on ``stream``
(stderr by default), prints one line per finished story on stdout, and (on a Ray cluster) exports
the numbers as Ray metrics, which Ray's Prometheus endpoint serves and the Ray dashboard / Grafana
can chart.

How the job's progress is shown depends on ``stream``:

- a terminal (``stream.isatty()``): one tqdm bar for the whole job, redrawn in place;
- anything else (``ray job logs``, CI, a file): no bar and no carriage return, but one plain line at
  most every ``log_every`` seconds of ``clock`` (written when a frame or story is reported, so a
  quiet stretch writes nothing), and one last line at :meth:`JobProgress.close`::

      out/demo: 12/40 frames, 0.85 fps, ETA 33s, stories 1/4
      out/demo: 40/40 frames in 47s, 0.85 fps, stories 4/4

``unit`` names what is counted (``"frame"``; ``storysync eval`` counts ``"image"``s scored, and
its rate reads ``images/s``).

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

Metrics: a ``JobProgress`` given a :class:`ProgressMetrics` (``metrics=``) reports the numbers
above to it on every ``add_story`` and ``frame_done``. The engine knows no Ray: the caller passes
``distributed.metrics.progress_metrics()``, the Ray metrics exported when Ray is up (their names
and tags are listed there).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from tqdm.auto import tqdm

__all__ = ["DEFAULT_LOG_EVERY", "JobProgress", "ProgressMetrics", "format_seconds", "is_terminal"]

#: Seconds between two plain progress lines where the stream is not a terminal (``--log-every``).
DEFAULT_LOG_EVERY = 10.0


class ProgressMetrics(Protocol):
    """Where a ``JobProgress`` reports its numbers (``distributed.metrics.RayProgressMetrics``)."""

    def record(self, job: str, story: str, *, frames: int, story_frames_done: int, frames_total: int,
               fps: float, eta: float | None) -> None:
        """``frames`` of ``story`` were just done (0 when the story was only added); the rest are
        the numbers after it (module docstring)."""


def _rate(done: int, seconds: float) -> float:
    return done / seconds if done and seconds > 0 else 0.0


def _eta(done: int, total: int, fps: float) -> float | None:
    return max(total - done, 0) / fps if fps > 0 else None


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def format_seconds(seconds: float) -> str:
    """``"33s"``, ``"4m 05s"``, ``"2h 03m"``: a duration for a log line."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@dataclass
class _Story:
    total: int
    added_at: float
    done: int = 0
    render_seconds: float = 0.0
    finished_at: float | None = None


class JobProgress:
    """Frames rendered by a job over many stories: a tqdm bar on a terminal or plain lines elsewhere,
    a line per finished story, and metrics.

    ``show`` turns the progress and the per-story lines on; ``metrics`` gets the numbers (None:
    none; ``distributed.metrics.progress_metrics()`` for Ray's); ``clock`` gives the time in seconds. ``stream`` (None:
    ``sys.stderr`` now) gets the bar when it is a terminal, else a plain line at most every
    ``log_every`` seconds and one at close; ``story_lines`` prints a line per finished story on
    stdout; ``unit`` names what is counted. The job's clock starts at construction; each story's
    clock starts at its ``add_story``. See the module docstring for what each number means. The
    methods may be called from several threads.
    """

    def __init__(self, job_name: str, *, show: bool = True, metrics: ProgressMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, log_every: float = DEFAULT_LOG_EVERY,
                 stream: IO[str] | None = None, unit: str = "frame", story_lines: bool = True) -> None:
        if not log_every > 0:
            raise ValueError(f"log_every must be > 0, got {log_every}")
        self.job_name = job_name
        self.show = show
        self.log_every = log_every
        self.unit = unit
        self.story_lines = story_lines
        self.stream = sys.stderr if stream is None else stream
        # Plain lines where no terminal shows the bar: a bar's carriage returns smear in a log.
        self.lines = show and not is_terminal(self.stream)
        self._clock = clock
        self._lock = threading.RLock()
        self._start = clock()
        self._last_line = self._start
        self._closed_at: float | None = None
        self._stories: dict[str, _Story] = {}
        self._done = 0
        self._total = 0
        self._metrics = metrics
        self._bar = tqdm(total=0, desc=job_name, unit=unit, disable=not show or self.lines, file=self.stream,
                         dynamic_ncols=True)

    @property
    def metrics_enabled(self) -> bool:
        """Whether this progress reports to a ``ProgressMetrics``."""
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
            self._export(story_id, frame=0)
            self._maybe_line()

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
            self._export(story_id, frame=0)
            self._maybe_line()

    def frame_done(self, story_id: str, seconds: float = 0.0, *, count: int = 1) -> None:
        """Count ``count`` (default one) rendered frames of ``story_id``; ``seconds``: how long they
        took to render (optional, only shown in the story's line as the mean render time per frame)."""
        if count < 1:
            raise ValueError(f"story {story_id!r}: count must be >= 1, got {count}")
        with self._lock:
            story = self._story(story_id)
            story.done += count
            story.render_seconds += seconds
            self._done += count
            self._refresh_bar(advance=count)
            self._export(story_id, frame=count)
            self._maybe_line()

    def story_done(self, story_id: str) -> None:
        """Mark ``story_id`` finished (stops its clock) and print its line: frames, wall time, fps.

        Calling it again for a finished story does nothing."""
        with self._lock:
            story = self._story(story_id)
            if story.finished_at is not None:
                return
            story.finished_at = self._clock()
            self._refresh_bar()
            if self.show and self.story_lines:
                line = self._story_line(story_id, story)
                if self.lines:
                    print(line, file=sys.stdout, flush=True)
                else:
                    tqdm.write(line)
            self._maybe_line()

    def close(self) -> None:
        """Stop the job's clock and close the bar, or write the last plain line (idempotent)."""
        with self._lock:
            if self._closed_at is not None:
                return
            self._closed_at = self._clock()
            self._refresh_bar()
            self._bar.close()
            if self.lines and self._stories:
                self._write_line(self._final_line())

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

    def progress_line(self) -> str:
        """``"<job>: 12/40 frames, 0.85 fps, ETA 33s, stories 1/4"``: the job's numbers now."""
        with self._lock:
            _, rate, eta, finished = self._counts()
            eta_text = "?" if eta is None else format_seconds(eta)
            return (f"{self.job_name}: {self._done}/{self._total} {self.unit}s, {self._rate_text(rate)}, "
                    f"ETA {eta_text}, stories {finished}/{len(self._stories)}")

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
        line = (f"{self.job_name}: story {story_id}: {story.done}/{story.total} {self.unit}s in "
                f"{wall:.1f}s ({self._rate_text(_rate(story.done, wall))})")
        if story.done and story.render_seconds > 0:
            line += f", {story.render_seconds / story.done:.2f}s/{self.unit} rendering"
        return line

    def _counts(self) -> tuple[float, float, float | None, int]:
        """elapsed, rate, ETA and finished stories, now."""
        elapsed = self._elapsed(self._clock())
        rate = _rate(self._done, elapsed)
        finished = sum(story.finished_at is not None for story in self._stories.values())
        return elapsed, rate, _eta(self._done, self._total, rate), finished

    def _rate_text(self, rate: float) -> str:
        return f"{rate:.2f} fps" if self.unit == "frame" else f"{rate:.2f} {self.unit}s/s"

    def _final_line(self) -> str:
        elapsed, rate, _, finished = self._counts()
        return (f"{self.job_name}: {self._done}/{self._total} {self.unit}s in {format_seconds(elapsed)}, "
                f"{self._rate_text(rate)}, stories {finished}/{len(self._stories)}")

    def _maybe_line(self) -> None:
        """Write the progress line when ``log_every`` seconds have passed since the last one."""
        if not self.lines or self._closed_at is not None:
            return
        now = self._clock()
        if now - self._last_line >= self.log_every:
            self._write_line(self.progress_line())
            self._last_line = now

    def _write_line(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth failing a job
            pass

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

    def _export(self, story_id: str, *, frame: int) -> None:
        if self._metrics is None:
            return
        fps = _rate(self._done, self._elapsed(self._clock()))
        self._metrics.record(self.job_name, story_id, frames=frame, story_frames_done=self._stories[story_id].done,
                             frames_total=self._total, fps=fps, eta=_eta(self._done, self._total, fps))
