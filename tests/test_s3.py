"""A render into S3 and back, against a real moto S3 server on 127.0.0.1 (s3fs speaks HTTP through
aiobotocore, which moto's in-process ``mock_aws`` does not intercept, so the server is needed)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import datasets
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

from storysync_dist.api import JobResult, RenderOptions, render_story
from storysync_dist.io.lease import Lease, LeaseHeldError
from storysync_dist.io.sink import (
    FRAME_SCHEMA,
    LAYOUT_MARKER,
    ParquetFrameSink,
    create_exclusive,
    dataset_files,
    open_dataset,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "story.yaml"
BUCKET = "bucket"
PREFIX = "stories/cat"
OUT = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port, with the bucket created; yields its URL."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        # Fake credentials, and nothing from the user's ~/.aws or an instance-metadata lookup.
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"), "AWS_CONFIG_FILE": str(home / "config"),
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            yield url
        finally:
            server.stop()


def storage_options(url: str) -> dict:
    return {"client_kwargs": {"endpoint_url": url}, "key": "testing", "secret": "testing"}


def options(url: str) -> RenderOptions:
    return RenderOptions(
        model="tiny-sdxl", out=OUT, steps=3, height=64, width=64, only=["beach", "garden"],
        storage_options=storage_options(url), progress=False,
    )


@pytest.fixture(scope="module")
def first_run(endpoint: str) -> JobResult:
    return render_story(str(EXAMPLE), options(endpoint))


def test_render_writes_the_dataset_to_s3(endpoint: str, first_run: JobResult) -> None:
    assert sorted(first_run.rendered) == ["beach", "garden"] and first_run.skipped == []
    assert first_run.storyboard == f"{OUT}/storyboard.png"
    assert first_run.manifest == f"{OUT}/manifest.json"

    table = ParquetFrameSink(OUT, storage_options=storage_options(endpoint)).read_table()
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


def test_objects_in_the_bucket(endpoint: str, first_run: JobResult) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = sorted(obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    data = [key for key in keys if key.startswith(f"{PREFIX}/data/")]
    # The story's frames compacted into one part in its folder; no staged or temporary objects left.
    assert len(data) == 2 and f"{PREFIX}/data/{LAYOUT_MARKER}" in data
    [part] = [key for key in data if not key.endswith(LAYOUT_MARKER)]
    assert part.startswith(f"{PREFIX}/data/ginger-cat/part-00000-") and part.endswith(".parquet")
    assert set(keys) - set(data) == {
        f"{PREFIX}/storyboard.png", f"{PREFIX}/storyboards/ginger-cat.png", f"{PREFIX}/manifest.json",
        f"{PREFIX}/stories/ginger-cat.json", f"{PREFIX}/README.md"
    }
    board = Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/storyboard.png")["Body"].read()))
    assert board.format == "PNG" and board.width >= 64
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.json")["Body"].read())
    story = manifest["stories"]["ginger-cat"]
    assert [f["id"] for f in story["frames"] if f["done"]] == ["beach", "garden"]
    assert story["complete"] is False
    assert story["storyboard"] == "storyboards/ginger-cat.png"


def test_pyarrow_reads_it_through_s3fs(endpoint: str, first_run: JobResult) -> None:
    fs = s3fs.S3FileSystem(**storage_options(endpoint), skip_instance_cache=True)
    table = pq.read_table(f"{BUCKET}/{PREFIX}/data", filesystem=fs, schema=FRAME_SCHEMA)
    assert table.num_rows == 2
    hive = pyarrow.dataset.dataset(f"{BUCKET}/{PREFIX}/data", filesystem=fs, format="parquet", partitioning=None)
    assert sorted(hive.to_table()["frame_id"].to_pylist()) == ["beach", "garden"]
    assert open_dataset(OUT, storage_options(endpoint)).to_table().num_rows == 2
    assert sorted(table["frame_id"].to_pylist()) == ["beach", "garden"]
    # The Hugging Face feature metadata travels with the files.
    assert b"huggingface" in table.schema.metadata
    for image in table["image"].to_pylist():
        assert Image.open(io.BytesIO(image["bytes"])).size == (64, 64)


def test_hugging_face_datasets_reads_it_from_s3(
    endpoint: str, first_run: JobResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite runs with HF_HUB_OFFLINE=1, and datasets then refuses every remote URL, S3 included;
    # the only remote here is the loopback moto server ("parquet" is a builder shipped with datasets).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset(
        "parquet", data_files=f"{OUT}/data/**/*.parquet", split="train",
        storage_options=storage_options(endpoint), cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.num_rows == 2 and isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (64, 64)
    files = dataset_files(OUT, storage_options(endpoint))
    assert len(files) == 1 and files[0].startswith(f"{OUT}/data/ginger-cat/part-")
    listed = datasets.load_dataset(
        "parquet", data_files=files, split="train",
        storage_options=storage_options(endpoint), cache_dir=str(tmp_path / "hf-cache-2"),
    )
    assert sorted(listed["frame_id"]) == ["beach", "garden"]


def test_rerun_renders_nothing(endpoint: str, first_run: JobResult) -> None:
    again = render_story(str(EXAMPLE), options(endpoint))
    assert again.rendered == []
    assert sorted(again.skipped) == ["beach", "garden"]
    table = ParquetFrameSink(OUT, storage_options=storage_options(endpoint)).read_table()
    assert table.num_rows == 2


def test_leases_are_exclusive_on_s3(endpoint: str) -> None:
    # A conditional PUT (If-None-Match: *): the second create of the same key fails.
    fs = s3fs.S3FileSystem(**storage_options(endpoint), skip_instance_cache=True)
    path = f"{BUCKET}/leases/one.lock"
    assert create_exclusive(fs, path, b"first")
    assert not create_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"
    lease = Lease(f"s3://{BUCKET}/leases", "story-x", storage_options=storage_options(endpoint))
    lease.acquire()
    with pytest.raises(LeaseHeldError):
        Lease(f"s3://{BUCKET}/leases", "story-x", storage_options=storage_options(endpoint)).acquire()
    lease.release()


def test_a_bucket_that_does_not_exist_is_a_user_error(endpoint: str, capsys: pytest.CaptureFixture) -> None:
    import storysync_dist.cli as cli

    opts = options(endpoint)
    out = "s3://no-such-bucket/stories/cat"
    result = pytest.MonkeyPatch()
    # The CLI has no --storage-options flag: point it at the moto server through the environment.
    result.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    try:
        code = cli.main(["render", str(EXAMPLE), "--out", out, "--model", "tiny-sdxl", "--steps", "2",
                         "--height", "64", "--width", "64", "--no-progress", "--only", "beach"])
    finally:
        result.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"storysync: error: --out {out}: cannot write there")
    assert opts.out == OUT
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [BUCKET]
