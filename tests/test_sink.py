"""The Parquet frame sink: round trips on local, memory and S3 filesystems (S3: a moto server on
127.0.0.1, ``tests/_s3.py``), atomicity, resume, manifest."""

from __future__ import annotations

import io
import json
import os
import pathlib
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _s3 import MotoS3
from PIL import Image

from storysync_dist.io import (
    FRAME_SCHEMA,
    FrameRecord,
    ParquetFrameSink,
    dataset_files,
    make_storyboard,
    open_dataset,
    png_bytes,
    read_manifest,
    write_bytes,
    write_manifest,
)
from storysync_dist.io import sink as sink_module
from storysync_dist.io import storage as storage_module
from storysync_dist.io.sink import LAYOUT_MARKER

STORY = "ginger-cat"
FOLDER = f"data/{STORY}"
MARKER = f"data/{LAYOUT_MARKER}"


def record(
    index: int, *, config: str = '{"rfh_gamma": 0.3}', story: str = STORY, size=(48, 32), fingerprint: str = ""
) -> FrameRecord:
    width, height = size
    image = Image.new("RGB", (width, height), (10 * index % 256, 120, 200))
    mask = Image.new("L", (width // 8, height // 8), 255) if index % 2 == 0 else None
    return FrameRecord(
        story_id=story,
        frame_id=f"frame-{index:04d}",
        frame_index=index,
        prompt=f"a ginger cat, scene {index}",
        seed=1000 + index,
        image_png=png_bytes(image),
        width=width,
        height=height,
        model="tiny-sdxl",
        method="storysync",
        config=config,
        mask_png=png_bytes(mask) if mask is not None else None,
        is_anchor=index < 2,
        render_seconds=0.25 * index,
        fingerprint=fingerprint or f"fp-{index}",
    )


@pytest.fixture(params=["local", "memory", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: pathlib.Path):
    if request.param == "local":
        yield str(tmp_path / "out")
    elif request.param == "s3":
        s3 = request.getfixturevalue("s3")
        mark = s3.mark()
        yield s3.root("sink")
        assert s3.since(mark), "nothing reached the moto server"
    else:
        name = f"memory://sink-test-{uuid.uuid4().hex}"
        yield name
        fs, path = fsspec.core.url_to_fs(name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def visible_files(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    # Hidden temporaries count too: nothing at all may be left behind by a failed write.
    return sorted(p[len(path.rstrip("/")) + 1 :] for p in fs.find(path))


def test_schema_and_hf_metadata() -> None:
    assert FRAME_SCHEMA.names == [
        "story_id", "frame_id", "frame_index", "prompt", "seed", "image", "width", "height",
        "model", "method", "config", "mask", "is_anchor", "render_seconds", "fingerprint",
    ]  # fmt: skip
    assert FRAME_SCHEMA.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert FRAME_SCHEMA.field("frame_index").type == pa.int32()
    assert FRAME_SCHEMA.field("seed").type == pa.int64()
    features = json.loads(FRAME_SCHEMA.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == FRAME_SCHEMA.names
    assert features["image"] == {"_type": "Image"}
    assert features["prompt"] == {"dtype": "string", "_type": "Value"}
    assert features["is_anchor"] == {"dtype": "bool", "_type": "Value"}
    # `datasets` only trusts the metadata when the field types match exactly, nullable included.
    assert all(field.nullable for field in FRAME_SCHEMA)


def test_round_trip(root: str) -> None:
    sink = ParquetFrameSink(root)
    first = sink.write([record(0)])
    second = sink.write([record(1), record(2)])
    assert first != second
    for url in (first, second):
        folder, name = url.rsplit("/", 2)[1:]
        assert folder == STORY
        assert name.startswith(".frame-0000") and name.endswith(".staged")
    assert second.rsplit("/", 1)[1].startswith(".frame-00001-")
    # Staged frames are stored (a rerun skips them) but not visible to readers yet.
    assert sorted(ParquetFrameSink(root).existing(STORY)) == ["frame-0000", "frame-0001", "frame-0002"]
    assert all(row.staged for row in ParquetFrameSink(root).stored(STORY))
    assert sink.read_table().num_rows == 0 and sink.part_paths(STORY) == []
    assert sink.commit_story(STORY) == []
    [part] = sink.part_paths(STORY)
    assert posixpath.basename(part).startswith("part-00000-") and part.endswith(".parquet")
    assert not any(row.staged for row in ParquetFrameSink(root).stored(STORY))

    table = sink.read_table()
    assert table.schema.equals(FRAME_SCHEMA, check_metadata=True)
    assert table.num_rows == 3
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        expected = record(index)
        assert row["frame_id"] == expected.frame_id and row["frame_index"] == index
        assert row["seed"] == expected.seed and row["prompt"] == expected.prompt
        assert row["config"] == expected.config and row["is_anchor"] == (index < 2)
        assert row["render_seconds"] == pytest.approx(0.25 * index)
        assert row["image"]["path"] == f"{STORY}/frame-{index:04d}.png"
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (row["width"], row["height"]) == (48, 32)
        if index % 2 == 0:
            assert Image.open(io.BytesIO(row["mask"])).size == (6, 4)
        else:
            assert row["mask"] is None

    # Each part file on its own carries the full schema, HF metadata included.
    with fsspec.open(sink.url(part), "rb") as handle:
        assert pq.read_schema(handle).equals(FRAME_SCHEMA, check_metadata=True)
    # Only the committed part (and the layout marker) is there: no temporaries, no staged files.
    assert visible_files(root) == [MARKER, f"{FOLDER}/{posixpath.basename(part)}"]
    # The same dataset through pyarrow.dataset (hive partition folder) and the file list.
    assert open_dataset(root).to_table().sort_by("frame_index").to_pylist() == rows
    assert [url.rsplit("/", 1)[1] for url in dataset_files(root)] == [posixpath.basename(part)]


def test_existing_and_writes_replace_older_rows(root: str) -> None:
    sink = ParquetFrameSink(root)
    assert sink.existing(STORY) == {}
    sink.write([record(0, fingerprint="a0"), record(1, fingerprint="a1")])
    sink.write([record(2, fingerprint="a2")])
    # Another story in the same dataset, whose id shares a prefix, is kept apart.
    sink.write([record(0, story=f"{STORY}-2", fingerprint="x")])
    sink.commit_story(STORY)
    sink.commit_story(f"{STORY}-2")
    [part_a] = [sink.url(p) for p in sink.part_paths(STORY)]

    # A fresh sink (a rerun) sees the same thing from the files alone.
    def stored(story: str = STORY) -> dict[str, list[tuple[str | None, str, bool]]]:
        found = ParquetFrameSink(root).existing(story)
        return {f: [(r.fingerprint, ParquetFrameSink(root).url(r.part), r.staged) for r in rows]
                for f, rows in found.items()}

    assert stored() == {"frame-0000": [("a0", part_a, False)], "frame-0001": [("a1", part_a, False)],
                        "frame-0002": [("a2", part_a, False)]}
    assert list(stored(f"{STORY}-2")) == ["frame-0000"]
    with pytest.raises(ValueError, match="occurs twice"):
        sink.write([record(4), record(4)])

    # Writing frame 1 again (a new render) stages it, then a second render replaces the first
    # staged row at once; the committed part is not touched by writes.
    staged_1 = sink.write([record(1, fingerprint="b1")])
    staged_2 = sink.write([record(1, fingerprint="c1")])
    assert staged_1 != staged_2
    now = stored()
    assert sorted(now["frame-0001"]) == [("a1", part_a, False), ("c1", staged_2, True)]
    assert ParquetFrameSink(root).read_table(STORY)["fingerprint"].to_pylist() == ["a0", "a1", "a2"]
    # commit_story: the newest row wins; the part that lost frame 1 is rewritten.
    assert sink.commit_story(STORY) == []
    now = stored()
    assert [fp for fp, _, _ in now["frame-0001"]] == ["c1"] and now["frame-0001"][0][1] != part_a
    table = ParquetFrameSink(root).read_table(STORY)
    assert table["frame_id"].to_pylist() == ["frame-0000", "frame-0001", "frame-0002"]
    assert table["fingerprint"].to_pylist() == ["a0", "c1", "a2"]
    assert not any(staged for rows in now.values() for _, _, staged in rows)

    # The same frame with the same fingerprint: committed again, the committed row is kept and
    # nothing is rewritten.
    parts = ParquetFrameSink(root).part_paths(STORY)
    sink.write([record(2, fingerprint="a2")])
    sink.commit_story(STORY, current={"frame-0002": "a2"})
    assert ParquetFrameSink(root).part_paths(STORY) == parts
    assert ParquetFrameSink(root).read_table(STORY).num_rows == 3

    # remove drops frames that left the story.
    assert sink.commit_story(STORY, remove={"frame-0002", "frame-0009"}) == ["frame-0002"]
    assert sorted(stored()) == ["frame-0000", "frame-0001"]
    assert list(stored(f"{STORY}-2")) == ["frame-0000"]


def test_a_damaged_part_is_set_aside(root: str) -> None:
    sink = ParquetFrameSink(root)
    sink.write([record(0, fingerprint="a0")])
    fs, path = fsspec.core.url_to_fs(root)
    sink.commit_story(STORY)
    base = path.rstrip("/")
    bad = f"{base}/{FOLDER}/part-00001-00000000deadbeef.parquet"
    fs.pipe_file(bad, b"PAR1 garbage")
    bad_staged = f"{base}/{FOLDER}/.frame-00002-00000000deadbeef.staged"
    fs.pipe_file(bad_staged, b"not parquet at all")
    looking = ParquetFrameSink(root, read_only=True)
    assert list(looking.existing(STORY)) == ["frame-0000"]
    assert len(looking.damaged) == 2 and "part-00001" in " ".join(looking.damaged)
    assert fs.exists(bad) and fs.exists(bad_staged)  # a read-only look moves nothing
    writing = ParquetFrameSink(root)
    assert list(writing.existing(STORY)) == ["frame-0000"]
    assert not fs.exists(bad) and fs.exists(f"{base}/quarantine/{STORY}/part-00001-00000000deadbeef.parquet")
    assert not fs.exists(bad_staged)
    assert fs.exists(f"{base}/quarantine/{STORY}/.frame-00002-00000000deadbeef.staged")
    assert len(writing.damaged) == 2
    assert writing.read_table().num_rows == 1
    assert open_dataset(root).count_rows() == 1


def test_old_flat_layout_is_moved_into_story_folders(root: str) -> None:
    # A dataset of the flat layout: data/part-<story>-<index>-<hash>.parquet, several stories.
    fs, path = fsspec.core.url_to_fs(root)
    base = path.rstrip("/")
    builder = ParquetFrameSink(root)
    fs.makedirs(f"{base}/data", exist_ok=True)
    for story in (STORY, "fox"):
        for index in range(2):
            rec = record(index, story=story)
            fs.pipe_file(f"{base}/data/part-{story}-{index:05d}-{index:016x}.parquet", builder.build_part([rec]))
    # Readers see the flat parts where they are.
    assert ParquetFrameSink(root, read_only=True).read_table().num_rows == 4
    assert len(dataset_files(root)) == 4
    assert sorted(ParquetFrameSink(root, read_only=True).existing(STORY)) == ["frame-0000", "frame-0001"]
    # A writing sink moves the story's own flat parts into its folder, and only those.
    writing = ParquetFrameSink(root)
    assert sorted(writing.existing(STORY)) == ["frame-0000", "frame-0001"]
    files = visible_files(root)
    assert f"{FOLDER}/part-00000-{0:016x}.parquet" in files and f"{FOLDER}/part-00001-{1:016x}.parquet" in files
    assert "data/part-fox-00000-0000000000000000.parquet" in files
    assert not any(f.startswith(f"data/part-{STORY}-") for f in files)
    writing.write([record(2)])
    writing.commit_story(STORY)
    assert MARKER not in visible_files(root)  # the fox story is still flat
    assert ParquetFrameSink(root).read_table(STORY).num_rows == 3
    assert open_dataset(root).count_rows() == 5
    other = ParquetFrameSink(root)
    assert sorted(other.existing("fox")) == ["frame-0000", "frame-0001"]
    other.write([record(2, story="fox")])
    other.commit_story("fox")
    assert MARKER in visible_files(root)
    assert not any(f.startswith("data/part-") for f in visible_files(root))
    assert open_dataset(root).count_rows() == 6


def test_invalid_records_are_refused(root: str) -> None:
    sink = ParquetFrameSink(root)
    bad = record(0)
    bad.frame_id = "../escape"
    with pytest.raises(ValueError, match="does not match"):
        sink.write([bad])
    with pytest.raises(ValueError, match="one story"):
        sink.write([record(0), record(1, story="other")])
    with pytest.raises(ValueError):
        sink.write([])
    assert visible_files(root) == []


def test_failure_while_building_leaves_nothing(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = ParquetFrameSink(root)
    sink.write([record(0)])
    before = visible_files(root)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sink.write([record(1)])
    monkeypatch.undo()
    assert visible_files(root) == before
    assert list(ParquetFrameSink(root).existing(STORY)) == ["frame-0000"]


def test_failure_while_committing_local_leaves_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "out")
    sink = ParquetFrameSink(root)

    def broken_replace(src, dst):
        assert os.path.basename(src).startswith(".")  # the temporary is hidden from dataset discovery
        assert os.path.getsize(src) > 0
        raise OSError("rename failed")

    monkeypatch.setattr(storage_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        sink.write([record(0)])
    monkeypatch.undo()
    # Neither the part nor the temporary file is left behind.
    assert [p for p in (tmp_path / "out" / "data").rglob("*") if p.is_file()] == []
    assert sink.existing(STORY) == {}
    assert sink.read_table().num_rows == 0


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_remote_commit_is_a_single_put(
    where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an object store a file is committed by one PUT of its final name: no temporary, no rename
    (a copy and a delete on S3), no multipart upload; superseded files go in one batch delete; a
    PUT that fails leaves nothing. Memory: spies on the filesystem; S3: the requests the server saw."""
    memory_fs = fsspec.filesystem("memory")
    s3: MotoS3 | None = request.getfixturevalue("s3") if where == "s3" else None
    root = s3.root("sink-put") if s3 is not None else f"memory://sink-pipe-{uuid.uuid4().hex}"
    spied: list[tuple[str, list[str]]] = []
    mark = s3.mark() if s3 is not None else 0
    if s3 is None:
        original_pipe, original_rm = type(memory_fs).pipe_file, type(memory_fs).rm

        def spy_pipe(self, path, value, *args, **kwargs):
            spied.append(("PUT", [path]))
            return original_pipe(self, path, value, *args, **kwargs)

        def spy_rm(self, path, *args, **kwargs):
            spied.append(("DELETE_MANY", [path] if isinstance(path, str) else list(path)))
            return original_rm(self, path, *args, **kwargs)

        monkeypatch.setattr(type(memory_fs), "pipe_file", spy_pipe)
        monkeypatch.setattr(type(memory_fs), "rm", spy_rm)

    def writes() -> list[tuple[str, list[str]]]:
        """(PUT or DELETE_MANY, the names) of every write since the last call."""
        nonlocal mark
        if s3 is None:
            found = [(op, [posixpath.basename(p) for p in paths]) for op, paths in spied]
            spied.clear()
            return found
        requests, mark = s3.since(mark, root), s3.mark()
        assert {r.op for r in requests} <= {"PUT", "DELETE_MANY", "GET", "HEAD", "LIST"}, requests
        return [(r.op, [posixpath.basename(k) for k in (r.keys or [r.key])])
                for r in requests if r.op in ("PUT", "DELETE_MANY")]

    sink = ParquetFrameSink(root)
    first = sink.write([record(0)]).rsplit("/", 1)[1]
    # One PUT for the staged frame (and one for the layout marker of a new dataset).
    assert writes() == [("PUT", [first]), ("PUT", [LAYOUT_MARKER])]
    second = sink.write([record(2)]).rsplit("/", 1)[1]
    assert writes() == [("PUT", [second])]
    sink.commit_story(STORY)
    [(op, [part]), deleted] = writes()
    assert op == "PUT" and part.startswith("part-00000-")
    assert deleted == ("DELETE_MANY", sorted([first, second]))  # both staged files, one request

    if s3 is None:
        def failing_put(self, path, value, *args, **kwargs):
            raise ConnectionError("PUT failed")

        monkeypatch.setattr(type(memory_fs), "pipe_file", failing_put)
        with pytest.raises(ConnectionError):
            sink.write([record(1)])
        monkeypatch.undo()
    else:
        with s3.refusing(lambda r: r.op == "PUT"), pytest.raises(PermissionError):
            sink.write([record(1)])
    assert visible_files(root) == [MARKER, f"{FOLDER}/{part}"]
    assert sink.read_table().num_rows == 2
    if s3 is None:
        memory_fs.rm(memory_fs._strip_protocol(root), recursive=True)


def test_add_and_flush_batch_rows(root: str) -> None:
    sink = ParquetFrameSink(root, rows_per_part=2)
    assert sink.add(record(0)) is None
    first = sink.add(record(1))
    assert first is not None
    assert sink.add(record(2)) is None
    last = sink.flush()
    assert last is not None and sink.flush() is None
    assert len([r for r in sink.stored(STORY) if r.staged]) == 3
    assert len({r.part for r in sink.stored(STORY)}) == 2
    sink.commit_story(STORY)
    assert len(sink.part_paths(STORY)) == 1
    assert sink.read_table().num_rows == 3
    # Frame 2 written again in a batch with frame 3: the older staged row of frame 2 goes.
    sink.add(record(2, fingerprint="again"))
    sink.add(record(3))
    assert sorted((r.frame_id, r.fingerprint) for r in sink.stored(STORY) if r.staged) == [
        ("frame-0002", "again"), ("frame-0003", "fp-3")]
    sink.add(record(3, fingerprint="b3"))
    sink.add(record(4))
    # A staged file of frames 2 and 3 lost frame 3 to the new write: frame 2 is staged anew.
    assert sorted((r.frame_id, r.fingerprint) for r in sink.stored(STORY) if r.staged) == [
        ("frame-0002", "again"), ("frame-0003", "b3"), ("frame-0004", "fp-4")]
    sink.commit_story(STORY)
    assert sink.read_table()["fingerprint"].to_pylist() == ["fp-0", "fp-1", "again", "b3", "fp-4"]


def test_manifest_and_bytes(root: str) -> None:
    assert read_manifest(root) is None
    manifest = {"story_id": STORY, "frames": 3, "anchors": ["frame-0000"], "note": "ünïcode"}
    write_manifest(root, manifest)
    assert read_manifest(root) == manifest
    manifest["frames"] = 4
    write_manifest(root, manifest)
    assert read_manifest(root)["frames"] == 4

    board = make_storyboard(
        [
            (f"#{i} frame", Image.new("RGB", (40, 30), (i * 60, 0, 0)), Image.new("L", (5, 4), 255))
            for i in range(3)
        ]
    )
    url = write_bytes(root, "storyboard.png", png_bytes(board))
    with fsspec.open(url, "rb") as handle:
        assert Image.open(handle).size == board.size
    assert sorted(visible_files(root)) == ["manifest.json", "storyboard.png"]
    with pytest.raises(ValueError, match="unsafe"):
        write_bytes(root, "../evil.png", b"x")


def test_other_filesystems_commit_through_a_hidden_temporary_and_a_rename(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem that is neither local nor an object store (DirFileSystem stands in for SFTP or
    # HDFS here): its pipe_file streams into the name it is given, so the final name must only
    # appear through a rename.
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    fs = DirFileSystem(path=str(tmp_path), fs=LocalFileSystem())
    assert not storage_module.is_local(fs) and not storage_module.is_object_store(fs)
    piped, moved = [], []
    original_pipe, original_mv = type(fs).pipe_file, type(fs).mv
    monkeypatch.setattr(type(fs), "pipe_file", lambda self, p, v, **kw: (piped.append(p), original_pipe(self, p, v, **kw)))
    monkeypatch.setattr(type(fs), "mv", lambda self, a, b, **kw: (moved.append((a, b)), original_mv(self, a, b, **kw)))
    storage_module.commit(fs, "data/part.parquet", b"complete")
    assert len(piped) == 1 and piped[0].startswith("data/.part.parquet.") and piped[0].endswith(".tmp")
    assert moved == [(piped[0], "data/part.parquet")]
    assert (tmp_path / "data" / "part.parquet").read_bytes() == b"complete"
    assert os.listdir(tmp_path / "data") == ["part.parquet"]


def test_the_index_carries_each_rows_config(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = ParquetFrameSink(root)
    sink.write([record(0, config='{"a": 1}'), record(1, config='{"a": 2}')])
    sink.write([record(2, config='{"a": 1}')])
    sink.commit_story(STORY)
    # Reached from the writer's own index, from a fresh sink reading the files, and after a part
    # was rewritten (frame 0's old part kept frame 1).
    assert {r.frame_id: r.config for r in sink.stored(STORY)} == {
        "frame-0000": '{"a": 1}', "frame-0001": '{"a": 2}', "frame-0002": '{"a": 1}'}
    sink.write([record(0, config='{"a": 3}', fingerprint="new")])
    sink.commit_story(STORY)
    expected = {"frame-0000": '{"a": 3}', "frame-0001": '{"a": 2}', "frame-0002": '{"a": 1}'}
    assert {r.frame_id: r.config for r in sink.stored(STORY)} == expected

    # A fresh sink learns it from the index columns only: no image is read.
    columns_read: list[list[str] | None] = []
    real_read = pq.ParquetFile.read

    def spy(self, columns=None, **kwargs):
        columns_read.append(columns)
        return real_read(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    assert {r.frame_id: r.config for r in ParquetFrameSink(root).stored(STORY)} == expected
    assert columns_read and all(c is not None and "image" not in c and "config" in c for c in columns_read)


def test_writing_a_long_story_frame_by_frame_reads_each_staged_index_once(tmp_path: pathlib.Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: each write used to look through every staged file of the story for older rows of
    its frames, so the writes between two commits were quadratic. Frames written once look at
    nothing; a frame written again still replaces its older staged row."""
    sink = ParquetFrameSink(str(tmp_path / "out"))
    looked_at: list[str] = []
    index_of = ParquetFrameSink._index_of

    def counting(self: ParquetFrameSink, path: str) -> list:
        looked_at.append(path)
        return index_of(self, path)

    monkeypatch.setattr(ParquetFrameSink, "_index_of", counting)
    frames = 300
    for i in range(frames):
        sink.write([record(i, size=(8, 8))])
    assert len(looked_at) <= 2, len(looked_at)  # the first write looks at the (empty) folder only
    again = sink.write([record(7, size=(8, 8), fingerprint="fp-new")])
    stored = sink.existing(STORY)
    assert len(stored) == frames and [row.fingerprint for row in stored["frame-0007"]] == ["fp-new"]
    assert stored["frame-0007"][0].part.endswith(again.rsplit("/", 1)[-1])
    # After the rewrite the known ids are rebuilt: the next new frame looks at nothing again.
    looked_at.clear()
    sink.write([record(frames, size=(8, 8))])
    assert looked_at == []


def test_the_rows_kept_for_the_next_compaction_are_bounded(tmp_path: pathlib.Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: the driver kept up to a part's bytes (128 MiB) of staged rows in memory, and grew
    by that much over a long story. It keeps at most ROW_CACHE_BYTES; the rest is read back at the
    commit, with the same result."""
    monkeypatch.setattr(sink_module, "ROW_CACHE_BYTES", 3 * 2**10)
    sink = ParquetFrameSink(str(tmp_path / "out"))
    records = [record(i, size=(24, 16)) for i in range(12)]
    for rec in records:
        sink.write([rec])
        assert sink._row_cache_bytes <= 3 * 2**10
    assert 0 < len(sink._row_cache) < len(records)  # some kept, most read back
    sink.commit_story(STORY, current={r.frame_id: r.fingerprint for r in records})
    table = ParquetFrameSink(str(tmp_path / "out"), read_only=True).read_table(STORY)
    assert table.column("frame_id").to_pylist() == [r.frame_id for r in records]
    assert [row["bytes"] for row in table.column("image").to_pylist()] == [r.image_png for r in records]
