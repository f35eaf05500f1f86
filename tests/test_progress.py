"""JobProgress: exact numbers under a fake clock, what it prints, and the Ray metrics it records.

The Ray test starts one local Ray (127.0.0.1 only, see conftest) for this module, on first use."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from ray.util.metrics import Counter, Gauge

from storysync_dist.distributed import metrics as metrics_module
from storysync_dist.distributed.metrics import METRIC_DESCRIPTIONS, RayProgressMetrics, progress_metrics
from storysync_dist.engine.progress import JobProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = [0.0]

    def __call__(self) -> float:
        return self.now[0]

    def at(self, t: float) -> None:
        self.now[0] = t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_snapshot_numbers_two_interleaved_stories(clock: FakeClock) -> None:
    p = JobProgress("job", show=False, clock=clock)
    snap = p.snapshot()
    assert snap == {"done": 0, "total": 0, "fps": 0.0, "eta_seconds": None, "elapsed": 0.0, "stories": {}}

    p.add_story("a", 4)  # t=0
    clock.at(1)
    p.add_story("b", 2)  # t=1
    snap = p.snapshot()
    assert (snap["done"], snap["total"], snap["fps"], snap["eta_seconds"]) == (0, 6, 0.0, None)
    assert snap["stories"]["b"] == {"done": 0, "total": 2, "fps": 0.0, "eta_seconds": None, "finished": False}

    for t, story in [(2, "a"), (3, "b"), (4, "a"), (5, "b")]:
        clock.at(t)
        p.frame_done(story, seconds=0.5)
    p.story_done("b")  # t=5
    snap = p.snapshot()
    assert snap["done"] == 4 and snap["total"] == 6 and snap["elapsed"] == 5.0
    assert snap["fps"] == pytest.approx(4 / 5)
    assert snap["eta_seconds"] == pytest.approx(2 / (4 / 5))  # 2.5
    # a: 2 of 4 frames over 5 s since its add_story; b: 2 of 2 over 4 s (added at t=1, done at t=5)
    assert snap["stories"]["a"] == {"done": 2, "total": 4, "fps": pytest.approx(0.4),
                                    "eta_seconds": pytest.approx(5.0), "finished": False}
    assert snap["stories"]["b"] == {"done": 2, "total": 2, "fps": pytest.approx(0.5),
                                    "eta_seconds": 0.0, "finished": True}

    clock.at(9)  # a finished story's clock is stopped; the job's and a's run on
    snap = p.snapshot()
    assert snap["fps"] == pytest.approx(4 / 9) and snap["eta_seconds"] == pytest.approx(2 / (4 / 9))
    assert snap["stories"]["a"]["fps"] == pytest.approx(2 / 9)
    assert snap["stories"]["a"]["eta_seconds"] == pytest.approx(2 / (2 / 9))
    assert snap["stories"]["b"]["fps"] == pytest.approx(0.5)

    clock.at(10)
    p.frame_done("a")
    p.frame_done("a")
    p.story_done("a")
    p.close()
    clock.at(20)  # the job's clock stopped at close
    snap = p.snapshot()
    assert (snap["done"], snap["total"], snap["elapsed"]) == (6, 6, 10.0)
    assert snap["fps"] == pytest.approx(0.6) and snap["eta_seconds"] == 0.0
    assert snap["stories"]["a"] == {"done": 4, "total": 4, "fps": pytest.approx(0.4),
                                    "eta_seconds": 0.0, "finished": True}


def test_zero_frame_story_and_misuse(clock: FakeClock) -> None:
    p = JobProgress("job", show=False, clock=clock)
    p.add_story("empty", 0)
    clock.at(3)
    p.story_done("empty")
    snap = p.snapshot()
    assert snap["stories"]["empty"] == {"done": 0, "total": 0, "fps": 0.0, "eta_seconds": None,
                                        "finished": True}
    assert (snap["done"], snap["total"], snap["fps"], snap["eta_seconds"]) == (0, 0, 0.0, None)
    with pytest.raises(ValueError, match="already added"):
        p.add_story("empty", 1)
    with pytest.raises(ValueError, match=">= 0"):
        p.add_story("neg", -1)
    with pytest.raises(KeyError, match="not added"):
        p.frame_done("missing")
    p.close()
    p.close()


def test_stories_added_ahead_count_from_the_start_and_reopen(clock: FakeClock) -> None:
    # A job that plans every story first: the job's total covers them all before any renders.
    p = JobProgress("job", show=False, clock=clock)
    p.add_story("a", 4)
    p.add_story("b", 6)
    assert p.snapshot()["total"] == 10
    clock.at(2)
    p.open_story("a", 3)  # re-planned when it opens: one frame turned out to be stored already
    clock.at(5)
    for _ in range(3):
        p.frame_done("a")
    snap = p.snapshot()
    assert (snap["done"], snap["total"]) == (3, 9)
    assert snap["fps"] == pytest.approx(3 / 5)
    assert snap["eta_seconds"] == pytest.approx(6 / (3 / 5))
    # The story's clock restarted at open_story (t=2): 3 frames in 3 s.
    assert snap["stories"]["a"]["fps"] == pytest.approx(1.0)
    assert snap["stories"]["b"]["total"] == 6
    p.open_story("c", 2)  # not added ahead: added now
    assert p.snapshot()["total"] == 11
    with pytest.raises(ValueError, match=">= 0"):
        p.open_story("b", -1)
    p.close()


def test_show_false_prints_nothing(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    p = JobProgress("quiet", show=False, clock=clock)
    p.add_story("a", 2)
    p.frame_done("a")
    p.frame_done("a")
    p.story_done("a")
    p.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_true_prints_a_line_per_finished_story(clock: FakeClock,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # On a terminal: the bar (where no terminal is, plain lines: tests/test_progress_lines.py).
    terminal = FakeTerminal()
    p = JobProgress("loud", show=True, clock=clock, stream=terminal)
    p.add_story("a", 2)
    p.add_story("b", 1)
    clock.at(2)
    p.frame_done("a", seconds=1.5)
    p.frame_done("b")
    p.story_done("b")
    p.story_done("b")  # again: no second line
    clock.at(4)
    p.frame_done("a", seconds=0.5)
    p.story_done("a")
    p.close()
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert lines == [
        "loud: story b: 1/1 frames in 2.0s (0.50 fps)",
        "loud: story a: 2/2 frames in 4.0s (0.50 fps), 1.00s/frame rendering",
    ]
    # the bar (on the terminal) carries the job's numbers in its postfix
    assert "stories=2/2" in terminal.getvalue() and "fps=0.75" in terminal.getvalue()
    assert captured.err == ""


def test_ray_metrics_record(ray_cluster, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = metrics_module.ray_metrics()
    assert set(metrics) == set(METRIC_DESCRIPTIONS)
    for name, (kind, tag_keys, description) in METRIC_DESCRIPTIONS.items():
        assert isinstance(metrics[name], {"Counter": Counter, "Gauge": Gauge}[kind])
        assert metrics[name].info["name"] == name
        assert metrics[name].info["tag_keys"] == tag_keys
        assert metrics[name].info["description"] == description
    assert metrics_module.ray_metrics() is metrics  # once per process

    # Ray 2.60 cannot read a metric's value back in-process: record the calls, and still make them.
    calls: list[tuple[str, str, float, dict[str, str]]] = []
    for name, metric in metrics.items():
        for method in ("inc", "set"):
            if hasattr(metric, method):
                original = getattr(metric, method)

                def recorder(value: Any, tags: dict[str, str] | None = None, *, _name: str = name,
                             _method: str = method, _original: Any = original) -> None:
                    _original(value, tags=tags)  # the real Ray call: must not raise
                    calls.append((_name, _method, value, dict(tags or {})))

                monkeypatch.setattr(metric, method, recorder)

    p = JobProgress("metrics-job", show=False, metrics=RayProgressMetrics(), clock=clock)
    assert p.metrics_enabled
    p.add_story("s1", 2)
    assert calls == [
        ("storysync_story_frames_done", "set", 0, {"job": "metrics-job", "story": "s1"}),
        ("storysync_frames_total", "set", 2, {"job": "metrics-job"}),
        ("storysync_frames_per_second", "set", 0.0, {"job": "metrics-job"}),
    ]
    calls.clear()
    clock.at(2)
    p.frame_done("s1")
    assert calls == [
        ("storysync_frames_done", "inc", 1, {"job": "metrics-job", "story": "s1"}),
        ("storysync_story_frames_done", "set", 1, {"job": "metrics-job", "story": "s1"}),
        ("storysync_frames_total", "set", 2, {"job": "metrics-job"}),
        ("storysync_frames_per_second", "set", 0.5, {"job": "metrics-job"}),
        ("storysync_eta_seconds", "set", 2.0, {"job": "metrics-job"}),
    ]
    calls.clear()
    p.add_story("s2", 3)
    p.frame_done("s2")
    assert ("storysync_frames_total", "set", 5, {"job": "metrics-job"}) in calls
    assert ("storysync_frames_done", "inc", 1, {"job": "metrics-job", "story": "s2"}) in calls
    assert ("storysync_story_frames_done", "set", 1, {"job": "metrics-job", "story": "s2"}) in calls
    assert ("storysync_eta_seconds", "set", 3.0, {"job": "metrics-job"}) in calls  # 3 left at 1 fps
    p.story_done("s1")
    p.close()

    # What the API passes: Ray's metrics while Ray is up in this process (the same objects), else none.
    import ray

    auto = progress_metrics()
    assert isinstance(auto, RayProgressMetrics) and auto.metrics is metrics
    assert JobProgress("auto", show=False, metrics=auto, clock=clock).metrics_enabled
    assert not JobProgress("off", show=False, clock=clock).metrics_enabled
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert progress_metrics() is None


def test_concurrent_frames_are_all_counted() -> None:
    p = JobProgress("threads", show=False)
    for i in range(4):
        p.add_story(f"s{i}", 250)
    threads = [threading.Thread(target=lambda s=f"s{i}": [p.frame_done(s) for _ in range(250)])
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = p.snapshot()
    assert (snap["done"], snap["total"]) == (1000, 1000)
    assert all(story["done"] == 250 for story in snap["stories"].values())
