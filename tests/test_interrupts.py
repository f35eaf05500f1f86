"""SIGINT and SIGTERM end a job clearly (issue 19): exit 130/143, one line, no traceback, nothing
of Ray left behind, the manifest marks the story incomplete, and a rerun finishes the job equal
to an uninterrupted run.

The commands run as subprocesses, as a user runs them; each is signalled once it has staged a
given number of frames (a point in the job the test observes, not a time), or at the start of its
job (its story lease taken, nothing rendered yet). Where the signal lands between those events
does not change what must hold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from _pixels import assert_same_pixels, frame_pixels, like_a_ray_worker
from _ray import cluster_processes

from storysync_dist.api import RenderOptions, render_stories, render_story
from storysync_dist.interrupts import Interrupted, exit_code, interrupted_line, signals_interrupt
from storysync_dist.story import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
START_LIMIT = 240.0  # seconds a subprocess may take to reach the point it is signalled at

STORY = {
    "id": "ginger-cat",
    "style": "A photo of",
    "subjects": [{"name": "cat", "description": "a ginger cat", "tokens": ["cat"]}],
    "defaults": {"steps": 8, "height": 64, "width": 64},
    "frames": [{"id": f"f{i}", "prompt": f"{{cat}} {where}"} for i, where in enumerate(
        ["in a garden", "on a roof", "by a window", "in the snow", "on a boat", "in a library"])],
}

SUITE = {
    "animals": [
        {"concept_token": "owl", "subject": "A snowy owl", "style": "A photo of",
         "settings": ["on a branch", "in flight", "at dusk"]},
        {"concept_token": "fox", "subject": "A red fox", "style": "A photo of",
         "settings": ["in the snow", "by a river", "in a meadow"]},
    ],
}


# ---- the handler itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_interrupted_once_and_the_handlers_come_back(signum: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    caught = None
    with signals_interrupt():
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises within the sleep
        except Interrupted as exc:
            caught = exc
            # While the first is handled, another signal is ignored: the cleanup runs to its end.
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert caught is not None and caught.signum == signum
    assert isinstance(caught, KeyboardInterrupt)  # what Ray's waits pass through
    assert caught.exit_code == exit_code(signum) == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert {s: signal.getsignal(s) for s in before} == before
    line = interrupted_line("storysync", caught)
    assert line.startswith("storysync: interrupted (") and "\n" not in line


# ---- the commands -----------------------------------------------------------------------------
@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short private RAY_TMPDIR for an embedded cluster (unix socket paths are short)."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = ray_tmp
    return env


def _staged(out: Path) -> int:
    return sum(1 for _ in (out / "data").rglob("*.staged")) if (out / "data").exists() else 0


def _leased(out: Path) -> bool:
    return (out / "_locks").exists() and any((out / "_locks").iterdir())


def _signalled(command: list[str], env: dict[str, str], when: Callable[[], bool],
               signum: int) -> tuple[int, str, str]:
    """Run ``command``, send ``signum`` once ``when()`` holds; (exit code, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + START_LIMIT
            while not when():
                assert proc.poll() is None, "the command ended before the point it was to be signalled at"
                assert time.monotonic() < deadline, "the command did not reach the point in time"
                time.sleep(0.05)
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


def _assert_clean_end(code: int, stderr: str, signum: int, prog: str, out: Path, ray_tmp: str | None) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == exit_code(signum), stderr
    # One line says how it ended, and it is the last (the job's own warnings may come before it,
    # such as a wait for the cluster's CPUs on a busy machine).
    ends = [line for line in lines if "interrupted" in line]
    assert ends == lines[-1:], stderr
    assert ends[0].startswith(f"{prog}: interrupted ({signal.Signals(signum).name}): ")
    assert ends[0].endswith("; run the same command again to finish")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    if ray_tmp is not None:
        # The cluster the job started went down with it (Ray's shutdown runs as the process exits).
        deadline = time.monotonic() + 30
        while cluster_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster_processes(ray_tmp) == []


def _render_command(story: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "storysync_dist.cli", "render", str(story), "--model", "tiny-sdxl",
            "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def story_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("story") / "cat.yaml"
    path.write_text(yaml.safe_dump(STORY))
    return path


@pytest.fixture(scope="module")
def uninterrupted(story_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The story rendered without an interruption, in this process as a worker renders."""
    out = tmp_path_factory.mktemp("whole") / "out"
    with like_a_ray_worker():
        render_story(str(story_file), RenderOptions(model="tiny-sdxl", out=str(out), progress=False))
    return frame_pixels(out)


def _manifest_entry(out: Path, story_id: str) -> dict:
    return json.loads((out / "manifest.json").read_text())["stories"][story_id]


# A --workers 2 render stopped with SIGTERM: tests/test_job_submit.py (`ray job stop`); make_dataset
# on Ray below (a cluster the job started itself, which must go down with it).
def test_an_interrupted_render_ends_in_one_line_and_a_rerun_finishes_it(
        story_file: Path, uninterrupted: dict, tmp_path: Path, ray_tmp: str) -> None:
    out = tmp_path / "out"
    code, _, stderr = _signalled(_render_command(story_file, out), _env(ray_tmp), lambda: _staged(out) >= 3,
                                 signal.SIGINT)
    _assert_clean_end(code, stderr, signal.SIGINT, "storysync", out, None)
    written = frame_pixels(out)
    assert 3 <= len(written) < len(STORY["frames"])
    assert f"{len(written)} of {len(STORY['frames'])} frames written to {out}" in stderr
    entry = _manifest_entry(out, "ginger-cat")
    assert entry["complete"] is False
    assert sorted(f["id"] for f in entry["frames"] if f["done"]) == sorted(written)
    assert not _leased(out)  # the lease was let go: the rerun starts at once

    rerun = subprocess.run(_render_command(story_file, out), cwd=ROOT, env=_env(ray_tmp),
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"rendered {len(STORY['frames']) - len(written)} frame(s), skipped {len(written)}" in rerun.stdout
    assert _manifest_entry(out, "ginger-cat")["complete"] is True
    assert_same_pixels(frame_pixels(out), uninterrupted)


def test_make_dataset_interrupted_at_its_start_and_midway_on_ray_then_finished(
        tmp_path: Path, ray_tmp: str) -> None:
    # About 30 s: three runs of the job as subprocesses (stopped at its start, stopped midway on
    # Ray, finished) and the reference; the Ray one starts its own cluster, which is the point.
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    out = tmp_path / "out"
    sampling = ["--steps", "8", "--height", "64", "--width", "64"]
    command = [sys.executable, str(ROOT / "jobs" / "make_dataset.py"), str(suite), "--model", "tiny-sdxl",
               "--out", str(out), "--no-progress", *sampling]
    on_ray = [*command, "--workers", "2", "--device", "cpu"]
    # At its start, in one process: a story leased, nothing rendered yet.
    code, _, stderr = _signalled(command, _env(ray_tmp), lambda: _leased(out), signal.SIGINT)
    _assert_clean_end(code, stderr, signal.SIGINT, "make_dataset", out, None)
    assert not _leased(out)
    # Midway, on Ray: two frames staged.
    code, _, stderr = _signalled(on_ray, _env(ray_tmp), lambda: _staged(out) >= 2, signal.SIGTERM)
    _assert_clean_end(code, stderr, signal.SIGTERM, "make_dataset", out, ray_tmp)
    assert not _leased(out)
    entries = json.loads((out / "manifest.json").read_text())["stories"]
    assert entries and not all(e["complete"] for e in entries.values())

    rerun = subprocess.run(command, cwd=ROOT, env=_env(ray_tmp), capture_output=True, text=True,
                           timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    whole = tmp_path / "whole"
    stories = load_benchmark(str(suite), defaults={"steps": 8, "height": 64, "width": 64})
    with like_a_ray_worker():
        list(render_stories(stories, RenderOptions(model="tiny-sdxl", out=str(whole), progress=False)))
    assert_same_pixels(frame_pixels(out, by_story=True), frame_pixels(whole, by_story=True))
    assert all(e["complete"] for e in json.loads((out / "manifest.json").read_text())["stories"].values())


def test_an_interrupted_eval_keeps_the_stories_scored_and_its_rerun_scores_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import storysync_dist.eval.run as evaluate
    from storysync_dist.cli import main

    dataset = tmp_path / "dataset"
    for story_id in ("cat-one", "cat-two"):
        story = tmp_path / f"{story_id}.yaml"
        story.write_text(yaml.safe_dump({**STORY, "id": story_id, "frames": STORY["frames"][:3],
                                         "defaults": {"steps": 2, "height": 64, "width": 64}}))
        render_story(str(story), RenderOptions(model="tiny-sdxl", out=str(dataset), progress=False))
    scores = tmp_path / "scores"
    real = evaluate.score_story_frames

    def score_then_ctrl_c(*args, **kwargs):  # Ctrl-C arrives once the first story is scored
        scored = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return scored

    monkeypatch.setattr(evaluate, "score_story_frames", score_then_ctrl_c)
    command = ["eval", str(dataset), "--encoders", "random-tiny", "--out", str(scores), "--no-progress"]
    assert main(command) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["storysync: interrupted (SIGINT): 0 of 2 stories scored; run the same command again to finish"]
    assert not (scores / "summary.json").exists()  # the first story's scores never reached the driver

    monkeypatch.setattr(evaluate, "score_story_frames", real)
    calls = []

    def score_once_then_ctrl_c(story, *args, **kwargs):
        scored = real(story, *args, **kwargs)
        calls.append(story.story_id)
        return scored

    def interrupted_after_one(story, *args, **kwargs):
        if calls:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return score_once_then_ctrl_c(story, *args, **kwargs)

    monkeypatch.setattr(evaluate, "score_story_frames", interrupted_after_one)
    assert main(command) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"storysync: interrupted (SIGTERM): 1 of 2 stories scored, their scores written to {scores}; "
                   "run the same command again to finish"]
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["complete"] is False and summary["scored_stories"] == 1 and summary["stories"] == 2

    monkeypatch.setattr(evaluate, "score_story_frames", score_once_then_ctrl_c)
    assert main(command) == 0
    assert calls == ["cat-one", "cat-two"]  # the rerun scored only the story left
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["complete"] is True and summary["scored_stories"] == 2
