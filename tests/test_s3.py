"""A render into S3 and back, and the sink's S3-only paths, against a real moto S3 server on
127.0.0.1 (``tests/_s3.py``: s3fs speaks HTTP through aiobotocore, which moto's in-process
``mock_aws`` does not intercept, so the server is needed). S3 has no rename: a file set aside or
moved is a copy and then a delete, and a crash between the two leaves both; the next job finishes
the move. What a step asks of S3 is read from the server's request log."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import s3fs
from _s3 import BUCKET, MotoS3, key_of
from PIL import Image

from storysync_dist.api import JobResult, RenderOptions, render_story
from storysync_dist.io import png_bytes
from storysync_dist.io.lease import Lease, LeaseHeldError
from storysync_dist.io.sink import (
    FRAME_SCHEMA,
    LAYOUT_MARKER,
    FrameRecord,
    ParquetFrameSink,
    create_exclusive,
    dataset_files,
    open_dataset,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "story.yaml"
PREFIX = "stories/cat"
OUT = f"s3://{BUCKET}/{PREFIX}"


def options(s3: MotoS3) -> RenderOptions:
    return RenderOptions(
        model="tiny-sdxl", out=OUT, steps=3, height=64, width=64, only=["beach", "garden"],
        storage_options=s3.storage_options, progress=False,
    )


@pytest.fixture(scope="module")
def first_run(s3: MotoS3) -> JobResult:
    return render_story(str(EXAMPLE), options(s3))


def frame(story: str, index: int) -> FrameRecord:
    image = png_bytes(Image.new("RGB", (8, 8), (index, 0, 0)))
    return FrameRecord(story_id=story, frame_id=f"f{index}", frame_index=index, prompt="p", seed=index,
                       image_png=image, width=8, height=8, model="m", method="storysync", config="{}",
                       fingerprint=f"fp-{index}")


def test_render_writes_the_dataset_to_s3(s3: MotoS3, first_run: JobResult) -> None:
    assert sorted(first_run.rendered) == ["beach", "garden"] and first_run.skipped == []
    assert first_run.storyboard == f"{OUT}/storyboard.png"
    assert first_run.manifest == f"{OUT}/manifest.json"

    table = ParquetFrameSink(OUT, storage_options=s3.storage_options).read_table()
    assert table.schema.equals(FRAME_SCHEMA)
    rows = table.to_pylist()
    assert [(r["story_id"], r["frame_id"], r["frame_index"]) for r in rows] == [
        ("ginger-cat", "beach", 0), ("ginger-cat", "garden", 2)
    ]
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (64, 64)
        assert row["image"]["path"] == f"ginger-cat/{row['frame_id']}.png"
        assert Image.open(io.BytesIO(row["mask"])).size == (64, 64)
    assert [r["is_anchor"] for r in rows] == [True, False]


def test_objects_in_the_bucket(s3: MotoS3, first_run: JobResult) -> None:
    keys = sorted(f"{PREFIX}/{key}" for key in s3.objects(OUT))
    data = [key for key in keys if key.startswith(f"{PREFIX}/data/")]
    # The story's frames compacted into one part in its folder; no staged or temporary objects left.
    assert len(data) == 2 and f"{PREFIX}/data/{LAYOUT_MARKER}" in data
    [part] = [key for key in data if not key.endswith(LAYOUT_MARKER)]
    assert part.startswith(f"{PREFIX}/data/ginger-cat/part-00000-") and part.endswith(".parquet")
    assert set(keys) - set(data) == {
        f"{PREFIX}/storyboard.png", f"{PREFIX}/storyboards/ginger-cat.png", f"{PREFIX}/manifest.json",
        f"{PREFIX}/stories/ginger-cat.json", f"{PREFIX}/README.md"
    }
    client = s3.client()
    board = Image.open(io.BytesIO(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/storyboard.png")["Body"].read()))
    assert board.format == "PNG" and board.width >= 64
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.json")["Body"].read())
    story = manifest["stories"]["ginger-cat"]
    assert [f["id"] for f in story["frames"] if f["done"]] == ["beach", "garden"]
    assert story["complete"] is False
    assert story["storyboard"] == "storyboards/ginger-cat.png"


def test_pyarrow_reads_it_through_s3fs(s3: MotoS3, first_run: JobResult) -> None:
    fs = s3.reader_fs()
    table = pq.read_table(f"{BUCKET}/{PREFIX}/data", filesystem=fs, schema=FRAME_SCHEMA)
    assert table.num_rows == 2
    hive = pyarrow.dataset.dataset(f"{BUCKET}/{PREFIX}/data", filesystem=fs, format="parquet", partitioning=None)
    assert sorted(hive.to_table()["frame_id"].to_pylist()) == ["beach", "garden"]
    assert open_dataset(OUT, s3.storage_options).to_table().num_rows == 2
    assert sorted(table["frame_id"].to_pylist()) == ["beach", "garden"]
    # The Hugging Face feature metadata travels with the files.
    assert b"huggingface" in table.schema.metadata
    for image in table["image"].to_pylist():
        assert Image.open(io.BytesIO(image["bytes"])).size == (64, 64)


def test_hugging_face_datasets_reads_it_from_s3(
    s3: MotoS3, first_run: JobResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite runs with HF_HUB_OFFLINE=1, and datasets then refuses every remote URL, S3 included;
    # the only remote here is the loopback moto server ("parquet" is a builder shipped with datasets).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset(
        "parquet", data_files=f"{OUT}/data/**/*.parquet", split="train",
        storage_options=s3.storage_options, cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.num_rows == 2 and isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (64, 64)
    files = dataset_files(OUT, s3.storage_options)
    assert len(files) == 1 and files[0].startswith(f"{OUT}/data/ginger-cat/part-")
    listed = datasets.load_dataset(
        "parquet", data_files=files, split="train",
        storage_options=s3.storage_options, cache_dir=str(tmp_path / "hf-cache-2"),
    )
    assert sorted(listed["frame_id"]) == ["beach", "garden"]


def test_rerun_renders_nothing(s3: MotoS3, first_run: JobResult) -> None:
    again = render_story(str(EXAMPLE), options(s3))
    assert again.rendered == []
    assert sorted(again.skipped) == ["beach", "garden"]
    table = ParquetFrameSink(OUT, storage_options=s3.storage_options).read_table()
    assert table.num_rows == 2


def test_leases_are_exclusive_on_s3(s3: MotoS3) -> None:
    # A conditional PUT (If-None-Match: *): the server refuses the second create of the same key.
    fs = s3fs.S3FileSystem(**s3.fresh_options())
    path = f"{BUCKET}/leases/one.lock"
    mark = s3.mark()
    assert create_exclusive(fs, path, b"first")
    assert not create_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"
    puts = [(r.conditional, r.status) for r in s3.since(mark, path) if r.op == "PUT"]
    assert puts == [(True, 200), (True, 412)]
    lease = Lease(f"s3://{BUCKET}/leases", "story-x", storage_options=s3.storage_options)
    lease.acquire()
    with pytest.raises(LeaseHeldError):
        Lease(f"s3://{BUCKET}/leases", "story-x", storage_options=s3.storage_options).acquire()
    lease.release()


def test_a_bucket_that_does_not_exist_is_a_user_error(s3: MotoS3, capsys: pytest.CaptureFixture) -> None:
    import storysync_dist.cli as cli

    out = "s3://no-such-bucket/stories/cat"
    # The CLI has no --storage-options flag: the moto fixture points S3 clients at the server through
    # the environment (AWS_ENDPOINT_URL_S3).
    mark = s3.mark()
    code = cli.main(["render", str(EXAMPLE), "--out", out, "--model", "tiny-sdxl", "--steps", "2",
                     "--height", "64", "--width", "64", "--no-progress", "--only", "beach"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"storysync: error: --out {out}: cannot write there")
    assert s3.since(mark)  # it asked the moto server
    assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == [BUCKET]


# -- what S3 does differently: no rename, listings cached by s3fs -------------------------------------


def _refusing_deletes_of(s3: MotoS3, keys: set[str]):
    """The server refuses to delete ``keys`` (403): a crash between a copy and its delete, as S3
    has no rename."""
    return s3.refusing(lambda r: r.op in ("DELETE", "DELETE_MANY") and bool({r.key, *r.keys} & keys))


def test_a_quarantine_cut_between_its_copy_and_its_delete_is_finished_by_the_next_job(s3: MotoS3) -> None:
    root = s3.root("quarantine")
    sink = ParquetFrameSink(root, storage_options=s3.storage_options)
    sink.write([frame("s", 0)])
    sink.commit_story("s")
    base = key_of(root)
    bad, aside = f"{base}/data/s/part-00001-00000000deadbeef.parquet", f"{base}/quarantine/s/part-00001-00000000deadbeef.parquet"
    s3.client().put_object(Bucket=BUCKET, Key=bad, Body=b"PAR1 garbage")

    mark = s3.mark()
    with _refusing_deletes_of(s3, {bad}), pytest.raises(PermissionError):
        ParquetFrameSink(root, storage_options=s3.fresh_options()).existing("s")
    copies = [r for r in s3.since(mark, root) if r.op == "COPY"]
    assert [(r.source, r.key, r.status) for r in copies] == [(bad, aside, 200)]
    objects = s3.objects()
    assert objects[bad][:2] == objects[aside][:2]  # both there, the same bytes (size, ETag)

    # The next job sets it aside again (the copy overwrites the one already there) and reads on.
    again = ParquetFrameSink(root, storage_options=s3.fresh_options())
    assert list(again.existing("s")) == ["f0"]
    assert len(again.damaged) == 1 and again.damaged[0].startswith(f"s3://{BUCKET}/{bad} -> s3://{BUCKET}/{aside}")
    objects = s3.objects()
    assert bad not in objects and objects[aside][0] == len(b"PAR1 garbage")
    assert open_dataset(root, s3.storage_options).count_rows() == 1


def test_a_move_into_the_story_folder_cut_between_copy_and_delete_is_finished_by_the_next_job(s3: MotoS3) -> None:
    # A dataset of the old flat layout: a writing sink moves the story's parts into its folder.
    root = s3.root("flat")
    base = key_of(root)
    builder = ParquetFrameSink(root, storage_options=s3.storage_options)
    flat = [f"{base}/data/part-s-{index:05d}-{index:016x}.parquet" for index in range(2)]
    for index, key in enumerate(flat):
        s3.client().put_object(Bucket=BUCKET, Key=key, Body=builder.build_part([frame("s", index)]))
    moved = f"{base}/data/s/part-00000-{0:016x}.parquet"

    with _refusing_deletes_of(s3, set(flat)), pytest.raises(PermissionError):
        ParquetFrameSink(root, storage_options=s3.fresh_options()).existing("s")
    # The documented moment of a move on S3: the copied part is in both places, and a reader that
    # globs data/ sees its rows twice.
    assert {flat[0], flat[1], moved} <= set(s3.objects())
    rows = open_dataset(root, s3.storage_options).to_table()["frame_id"].to_pylist()
    assert sorted(rows) == ["f0", "f0", "f1"]

    # The next writing job moves what is left (the copy again, then the deletes) and sees each frame once.
    again = ParquetFrameSink(root, storage_options=s3.fresh_options())
    assert sorted((f, len(rows)) for f, rows in again.existing("s").items()) == [("f0", 1), ("f1", 1)]
    again.write([frame("s", 2)])
    again.commit_story("s")
    data = sorted(key for key in s3.objects() if key.startswith(f"{base}/data/"))
    assert not set(flat) & set(data) and f"{base}/data/{LAYOUT_MARKER}" in data
    assert sorted(open_dataset(root, s3.storage_options).to_table()["frame_id"].to_pylist()) == ["f0", "f1", "f2"]


def test_a_reader_sees_the_parts_another_process_committed_since_it_last_looked(s3: MotoS3) -> None:
    # s3fs caches listings per filesystem instance, and a recursive listing keeps the cached listing
    # of a story folder: a long-lived reader (a notebook) must still find a part committed since.
    root = s3.root("reader")
    writer = ParquetFrameSink(root, storage_options=s3.fresh_options())
    for index in range(2):
        writer.write([frame("s", index)])
    writer.commit_story("s")
    assert open_dataset(root, s3.storage_options).count_rows() == 2
    assert ParquetFrameSink(root, storage_options=s3.storage_options, read_only=True).read_table().num_rows == 2

    other_process = ParquetFrameSink(root, storage_options=s3.fresh_options())
    other_process.write([frame("s", 5)])
    other_process.commit_story("s")
    assert open_dataset(root, s3.storage_options).count_rows() == 3
    assert ParquetFrameSink(root, storage_options=s3.storage_options, read_only=True).read_table().num_rows == 3
    assert len(dataset_files(root, s3.storage_options)) == 2
