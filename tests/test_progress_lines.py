"""Progress where no terminal is attached (``ray job logs``, CI, a redirected file): plain lines at
most every ``--log-every`` seconds and no carriage return; a terminal keeps the tqdm bar. And the
start-up notice of an embedded Ray that means nothing for a cluster the job started itself.

The cadence is checked with a fake clock; the CLI runs as a user runs it, stderr in a file."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _stories import fox_story

from storysync_dist.cli import build_parser, main
from storysync_dist.engine import run as run_module
from storysync_dist.engine.job import RenderOptions
from storysync_dist.engine.progress import JobProgress, format_seconds
from storysync_dist.engine.run import JobContext

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-sdxl", "--steps", "2", "--height", "64", "--width", "64"]
FRAMES = 3
# "<job>: 2/3 frames, 0.85 fps, ETA 1s, stories 0/1"; the last one "<job>: 3/3 frames in 6s, ..."
DURATION = r"(\d+s|\d+m \d\ds|\d+h \d\dm)"
PROGRESS_LINE = re.compile(r"^(?P<job>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>frame|image)s, "
                           rf"\d+\.\d\d (fps|images/s), ETA ({DURATION}|\?), stories \d+/\d+$")
FINAL_LINE = re.compile(rf"^(?P<job>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>frame|image)s in {DURATION}, "
                        r"\d+\.\d\d (fps|images/s), stories (?P<finished>\d+)/(?P<stories>\d+)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, as stderr in a shell does."""

    def isatty(self) -> bool:
        return True


# ---- JobProgress, unit ----------------------------------------------------------------------------
def test_without_a_terminal_one_line_per_log_every_seconds_and_a_last_line(capsys) -> None:
    clock, log = FakeClock(), io.StringIO()
    p = JobProgress("job", clock=clock, log_every=10, stream=log)
    assert p.lines
    p.add_story("a", 4)
    p.add_story("b", 2)
    for t, story in [(5, "a"), (10, "a"), (15, "b"), (19.9, "b")]:
        clock.now = t
        p.frame_done(story, seconds=0.5)
    clock.now = 20
    p.story_done("b")  # 10 s after the last line: the next one
    clock.now = 100
    p.frame_done("a")
    p.frame_done("a")  # the same instant: no second line
    p.story_done("a")
    p.close()
    p.close()  # once
    assert log.getvalue().splitlines() == [
        "job: 2/6 frames, 0.20 fps, ETA 20s, stories 0/2",
        "job: 4/6 frames, 0.20 fps, ETA 10s, stories 1/2",
        "job: 5/6 frames, 0.05 fps, ETA 20s, stories 1/2",
        "job: 6/6 frames in 1m 40s, 0.06 fps, stories 2/2",
    ]
    assert "\r" not in log.getvalue()
    for line in log.getvalue().splitlines()[:-1]:
        assert PROGRESS_LINE.match(line), line
    assert FINAL_LINE.match(log.getvalue().splitlines()[-1])
    captured = capsys.readouterr()
    # the per-story lines stay, plain, on stdout; nothing goes to the real stderr
    assert captured.out.splitlines() == [
        "job: story b: 2/2 frames in 20.0s (0.10 fps), 0.50s/frame rendering",
        "job: story a: 4/4 frames in 100.0s (0.04 fps), 0.25s/frame rendering",
    ]
    assert captured.err == ""


def test_lines_count_images_and_no_progress_writes_nothing(capsys) -> None:
    clock, log = FakeClock(), io.StringIO()
    p = JobProgress("scoring ds", clock=clock, log_every=1, stream=log, unit="image",
                    story_lines=False)
    p.add_story("s1", 3)
    p.add_story("s2", 1)
    clock.now = 2
    p.frame_done("s1", count=3)
    p.story_done("s1")
    p.close()
    assert log.getvalue().splitlines() == ["scoring ds: 3/4 images, 1.50 images/s, ETA 1s, stories 0/2",
                                           "scoring ds: 3/4 images in 2s, 1.50 images/s, stories 1/2"]
    assert p.snapshot()["stories"]["s1"]["done"] == 3
    with pytest.raises(ValueError, match="count"):
        p.frame_done("s2", count=0)

    quiet = JobProgress("quiet", show=False, clock=clock, log_every=1, stream=log)
    quiet.add_story("a", 1)
    clock.now = 50
    quiet.frame_done("a")
    quiet.story_done("a")
    quiet.close()
    assert "quiet" not in log.getvalue()
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="log_every"):
        JobProgress("bad", log_every=0, stream=log)


def test_a_terminal_keeps_the_bar(capsys) -> None:
    clock, term = FakeClock(), FakeTerminal()
    p = JobProgress("tty", clock=clock, log_every=0.001, stream=term)
    assert not p.lines
    p.add_story("a", 2)
    clock.now = 1
    p.frame_done("a")
    clock.now = 2
    p.frame_done("a")
    p.story_done("a")
    p.close()
    drawn = term.getvalue()
    assert "\r" in drawn and "2/2" in drawn and "stories=1/1" in drawn  # the bar, redrawn in place
    assert not any(PROGRESS_LINE.match(x) or FINAL_LINE.match(x) for x in re.split(r"[\r\n]", drawn))
    assert capsys.readouterr().out.splitlines() == ["tty: story a: 2/2 frames in 2.0s (1.00 fps)"]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 0.4, 33.2, 59.6, 61, 3599, 3725)] == [
        "0s", "0s", "33s", "1m 00s", "1m 01s", "59m 59s", "1h 02m"]


def test_a_story_run_alone_gets_its_own_progress(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """JobContext without a job's JobProgress (``run_job``) shows its own, the same way; with one
    it leaves the job's open."""

    class Sink:
        target_part_bytes = 1 << 30

        def write(self, records: list) -> None:
            pass

        def staged_bytes(self, story_id: str) -> int:
            return 0

    monkeypatch.setattr(run_module, "_record", lambda plan, output: None)
    options = RenderOptions(model="tiny-sdxl", out="mem-out", log_every=1e-9)
    plan = SimpleNamespace(options=options, spec=SimpleNamespace(id="fox"), total=2)
    output = SimpleNamespace(job=SimpleNamespace(frame_id="f0"), seconds=0.25)
    ctx = JobContext(plan, Sink(), None)  # stderr here is pytest's capture: not a terminal
    ctx.emit(output)
    ctx.close()
    ctx.close()  # finish then abort: once
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines and all(PROGRESS_LINE.match(x) for x in lines[:-1]) and "\r" not in captured.err
    assert FINAL_LINE.match(lines[-1]) and lines[-1].startswith("mem-out: 1/2 frames in ")
    assert captured.out.startswith("mem-out: story fox: 1/2 frames in ")

    log = io.StringIO()
    job = JobProgress("job", stream=log, log_every=3600)
    ctx = JobContext(plan, Sink(), None, progress=job)
    ctx.emit(output)
    ctx.close()
    story = job.snapshot()["stories"]["fox"]
    assert story["done"] == 1 and story["finished"]
    assert log.getvalue() == ""  # the job's progress is still open: the job closes it
    job.close()
    assert log.getvalue().startswith("job: 1/2 frames in ")


def test_eval_and_bench_read_the_progress_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["eval", "ds", "--no-progress", "--log-every", "2.5"])
    from storysync_dist.arguments import bench_options_from_args, eval_options_from_args

    options = eval_options_from_args(args)
    assert (options.progress, options.log_every) == (False, 2.5)
    defaults = eval_options_from_args(parser.parse_args(["eval", "ds"]))
    assert (defaults.progress, defaults.log_every) == (True, 10.0)
    bench = bench_options_from_args(parser.parse_args(
        ["bench", "--suite", "s.yaml", "--model", "tiny-sdxl", "--out", "o", "--log-every", "3"]))
    assert (bench.render.progress, bench.render.log_every) == (True, 3.0)
    assert (bench.scoring.progress, bench.scoring.log_every) == (True, 3.0)


# ---- Ray's start-up notice ------------------------------------------------------------------------
def test_the_embedded_start_drops_only_the_token_notice() -> None:
    from ray._private.authentication import authentication_token_setup as token_setup

    from storysync_dist.distributed.cluster import _quiet_embedded_start

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    token_setup.logger.addHandler(handler)
    try:
        with _quiet_embedded_start():
            token_setup._warn_token_auth_enabled()  # what ray.init() of a new local cluster logs
            token_setup._warn_token_auth_disabled()  # a warning that means something: kept
        token_setup._warn_token_auth_enabled()  # joining a cluster: shown
    finally:
        token_setup.logger.removeHandler(handler)
    assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster",
                                               "Token authentication is enabled for this Ray cluster"]


# ---- the CLI, as a user runs it -------------------------------------------------------------------
def user_env(home: Path) -> dict[str, str]:
    """This session's environment as a user's shell has it: no Ray token settings (conftest sets
    them for the session), no RAY_ADDRESS, a home of its own (Ray writes its token there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def logged_render(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``storysync render --workers 1 --device cpu`` (a Ray the job starts itself) with stdout and
    stderr redirected to files. About 15 to 25 s, most of it Ray starting: one run serves the
    progress lines, the Ray notice and the dataset that eval scores."""
    root = tmp_path_factory.mktemp("logged")
    story, out, home = root / "fox.yaml", root / "out", root / "home"
    story.write_text(yaml.safe_dump(fox_story(FRAMES)))
    home.mkdir()
    with open(root / "stdout.log", "w") as stdout, open(root / "stderr.log", "w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "storysync_dist.cli", "render", str(story), "--out", str(out), *TINY,
             "--workers", "1", "--device", "cpu", "--log-every", "0.01"],
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=user_env(home), cwd=ROOT, timeout=300,
        )
    result = SimpleNamespace(out=out, home=home, stdout=(root / "stdout.log").read_text(),
                             stderr=(root / "stderr.log").read_text(), returncode=proc.returncode)
    assert proc.returncode == 0, result.stderr
    return result


def test_render_to_a_file_writes_plain_progress_lines(logged_render: SimpleNamespace) -> None:
    err = logged_render.stderr
    assert "\r" not in err and "\x1b" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    progress = [m for m in map(PROGRESS_LINE.match, lines) if m]
    assert progress, err
    job = str(logged_render.out)
    assert all(m["job"] == job and m["total"] == str(FRAMES) and m["unit"] == "frame" for m in progress)
    done = [int(m["done"]) for m in progress]
    assert done == sorted(done)
    final = FINAL_LINE.match(lines[-1])
    assert final and final["done"] == final["total"] == str(FRAMES) and final["finished"] == final["stories"] == "1"
    assert f"{job}: story fox: {FRAMES}/{FRAMES} frames in " in logged_render.stdout
    assert f"rendered {FRAMES} frame(s)" in logged_render.stdout


def test_a_ray_the_job_started_shows_no_token_notice(logged_render: SimpleNamespace) -> None:
    assert "Token authentication" not in logged_render.stderr
    assert "RAY_AUTH_MODE" not in logged_render.stderr
    # Only the notice went: the cluster did use token authentication (Ray made the user a token).
    assert (logged_render.home / ".ray" / "auth_token").is_file()


def test_eval_to_a_file_writes_plain_progress_lines(logged_render: SimpleNamespace, tmp_path: Path,
                                                   capsys) -> None:
    scores = tmp_path / "scores"
    assert main(["eval", str(logged_render.out), "--encoders", "random-tiny", "--out", str(scores),
                 "--log-every", "0.001"]) == 0
    captured = capsys.readouterr()  # stderr here is pytest's capture: not a terminal
    assert "\r" not in captured.err
    lines = [x for x in captured.err.splitlines() if x.strip()]
    final = FINAL_LINE.match(lines[-1])
    assert final and final["job"] == f"scoring {logged_render.out}" and final["unit"] == "image"
    assert final["done"] == final["total"] == str(FRAMES) and final["finished"] == final["stories"] == "1"
    assert all(PROGRESS_LINE.match(x) for x in lines[:-1]), lines
    assert f"scored 1 story(ies), kept 0 scored earlier, {FRAMES} frame(s)" in captured.out

    # A rerun scores nothing: no progress at all. --no-progress: none either.
    assert main(["eval", str(logged_render.out), "--encoders", "random-tiny", "--out", str(scores)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["eval", str(logged_render.out), "--encoders", "random-tiny", "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
