"""Compaction of staged frames into committed parts (``ParquetFrameSink.commit_story``): file counts,
crashes at every step, reruns, replacements, and what pyarrow, Hugging Face ``datasets`` and Ray
read; plus the listing cost of a write in a dataset of many stories."""

from __future__ import annotations

import io
import logging
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


def tree(root: str) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root`` (hidden ones included) -> (size, mtime_ns, inode)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


def data_files_of(root: str) -> list[str]:
    return sorted(p for p in tree(root) if p.startswith("data/"))


def staged_files(root: str) -> list[str]:
    return [p for p in data_files_of(root) if p.endswith(".staged")]


def rows_of(table) -> list[Row]:
    return sorted(zip(table["story_id"].to_pylist(), table["frame_id"].to_pylist(),
                      table["fingerprint"].to_pylist()))


def read_pyarrow(root: str) -> dict[str, list[Row]]:
    """What pyarrow sees: ``open_dataset``, a plain ``pyarrow.dataset`` and ``pq.read_table`` of ``data/``
    (default discovery: hive partitioning on, which the plain story folders do not trigger)."""
    plain = ds.dataset(os.path.join(root, "data"), format="parquet", partitioning="hive")
    return {"open_dataset": rows_of(open_dataset(root).to_table()), "pyarrow.dataset": rows_of(plain.to_table()),
            "pq.read_table": rows_of(pq.read_table(os.path.join(root, "data")))}


def read_hf(root: str, tmp_path: pathlib.Path) -> dict[str, list[Row]]:
    """What Hugging Face ``datasets`` sees, with a glob over data/ and with ``dataset_files``."""
    found = {}
    for label, files in (("datasets glob", os.path.join(root, "data", "**", "*.parquet")),
                         ("datasets files", dataset_files(root))):
        table = datasets.load_dataset("parquet", data_files=files, split="train",
                                      cache_dir=str(tmp_path / f"hf-{uuid.uuid4().hex}"))
        found[label] = sorted(zip(table["story_id"], table["frame_id"], table["fingerprint"]))
    return found


def read_ray(root: str) -> list[Row]:
    import ray

    rows = ray.data.read_parquet(os.path.join(root, "data"), columns=["story_id", "frame_id", "fingerprint"])
    return sorted((r["story_id"], r["frame_id"], r["fingerprint"]) for r in rows.take_all())


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Loopback only (tests/conftest.py), one CPU, no dashboard: one Ray for the whole module.
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def expected_rows(stories: dict[str, range]) -> list[Row]:
    return sorted((s, f"f{i:03d}", f"{s}-fp-{i}") for s, frames in stories.items() for i in frames)


# -- file counts -----------------------------------------------------------------------------------


def test_many_stories_compact_into_a_bounded_number_of_parts(tmp_path: pathlib.Path) -> None:
    root = str(tmp_path / "out")
    target = 100_000
    sink = ParquetFrameSink(root, target_part_bytes=target)
    staged_bytes: dict[str, int] = {}
    largest_staged: dict[str, int] = {}
    for s in range(30):
        story = f"story-{s:02d}"
        for i in range(10):
            sink.write([rec(story, i, side=48 if s % 3 == 0 else 8)])
        assert len(staged_files(root)) == 10  # the earlier stories are committed already
        staged_bytes[story] = sink.staged_bytes(story)
        largest_staged[story] = max(os.path.getsize(os.path.join(root, p)) for p in staged_files(root))
        assert staged_bytes[story] == sum(os.path.getsize(os.path.join(root, p)) for p in staged_files(root))
        assert sink.commit_story(story) == []
        assert sink.staged_bytes(story) == 0
    assert staged_files(root) == []

    per_story = Counter(p.split("/")[1] for p in data_files_of(root) if p.endswith(".parquet"))
    assert set(per_story) == {f"story-{s:02d}" for s in range(30)}
    for story, count in per_story.items():
        story_id = story.removeprefix("")
        assert count <= math.ceil(staged_bytes[story_id] / target) + 1
    assert max(per_story.values()) > 1, "some story must be split into several parts"
    assert min(per_story.values()) == 1
    # data/ holds the parts and the layout marker, nothing else.
    assert len(data_files_of(root)) == sum(per_story.values()) + 1
    for path in data_files_of(root):
        if path.endswith(".parquet"):
            story_id = path.split("/")[1].removeprefix("")
            assert os.path.getsize(os.path.join(root, path)) <= target + largest_staged[story_id]
    assert rows_of(open_dataset(root).to_table()) == expected_rows({f"story-{s:02d}": range(10) for s in range(30)})


# -- crashes ---------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _setup_two_stories(root: str) -> tuple[ParquetFrameSink, dict[str, range]]:
    """A finished story "done", and story "live" with 8 frames staged (about 3 parts' worth)."""
    sink = ParquetFrameSink(root, target_part_bytes=20_000)
    for i in range(4):
        sink.write([rec("done", i)])
    sink.commit_story("done")
    for i in range(8):
        sink.write([rec("live", i)])
    return sink, {"done": range(4), "live": range(8)}


@pytest.mark.parametrize("point", ["first-part", "second-part", "delete-staged"])
def test_a_crash_at_any_point_of_compaction(
    point: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, ray_local
) -> None:
    root = str(tmp_path / "out")
    sink, stories = _setup_two_stories(root)
    all_rows = expected_rows(stories)
    done_rows = expected_rows({"done": stories["done"]})
    real_commit = sink_module.commit
    parts_committed: list[str] = []

    def crashing_commit(fs, path, data):
        if os.path.basename(path).startswith("part-"):
            if point == "first-part" or (point == "second-part" and parts_committed):
                raise Crash(f"power cut before {path}")
            parts_committed.append(path)
        return real_commit(fs, path, data)

    monkeypatch.setattr(sink_module, "commit", crashing_commit)
    if point == "delete-staged":
        def crashing_rm(path, *args, **kwargs):
            raise Crash("power cut before deleting the staged files")
        monkeypatch.setattr(sink.fs, "rm", crashing_rm)
    with pytest.raises(Crash):
        sink.commit_story("live", current={f"f{i:03d}": f"live-fp-{i}" for i in stories["live"]})
    monkeypatch.undo()

    # What every reader sees now: each committed row at most once, never a staged row.
    visible = {**read_pyarrow(root), **read_hf(root, tmp_path), "ray": read_ray(root)}
    if point == "first-part":
        expected_now = done_rows
    elif point == "second-part":
        first = sink_module.pq.read_table(parts_committed[0])
        expected_now = sorted(done_rows + rows_of(first))
        assert 0 < first.num_rows < 8
    else:
        expected_now = all_rows
    for reader, rows in visible.items():
        assert rows == expected_now, reader
    assert len(staged_files(root)) == 8  # nothing staged was lost
    # A rerun counts every staged frame as stored: nothing would be rendered again.
    stored = ParquetFrameSink(root, read_only=True).existing("live")
    assert sorted(stored) == [f"f{i:03d}" for i in range(8)]

    before = tree(root)
    # The next job: a new sink lists the story and completes the commit.
    recovering = ParquetFrameSink(root, target_part_bytes=20_000)
    assert recovering.commit_story("live", current={f"f{i:03d}": f"live-fp-{i}" for i in stories["live"]}) == []
    after = tree(root)
    assert staged_files(root) == []
    visible = {**read_pyarrow(root), **read_hf(root, tmp_path), "ray": read_ray(root)}
    for reader, rows in visible.items():
        assert rows == all_rows, reader
    # Nothing that was committed is rewritten: the finished story's files and the parts committed
    # before the crash are the very same files.
    for path, stat in before.items():
        if path.endswith(".parquet"):
            assert after.get(path) == stat, path
    if point == "delete-staged":
        assert {p for p in after if p.endswith(".parquet")} == {p for p in before if p.endswith(".parquet")}
    # And once complete, another commit is a no-op.
    assert ParquetFrameSink(root).commit_story("live") == [] and tree(root) == after


def test_a_crash_while_rewriting_a_committed_part_is_repaired_by_the_next_commit(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "out")
    sink = ParquetFrameSink(root)
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
    assert len(ParquetFrameSink(root).part_paths("s")) == 2
    seen = rows_of(open_dataset(root).to_table())
    assert ("s", "f002", "new-2") in seen and seen.count(("s", "f000", "s-fp-0")) == 2

    rewritten = [p for p in ParquetFrameSink(root).part_paths("s") if p != old_part]
    ParquetFrameSink(root).commit_story("s", current=current)
    # The redundant (old) part is deleted; the rewritten one is kept as it is.
    assert ParquetFrameSink(root).part_paths("s") == rewritten
    expected = sorted([("s", f"f{i:03d}", f"s-fp-{i}") for i in (0, 1, 3, 4)] + [("s", "f002", "new-2")])
    assert rows_of(open_dataset(root).to_table()) == expected
    assert staged_files(root) == []


# -- reruns, replacements, readers ---------------------------------------------------------------------


def test_a_rerun_into_a_finished_dataset_writes_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "out")
    sink = ParquetFrameSink(root, target_part_bytes=15_000)
    for story in ("a", "b", "c"):
        for i in range(6):
            sink.write([rec(story, i)])
        sink.commit_story(story)
    before = tree(root)
    writes: list[str] = []
    real_commit = sink_module.commit
    monkeypatch.setattr(sink_module, "commit", lambda fs, path, data: (writes.append(path), real_commit(fs, path, data)))
    rerun = ParquetFrameSink(root, target_part_bytes=15_000)
    for story in ("a", "b", "c"):
        current = {f"f{i:03d}": f"{story}-fp-{i}" for i in range(6)}
        stored = rerun.existing(story)
        assert all(any(r.fingerprint == current[f] for r in rows) for f, rows in stored.items())
        assert rerun.commit_story(story, current=current) == []
        assert rerun.commit_story(story) == []
    assert writes == []
    assert tree(root) == before


def test_readers_see_every_row_once_and_the_image_decodes(tmp_path: pathlib.Path) -> None:
    root = str(tmp_path / "out")
    sink = ParquetFrameSink(root, target_part_bytes=12_000)
    sides = {"cat": 24, "dog": 40}
    for story, side in sides.items():
        for i in range(5):
            sink.write([rec(story, i, side=side)])
        sink.commit_story(story)
    # A story still being written: its staged frames are invisible to every reader.
    for i in range(3):
        sink.write([rec("wip", i)])
    assert len(staged_files(root)) == 3
    expected = expected_rows({"cat": range(5), "dog": range(5)})
    assert len(ParquetFrameSink(root).part_paths("cat")) > 1
    for reader, rows in {**read_pyarrow(root), **read_hf(root, tmp_path)}.items():
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
    root = str(tmp_path / "out")
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
    for reader, rows in {**read_pyarrow(root), **read_hf(root, tmp_path)}.items():
        assert rows == expected, reader
    assert staged_files(root) == [] and len(ParquetFrameSink(root).part_paths("s")) == 1
    row = ParquetFrameSink(root).read_table("s").filter(ds.field("frame_id") == "f003").to_pylist()
    assert [r["width"] for r in row] == [20]


# -- listing cost ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_write_lists_a_constant_number_of_times_whatever_the_dataset_holds(
    where: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def listings(others: int) -> Counter:
        root = str(tmp_path / f"out-{others}") if where == "local" else f"memory://compaction-{uuid.uuid4().hex}"
        builder = ParquetFrameSink(root)
        for s in range(others):
            for i in range(3):
                builder.write([rec(f"other-{s:03d}", i)])
            builder.commit_story(f"other-{s:03d}")
        sink = ParquetFrameSink(root)
        calls: Counter = Counter()
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
        assert rows_of(open_dataset(root).to_table()).count(("mine", "f000", "mine-fp-0")) == 1
        if where == "memory":
            fsspec.filesystem("memory").rm(fsspec.core.url_to_fs(root)[1], recursive=True)
        return calls

    few, many = listings(2), listings(40)
    assert few == many
    assert sum(many.values()) == 1  # the story's folder, once
