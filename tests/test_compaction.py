"""Compaction of staged frames into committed parts (``ParquetFrameSink.commit_story``): file counts,
crashes at every step, reruns, replacements, and what pyarrow, Hugging Face ``datasets`` and Ray
read; plus the listing cost of a write in a dataset of many stories.

The crash, rerun and listing tests run on a local disk and on the S3 API (a moto server,
``tests/_s3.py``), where a commit is one PUT, a "move" is a copy and a delete, a batch delete is
not atomic, and what a step costs is counted in the requests the server saw."""

from __future__ import annotations

import io
import math
import os
import pathlib
import random
import uuid
from collections import Counter

import datasets
import fsspec
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _s3 import MotoS3, S3Request, Store, key_of
from PIL import Image

from storysync_dist.io import FrameRecord, ParquetFrameSink, dataset_files, open_dataset, png_bytes
from storysync_dist.io import sink as sink_module

Row = tuple[str, str, str]  # (story_id, frame_id, fingerprint)


def rec(story: str, index: int, *, fingerprint: str | None = None, side: int = 16) -> FrameRecord:
    # Noise, so that the PNG's size follows the image's (a plain colour compresses to nothing).
    noise = random.Random(f"{story}/{index}").randbytes(side * side * 3)
    image = Image.frombytes("RGB", (side, side), noise)
    return FrameRecord(
        story_id=story, frame_id=f"f{index:03d}", frame_index=index, prompt=f"{story} scene {index}",
        seed=index, image_png=png_bytes(image), width=side, height=side, model="tiny", method="storysync",
        config='{"steps": 2}', fingerprint=fingerprint or f"{story}-fp-{index}",
    )


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Store:
    """``local`` (a folder) or ``s3`` (a prefix of the moto bucket): parametrize with indirect=True."""
    if request.param == "s3":
        return Store.on_s3(request.getfixturevalue("s3"), "compaction")
    return Store.local(str(tmp_path / "out"))


def sink_at(store: Store, *, fresh: bool = False, **kwargs) -> ParquetFrameSink:
    """A sink on ``store``; ``fresh``: with a filesystem of its own, as the next job's process has."""
    options = store.s3.fresh_options() if fresh and store.s3 is not None else store.storage_options
    return ParquetFrameSink(store.root, storage_options=options, **kwargs)


def data_files_of(store: Store) -> list[str]:
    return sorted(p for p in store.files() if p.startswith("data/"))


def staged_files(store: Store) -> list[str]:
    return [p for p in data_files_of(store) if p.endswith(".staged")]


def rows_of(table) -> list[Row]:
    return sorted(zip(table["story_id"].to_pylist(), table["frame_id"].to_pylist(),
                      table["fingerprint"].to_pylist()))


def read_pyarrow(store: Store) -> dict[str, list[Row]]:
    """What pyarrow sees: ``open_dataset``, a plain ``pyarrow.dataset`` and ``pq.read_table`` of ``data/``
    (default discovery: hive partitioning on, which the plain story folders do not trigger)."""
    fs, data = store.reader_fs(), store.path("data")
    plain = ds.dataset(data, format="parquet", partitioning="hive", filesystem=fs)
    return {"open_dataset": rows_of(open_dataset(store.root, store.reader_options()).to_table()),
            "pyarrow.dataset": rows_of(plain.to_table()),
            "pq.read_table": rows_of(pq.read_table(data, filesystem=fs))}


def read_hf(store: Store, tmp_path: pathlib.Path) -> dict[str, list[Row]]:
    """What Hugging Face ``datasets`` sees, with a glob over data/ and with ``dataset_files``."""
    found = {}
    with pytest.MonkeyPatch.context() as mp:
        # The suite runs with HF_HUB_OFFLINE=1, which refuses every remote URL; here the only remote
        # is the loopback moto server.
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", store.s3 is None)
        for label, files in (("datasets glob", f"{store.root}/data/**/*.parquet"),
                             ("datasets files", dataset_files(store.root, store.storage_options))):
            table = datasets.load_dataset("parquet", data_files=files, split="train",
                                          storage_options=store.reader_options(),
                                          cache_dir=str(tmp_path / f"hf-{uuid.uuid4().hex}"))
            found[label] = sorted(zip(table["story_id"], table["frame_id"], table["fingerprint"]))
    return found


def read_ray(store: Store) -> list[Row]:
    import ray

    rows = ray.data.read_parquet(store.path("data"), filesystem=store.arrow_fs(),
                                 columns=["story_id", "frame_id", "fingerprint"])
    return sorted((r["story_id"], r["frame_id"], r["fingerprint"]) for r in rows.take_all())


@pytest.fixture(scope="module")
def ray_data(ray_cluster):
    """``ray.data`` on the session's Ray head (tests/conftest.py)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def expected_rows(stories: dict[str, range]) -> list[Row]:
    return sorted((s, f"f{i:03d}", f"{s}-fp-{i}") for s, frames in stories.items() for i in frames)


# -- file counts -----------------------------------------------------------------------------------


def test_many_stories_compact_into_a_bounded_number_of_parts(tmp_path: pathlib.Path) -> None:
    local = Store.local(str(tmp_path / "out"))
    root = local.root
    target = 100_000
    sink = ParquetFrameSink(root, target_part_bytes=target)
    staged_bytes: dict[str, int] = {}
    largest_staged: dict[str, int] = {}
    for s in range(30):
        story = f"story-{s:02d}"
        for i in range(10):
            sink.write([rec(story, i, side=48 if s % 3 == 0 else 8)])
        assert len(staged_files(local)) == 10  # the earlier stories are committed already
        staged_bytes[story] = sink.staged_bytes(story)
        largest_staged[story] = max(os.path.getsize(os.path.join(root, p)) for p in staged_files(local))
        assert staged_bytes[story] == sum(os.path.getsize(os.path.join(root, p)) for p in staged_files(local))
        assert sink.commit_story(story) == []
        assert sink.staged_bytes(story) == 0
    assert staged_files(local) == []

    per_story = Counter(p.split("/")[1] for p in data_files_of(local) if p.endswith(".parquet"))
    assert set(per_story) == {f"story-{s:02d}" for s in range(30)}
    for story, count in per_story.items():
        assert count <= math.ceil(staged_bytes[story] / target) + 1
    assert max(per_story.values()) > 1, "some story must be split into several parts"
    assert min(per_story.values()) == 1
    # data/ holds the parts and the layout marker, nothing else.
    assert len(data_files_of(local)) == sum(per_story.values()) + 1
    for path in data_files_of(local):
        if path.endswith(".parquet"):
            assert os.path.getsize(os.path.join(root, path)) <= target + largest_staged[path.split("/")[1]]
    assert rows_of(open_dataset(root).to_table()) == expected_rows({f"story-{s:02d}": range(10) for s in range(30)})


# -- crashes ---------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _setup_two_stories(store: Store) -> tuple[ParquetFrameSink, dict[str, range]]:
    """A finished story "done", and story "live" with 8 frames staged (about 3 parts' worth)."""
    sink = sink_at(store, target_part_bytes=20_000)
    for i in range(4):
        sink.write([rec("done", i)])
    sink.commit_story("done")
    for i in range(8):
        sink.write([rec("live", i)])
    return sink, {"done": range(4), "live": range(8)}


def _written_keys(store: Store, requests: int | list[S3Request]) -> set[str]:
    """Files of ``store`` the S3 server was asked to create, overwrite or delete in ``requests``
    (or since that mark of its log)."""
    assert store.s3 is not None
    prefix = key_of(store.root) + "/"
    found = set()
    if isinstance(requests, int):
        requests = store.s3.since(requests, store.root)
    for request in requests:
        if request.op in ("PUT", "COPY", "DELETE", "MULTIPART"):
            found.add(request.key.removeprefix(prefix))
        found.update(key.removeprefix(prefix) for key in request.keys)
    return found


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
@pytest.mark.parametrize("point", ["first-part", "second-part", "delete-staged", "delete-half"])
def test_a_crash_at_any_point_of_compaction(
    point: str, store: Store, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, ray_data
) -> None:
    sink, stories = _setup_two_stories(store)
    all_rows = expected_rows(stories)
    done_rows = expected_rows({"done": stories["done"]})
    real_commit = sink_module.commit
    real_rm = sink.fs.rm
    parts_committed: list[str] = []

    def crashing_commit(fs, path, data):
        if os.path.basename(path).startswith("part-"):
            if point == "first-part" or (point == "second-part" and parts_committed):
                raise Crash(f"power cut before {path}")
            parts_committed.append(path)
        return real_commit(fs, path, data)

    def crashing_rm(paths, *args, **kwargs):
        # "delete-half": half of the batch is gone when the power fails (a local delete is one
        # unlink per file, and S3's DeleteObjects is not atomic either: it deletes key by key).
        if point == "delete-half":
            real_rm(sorted(paths)[: len(paths) // 2], *args, **kwargs)
        raise Crash("power cut while deleting the staged files")

    monkeypatch.setattr(sink_module, "commit", crashing_commit)
    if point.startswith("delete"):
        monkeypatch.setattr(sink.fs, "rm", crashing_rm)
    with pytest.raises(Crash):
        sink.commit_story("live", current={f"f{i:03d}": f"live-fp-{i}" for i in stories["live"]})
    monkeypatch.undo()

    # What every reader sees now: each committed row at most once, never a staged row.
    visible = {**read_pyarrow(store), **read_hf(store, tmp_path), "ray": read_ray(store)}
    if point == "first-part":
        expected_now = done_rows
    elif point == "second-part":
        first = pq.read_table(parts_committed[0], filesystem=store.reader_fs())
        expected_now = sorted(done_rows + rows_of(first))
        assert 0 < first.num_rows < 8
    else:
        expected_now = all_rows
    for reader, rows in visible.items():
        assert rows == expected_now, reader
    # Nothing staged was lost (but the half that a crash while deleting them removed).
    assert len(staged_files(store)) == (4 if point == "delete-half" else 8)
    # A rerun counts every frame as stored, staged or committed: nothing would be rendered again.
    stored = sink_at(store, read_only=True).existing("live")
    assert sorted(stored) == [f"f{i:03d}" for i in range(8)]

    before = store.files()
    mark = store.s3.mark() if store.s3 is not None else 0
    # The next job: a new sink lists the story and completes the commit.
    recovering = sink_at(store, fresh=True, target_part_bytes=20_000)
    assert recovering.commit_story("live", current={f"f{i:03d}": f"live-fp-{i}" for i in stories["live"]}) == []
    recovery = store.s3.since(mark, store.root) if store.s3 is not None else []
    after = store.files()
    assert staged_files(store) == []
    visible = {**read_pyarrow(store), **read_hf(store, tmp_path)}
    if point == "second-part":
        # After any recovery the story is committed parts only, the same shape for Ray's reader;
        # one look is enough (a ray.data read costs seconds).
        visible["ray"] = read_ray(store)
    for reader, rows in visible.items():
        assert rows == all_rows, reader
    # Nothing that was committed is rewritten: the finished story's files and the parts committed
    # before the crash are the very same files.
    committed_before = {path for path in before if path.endswith(".parquet")}
    for path in committed_before:
        assert after.get(path) == before[path], path
    if point.startswith("delete"):
        assert {p for p in after if p.endswith(".parquet")} == committed_before
    if store.s3 is not None:
        # What the recovery asked of S3: one listing of the story (the layout marker answers for
        # data/), one PUT per part it committed, batch deletes of staged files only; no copy.
        ops = Counter(request.op for request in recovery)
        assert ops["LIST"] == 1 and ops["COPY"] == ops["DELETE"] == ops["MULTIPART"] == 0, ops
        written = _written_keys(store, recovery)
        assert not written & committed_before  # the same check, from the server's side
        new_parts = {p for p in after if p.endswith(".parquet")} - committed_before
        assert ops["PUT"] == len(new_parts) and (point.startswith("delete") or new_parts)
        assert written - new_parts == {p for p in before if p.endswith(".staged")}
        assert 1 <= ops["DELETE_MANY"] <= 2
    # And once complete, another commit is a no-op.
    mark = store.s3.mark() if store.s3 is not None else 0
    assert sink_at(store, fresh=True).commit_story("live") == [] and store.files() == after
    if store.s3 is not None:
        assert _written_keys(store, mark) == set()


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
def test_a_crash_while_rewriting_a_committed_part_is_repaired_by_the_next_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, options = store.root, store.storage_options
    sink = sink_at(store)
    for i in range(5):
        sink.write([rec("s", i)])
    sink.commit_story("s")
    [old_part] = sink.part_paths("s")
    sink.write([rec("s", 2, fingerprint="new-2")])
    current = {f"f{i:03d}": f"s-fp-{i}" for i in range(5)} | {"f002": "new-2"}

    def crashing_rm(path, *args, **kwargs):
        raise Crash("power cut before deleting the old part")

    monkeypatch.setattr(sink.fs, "rm", crashing_rm)
    with pytest.raises(Crash):
        sink.commit_story("s", current=current)
    monkeypatch.undo()
    # The documented window: the old part is still there next to its rewrite.
    assert len(sink_at(store).part_paths("s")) == 2
    seen = rows_of(open_dataset(root, options).to_table())
    assert ("s", "f002", "new-2") in seen and seen.count(("s", "f000", "s-fp-0")) == 2

    rewritten = [p for p in sink_at(store).part_paths("s") if p != old_part]
    sink_at(store).commit_story("s", current=current)
    # The redundant (old) part is deleted; the rewritten one is kept as it is.
    assert sink_at(store).part_paths("s") == rewritten
    expected = sorted([("s", f"f{i:03d}", f"s-fp-{i}") for i in (0, 1, 3, 4)] + [("s", "f002", "new-2")])
    assert rows_of(open_dataset(root, options).to_table()) == expected
    assert staged_files(store) == []


# -- reruns, replacements, readers ---------------------------------------------------------------------


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
def test_a_rerun_into_a_finished_dataset_writes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = sink_at(store, target_part_bytes=15_000)
    for story in ("a", "b", "c"):
        for i in range(6):
            sink.write([rec(story, i)])
        sink.commit_story(story)
    before = store.files()
    writes: list[str] = []
    real_commit = sink_module.commit
    monkeypatch.setattr(sink_module, "commit", lambda fs, path, data: (writes.append(path), real_commit(fs, path, data)))
    mark = store.s3.mark() if store.s3 is not None else 0
    rerun = sink_at(store, fresh=True, target_part_bytes=15_000)
    for story in ("a", "b", "c"):
        current = {f"f{i:03d}": f"{story}-fp-{i}" for i in range(6)}
        stored = rerun.existing(story)
        assert all(any(r.fingerprint == current[f] for r in rows) for f, rows in stored.items())
        assert rerun.commit_story(story, current=current) == []
        assert rerun.commit_story(story) == []
    assert writes == []
    assert store.files() == before
    if store.s3 is not None:
        # Nor did anything else write: no PUT, copy or delete reached the server; one LIST a story.
        assert _written_keys(store, mark) == set()
        assert store.s3.ops(mark, store.root)["LIST"] == 3


def test_readers_see_every_row_once_and_the_image_decodes(tmp_path: pathlib.Path) -> None:
    local = Store.local(str(tmp_path / "out"))
    root = local.root
    sink = ParquetFrameSink(root, target_part_bytes=12_000)
    sides = {"cat": 24, "dog": 40}
    for story, side in sides.items():
        for i in range(5):
            sink.write([rec(story, i, side=side)])
        sink.commit_story(story)
    # A story still being written: its staged frames are invisible to every reader.
    for i in range(3):
        sink.write([rec("wip", i)])
    assert len(staged_files(local)) == 3
    expected = expected_rows({"cat": range(5), "dog": range(5)})
    assert len(ParquetFrameSink(root).part_paths("cat")) > 1
    for reader, rows in {**read_pyarrow(local), **read_hf(local, tmp_path)}.items():
        assert rows == expected, reader

    table = datasets.load_dataset("parquet", data_files=dataset_files(root), split="train",
                                  cache_dir=str(tmp_path / "hf-images"))
    assert isinstance(table.features["image"], datasets.Image)
    for row in table:
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (sides[row["story_id"]],) * 2 == (row["width"], row["height"])
    # A filtered read of one story (the story_id column's statistics).
    one = open_dataset(root).to_table(filter=ds.field("story_id") == "dog")
    assert sorted(one["frame_id"].to_pylist()) == [f"f{i:03d}" for i in range(5)]
    image = Image.open(io.BytesIO(one["image"][0].as_py()["bytes"]))
    assert image.size == (40, 40)


def test_a_replaced_frame_is_seen_once_with_its_new_row(tmp_path: pathlib.Path) -> None:
    local = Store.local(str(tmp_path / "out"))
    root = local.root
    sink = ParquetFrameSink(root)
    for i in range(5):
        sink.write([rec("s", i)])
    sink.commit_story("s")
    rerun = ParquetFrameSink(root)
    rerun.write([rec("s", 3, fingerprint="s-new-3", side=20)])
    # Not visible before the commit; the old row still is.
    assert ("s", "f003", "s-fp-3") in rows_of(open_dataset(root).to_table())
    current = {f"f{i:03d}": f"s-fp-{i}" for i in range(5)} | {"f003": "s-new-3"}
    assert rerun.commit_story("s", current=current, remove={"f004"}) == ["f004"]
    expected = sorted([("s", f"f{i:03d}", f"s-fp-{i}") for i in range(3)] + [("s", "f003", "s-new-3")])
    for reader, rows in {**read_pyarrow(local), **read_hf(local, tmp_path)}.items():
        assert rows == expected, reader
    assert staged_files(local) == [] and len(ParquetFrameSink(root).part_paths("s")) == 1
    row = ParquetFrameSink(root).read_table("s").filter(ds.field("frame_id") == "f003").to_pylist()
    assert [r["width"] for r in row] == [20]


# -- listing cost ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_a_write_lists_a_constant_number_of_times_whatever_the_dataset_holds(
    where: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    s3: MotoS3 | None = request.getfixturevalue("s3") if where == "s3" else None

    def calls_of_a_job(others: int) -> Counter:
        """What a job writing 20 frames of one story asks of a dataset of ``others`` other stories:
        the listing calls of its filesystem (local, memory), or every request the S3 server saw."""
        if s3 is not None:
            root, options = s3.root(f"listing-{others}"), s3.storage_options
        elif where == "local":
            root, options = str(tmp_path / f"out-{others}"), None
        else:
            root, options = f"memory://compaction-{uuid.uuid4().hex}", None
        builder = ParquetFrameSink(root, storage_options=options)
        for s in range(others):
            for i in range(3):
                builder.write([rec(f"other-{s:03d}", i)])
            builder.commit_story(f"other-{s:03d}")
        # The job's sink has a filesystem of its own, as in a new process (no listing cache).
        sink = ParquetFrameSink(root, storage_options=s3.fresh_options() if s3 is not None else None)
        calls: Counter = Counter()
        mark = s3.mark() if s3 is not None else 0
        if s3 is None:
            for name in ("ls", "find", "glob", "walk", "listdir"):
                real = getattr(sink.fs, name)
                monkeypatch.setattr(sink.fs, name,
                                    lambda *a, _real=real, _name=name, **kw: (calls.update([_name]), _real(*a, **kw))[1])
        for i in range(20):
            sink.write([rec("mine", i)])
            if i == 9:
                sink.commit_story("mine")  # a mid-story commit lists nothing either
        sink.commit_story("mine")
        monkeypatch.undo()
        if s3 is not None:
            calls = s3.ops(mark, root)
        assert rows_of(open_dataset(root, options).to_table()).count(("mine", "f000", "mine-fp-0")) == 1
        if where == "memory":
            fsspec.filesystem("memory").rm(fsspec.core.url_to_fs(root)[1], recursive=True)
        return calls

    few, many = calls_of_a_job(2), calls_of_a_job(40)
    # On S3 the whole request profile (PUTs, HEADs, GETs, deletes) is the same, not only the LISTs.
    assert few == many
    if s3 is None:
        assert sum(many.values()) == 1  # the story's folder, once
    else:
        assert many["LIST"] == 1, many  # the story's folder, once (the layout marker answers for data/)
        assert many["PUT"] == 20 + 2 and many["DELETE_MANY"] == 2, many  # a PUT a frame and a part
