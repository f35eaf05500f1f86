"""Two jobs on one --out: the second job on the same story is refused with one line while the
first holds its lease, every frame ends up in the dataset exactly once, a job on another story
runs alongside without losing its manifest entry, and a lease left by a dead job does not block
the rerun that finishes it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from storysync_dist.io.lease import Lease
from storysync_dist.io.sink import FrameRecord, ParquetFrameSink, open_dataset
from storysync_dist.io.storyboard import png_bytes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "storysync_dist.cli", "render", *args, "--model", "tiny-sdxl", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def test_a_second_job_on_the_same_story_is_refused_and_frames_are_written_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other.yaml"
    story = yaml.safe_load(EXAMPLE.read_text())
    story["id"] = "other-cat"
    other.write_text(yaml.safe_dump(story))
    size = ["--height", "64", "--width", "64"]
    # Enough steps that the first job is still rendering while the second starts up (a few seconds
    # on a loaded machine): the second must meet its lease, not a finished story.
    first = cli(str(EXAMPLE), "--out", str(out), "--steps", "40", *size)
    lock = out / "_locks" / "story-ginger-cat.lock"
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first job never took its lease"
        time.sleep(0.05)
    second = cli(str(EXAMPLE), "--out", str(out), "--steps", "40", *size)
    third = cli(str(other), "--out", str(out), "--steps", "2", *size)  # another story, same dataset
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 2, (out2, err2)
    lines = err2.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"storysync: error: --out {out}: story 'ginger-cat' is being written by another job")
    assert f"pid {first.pid}" in lines[0]
    assert third.communicate(timeout=300) and third.returncode == 0
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1

    table = open_dataset(out).to_table().to_pylist()
    ginger = [r["frame_id"] for r in table if r["story_id"] == "ginger-cat"]
    assert sorted(ginger) == sorted(f["id"] for f in story["frames"])  # each frame exactly once
    assert len([r for r in table if r["story_id"] == "other-cat"]) == len(story["frames"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stories"]) == {"ginger-cat", "other-cat"}  # neither job lost the other's entry
    assert all(entry["complete"] for entry in manifest["stories"].values())
    assert not (out / "_locks").exists()  # both leases were released

    # The refused job can simply be run again: everything is there now.
    again = cli(str(EXAMPLE), "--out", str(out), "--steps", "40", *size)
    printed, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "rendered 0 frame(s), skipped 6 already present" in printed


def test_a_lease_left_by_a_dead_job_does_not_block_the_rerun(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    locks = out / "_locks"
    locks.mkdir(parents=True)
    (locks / "story-ginger-cat.lock").write_text(json.dumps({
        "owner": "crashed", "host": socket.gethostname(), "pid": int(dead.stdout), "renewed": time.time(),
        "ttl": 3600, "purpose": "a job that crashed",
    }))
    job = cli(str(EXAMPLE), "--out", str(out), "--steps", "2", "--height", "64", "--width", "64", "--only", "beach")
    printed, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "rendered 1 frame(s)" in printed


def test_a_live_lease_on_another_host_is_respected_until_it_expires(tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    holder = Lease(root, "story-x", ttl=1.0, purpose="elsewhere")
    holder.acquire()
    holder._stop.set()  # stop renewing, as a job on a machine that vanished would
    lease = Lease(root, "story-x", ttl=1.0)
    try:
        lease.acquire(wait=0)
    except Exception as exc:  # held and renewed just now
        assert "elsewhere" in str(exc)
    else:
        raise AssertionError("a live lease was broken")
    # Pretend the holder ran on another machine: its pid says nothing here, only the ttl counts.
    content = json.loads(Path(holder.path).read_text())
    content["host"] = "some-other-host"
    Path(holder.path).write_text(json.dumps(content))
    time.sleep(1.2)
    lease.acquire(wait=0)  # expired: broken and taken
    assert json.loads(Path(lease.path).read_text())["owner"] == lease.owner
    lease.release()
    assert not os.path.exists(lease.path)


def test_the_same_frame_written_by_two_sinks_is_one_part(tmp_path: Path) -> None:
    from PIL import Image

    root = str(tmp_path / "out")
    image = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))

    def record(fingerprint: str) -> FrameRecord:
        return FrameRecord(story_id="s", frame_id="f", frame_index=0, prompt="p", seed=1, image_png=image,
                           width=8, height=8, model="m", method="storysync", config="{}", fingerprint=fingerprint)

    first, second = ParquetFrameSink(root), ParquetFrameSink(root)
    url_a = first.write([record("a" * 64)])
    url_b = second.write([record("a" * 64)])  # a retry, or a second writer, of the same frame
    assert url_a == url_b
    assert len(ParquetFrameSink(root).stored("s")) == 1
    first.write([record("b" * 64)])  # a new render of the frame replaces the old row
    stored = ParquetFrameSink(root).stored("s")
    assert [(r.frame_id, r.fingerprint) for r in stored] == [("f", "b" * 64)]
