"""Two jobs on one --out: a job on a story whose lease another holds is refused with one line and
writes nothing, a job on another story runs alongside, every frame ends up in the dataset exactly
once, and a lease left by a dead job does not block the rerun that finishes it. Leases on a local
disk and on S3 (a moto server on 127.0.0.1, ``tests/_s3.py``): renewal keeps one alive past its
ttl for as long as its holder runs, and one that is no longer renewed is broken after its ttl."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from _s3 import Store

from storysync_dist.cli import main
from storysync_dist.io.lease import Lease, LeaseHeldError
from storysync_dist.io.sink import FrameRecord, ParquetFrameSink, open_dataset
from storysync_dist.io.storyboard import png_bytes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
SIZE = ["--height", "64", "--width", "64", "--steps", "2", "--model", "tiny-sdxl", "--no-progress"]
# Short, so that a lease is held for several ttls in seconds; renewals come every ttl / 3. Not
# shorter: the renewing thread of a test process on a loaded 2-CPU machine was once not scheduled
# for 2 s (a ttl of 2 s was broken by its contender in a CI run beside a benchmark).
TTL = 4.0


def render(story: Path, out: Path, *more: str) -> list[str]:
    return ["render", str(story), "--out", str(out), *SIZE, *more]


def test_a_second_job_on_the_same_story_is_refused_and_frames_are_written_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other.yaml"
    story = yaml.safe_load(EXAMPLE.read_text())
    story["id"] = "other-cat"
    other.write_text(yaml.safe_dump(story))
    # A job rendering ginger-cat holds the story's lease. The test takes that lease itself (the
    # one `render` takes, with its purpose), so the second job meets it however fast each runs.
    holder = Lease(str(out), "story-ginger-cat", purpose="job rendering story 'ginger-cat'")
    holder.acquire()
    try:
        # The second job, in an interpreter of its own.
        second = subprocess.Popen([sys.executable, "-m", "storysync_dist.cli", *render(EXAMPLE, out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        # Meanwhile a job on another story of the same dataset runs (in this process) and finishes.
        assert main(render(other, out)) == 0
        out2, err2 = second.communicate(timeout=300)
    finally:
        holder.release()
    assert second.returncode == 2, (out2, err2)
    lines = err2.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"storysync: error: --out {out}: story 'ginger-cat' is being written by another job")
    assert f"job rendering story 'ginger-cat'; host {socket.gethostname()}, pid {os.getpid()}" in lines[0]
    # The refused job wrote nothing of its story.
    assert not (out / "data" / "ginger-cat").exists() and not (out / "stories" / "ginger-cat.json").exists()
    capsys.readouterr()

    # With the lease free, the job renders the story.
    assert main(render(EXAMPLE, out)) == 0
    table = open_dataset(out).to_table().to_pylist()
    ginger = [r["frame_id"] for r in table if r["story_id"] == "ginger-cat"]
    assert sorted(ginger) == sorted(f["id"] for f in story["frames"])  # each frame exactly once
    assert len([r for r in table if r["story_id"] == "other-cat"]) == len(story["frames"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stories"]) == {"ginger-cat", "other-cat"}  # neither job lost the other's entry
    assert all(entry["complete"] for entry in manifest["stories"].values())
    assert not (out / "_locks").exists()  # every lease was released

    # Run again: everything is there now.
    capsys.readouterr()
    assert main(render(EXAMPLE, out)) == 0
    assert "rendered 0 frame(s), skipped 6 already present" in capsys.readouterr().out


def test_a_lease_left_by_a_dead_job_does_not_block_the_rerun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    locks = out / "_locks"
    locks.mkdir(parents=True)
    (locks / "story-ginger-cat.lock").write_text(json.dumps({
        "owner": "crashed", "host": socket.gethostname(), "pid": int(dead.stdout), "renewed": time.time(),
        "ttl": 3600, "purpose": "a job that crashed",
    }))
    assert main(render(EXAMPLE, out, "--only", "beach")) == 0
    assert "rendered 1 frame(s)" in capsys.readouterr().out
    assert not locks.exists()  # broken, taken, and released


# -- leases on a local disk and on S3 -----------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        return Store.on_s3(request.getfixturevalue("s3"), "leases")
    return Store.local(str(tmp_path / "out"))


def lease(store: Store, **kwargs: Any) -> Lease:
    return Lease(store.root, "story-x", storage_options=store.storage_options, ttl=TTL, **kwargs)


def lock_content(store: Store, lock: Lease) -> dict[str, Any]:
    return json.loads(store.fs.cat_file(lock.path))


def lock_writes(store: Store, mark: int, lock: Lease) -> list[tuple[str, bool, int]]:
    """S3: (PUT or DELETE, conditional, status) of every write of the lock object since ``mark``."""
    assert store.s3 is not None
    return [(r.op, r.conditional, r.status) for r in store.s3.since(mark, lock.path)
            if r.op in ("PUT", "DELETE", "DELETE_MANY", "COPY")]


def test_a_renewed_lease_outlives_its_ttl_and_no_other_writer_takes_it(store: Store) -> None:
    holder = lease(store, purpose="the holder")
    contender = lease(store)
    mark = store.s3.mark() if store.s3 is not None else 0
    holder.acquire()
    try:
        acquired = lock_content(store, holder)["acquired"]
        refusals: list[LeaseHeldError] = []
        deadline = time.monotonic() + 60
        # Try to take it until a try comes twice its ttl after it was taken: without renewals it
        # would be stale by then, and broken (acquire would return).
        while True:
            tried_at = time.time()
            with pytest.raises(LeaseHeldError) as refused:
                contender.acquire(wait=0)
            refusals.append(refused.value)
            if tried_at - acquired > 2 * TTL:
                break
            assert time.monotonic() < deadline, "the clock did not pass twice the ttl"
            time.sleep(TTL / 8)
        assert all(error.holder["owner"] == holder.owner for error in refusals)
        assert "the holder" in str(refusals[-1])
        # The holder's last renewal was within a ttl of the last refusal, so after the first ttl.
        assert refusals[-1].holder["renewed"] > acquired + TTL
        assert lock_content(store, holder)["owner"] == holder.owner and holder.held
    finally:
        holder.release()
        contender.release()  # held only if the test failed: no renewing thread outlives it
    assert not store.fs.exists(holder.path)
    contender.acquire(wait=0)  # released: taken at once
    contender.release()
    if store.s3 is not None:
        writes = lock_writes(store, mark, holder)
        # Taken with a conditional PUT (If-None-Match: *); every refused try was one answered 412;
        # renewals are plain PUTs; nothing deleted the lock until the holder let it go.
        assert writes[0] == ("PUT", True, 200)
        released = next(i for i, (op, _, _) in enumerate(writes) if op in ("DELETE", "DELETE_MANY"))
        held = writes[1:released]
        assert held.count(("PUT", True, 412)) == len(refusals)
        assert ("PUT", False, 200) in held and set(held) == {("PUT", True, 412), ("PUT", False, 200)}


# A job on another machine: it takes the lease, renews it, and is then killed. Its host name is
# not this one, so its pid tells nothing here: only the ttl can show that its lease is stale.
HOLDER = """
import json, socket, sys, time
socket.gethostname = lambda: "another-host"
from storysync_dist.io.lease import Lease
lease = Lease(sys.argv[1], "story-x", storage_options=json.loads(sys.argv[2]), ttl=float(sys.argv[3]),
              purpose="a job on another host")
lease.acquire()
print(lease.owner, flush=True)
time.sleep(600)
"""


def test_a_lease_no_longer_renewed_is_broken_after_its_ttl(store: Store) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store.root, json.dumps(store.storage_options or {}), str(TTL)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    contender = lease(store)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)  # the event: it holds the lease
        owner = holder.stdout.readline().strip() if ready else ""
        assert owner, "the holder did not take the lease within 60 s"
        with pytest.raises(LeaseHeldError) as refused:
            contender.acquire(wait=0)
        assert refused.value.holder["owner"] == owner and refused.value.holder["host"] == "another-host"
        assert "a job on another host" in str(refused.value)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    last = lock_content(store, contender)  # the killed job's last renewal: the lease stays behind
    assert last["owner"] == owner
    mark = store.s3.mark() if store.s3 is not None else 0
    contender.acquire(wait=60)  # waits while the lease is live, then breaks it
    try:
        assert time.time() - last["renewed"] > TTL  # not broken while it was live
        assert lock_content(store, contender)["owner"] == contender.owner
        with pytest.raises(LeaseHeldError):
            lease(store).acquire(wait=0)  # now the contender's, and renewed
    finally:
        contender.release()
    assert not store.fs.exists(contender.path)
    if store.s3 is not None:
        writes = lock_writes(store, mark, contender)
        # Refused (412) while live; then broken: a delete, and the contender's conditional PUT.
        taken = writes.index(("PUT", True, 200))
        assert taken > 0 and writes[taken - 1][0] in ("DELETE", "DELETE_MANY")
        assert set(writes[:taken - 1]) <= {("PUT", True, 412)}


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
