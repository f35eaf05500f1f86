"""`storysync eval` end to end on a dataset rendered here (tiny-sdxl), with random-tiny encoders:
the tables and their row counts, the plumbing-check label, resuming, Ray workers equal to one
process, and the one-line exit-2 errors that write nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _pixels import like_a_ray_worker

from storysync_dist.cli import main
from storysync_dist.io.sink import open_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
FAST = ["--model", "tiny-sdxl", "--steps", "3", "--height", "64", "--width", "64", "--no-progress"]
METRIC_COLUMNS = ("clip_t", "clip_i", "dino", "lpips", "dreamsim")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "story"
    assert main(["render", str(EXAMPLE), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def scored(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scores") / "local"
    with like_a_ray_worker():  # scored as an EvalWorker scores, so both sides round alike
        assert main(["eval", str(dataset), "--encoders", "random-tiny", "--out", str(out)]) == 0
    return out


def test_eval_writes_per_frame_and_per_story_scores(dataset: Path, scored: Path, capsys) -> None:
    frames = open_dataset(dataset).to_table().to_pylist()
    per_frame = pq.read_table(scored / "per_frame.parquet").to_pylist()
    per_story = pq.read_table(scored / "per_story.parquet").to_pylist()
    assert sorted(r["frame_id"] for r in per_frame) == sorted(r["frame_id"] for r in frames)
    assert len(per_story) == 1 and per_story[0]["story_id"] == frames[0]["story_id"]
    story = per_story[0]
    assert story["num_frames"] == len(frames) and story["plumbing_check"] is True
    for column in METRIC_COLUMNS:
        assert math.isfinite(story[column]), column
    assert -1 <= story["clip_t"] <= 1 and -1 <= story["clip_i"] <= 1 and story["lpips"] >= 0
    # CLIP-T of the story is the mean of its frames'.
    assert story["clip_t"] == pytest.approx(sum(r["clip_t"] for r in per_frame) / len(per_frame))
    csv_lines = (scored / "per_story.csv").read_text().splitlines()
    assert len(csv_lines) == 2 and "clip_i" in csv_lines[0].split(",")
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["plumbing_check"] is True and "PLUMBING CHECK" in summary["label"]
    # Both halves are random: the encoders, and the tiny-sdxl preset that rendered the frames.
    assert summary["random_weight_models"] == ["tiny-sdxl"] and "tiny-sdxl" in summary["label"]
    assert set(summary["weights"]) >= {"clip-t", "clip-i", "dino", "lpips", "dreamsim", "background"}
    assert all("random-tiny" in used for used in summary["weights"].values())
    meta = pq.read_schema(scored / "per_story.parquet").metadata[b"storysync-eval"]
    assert json.loads(meta)["plumbing_check"] is True


def test_a_rerun_keeps_the_scores_of_unchanged_stories(dataset: Path, scored: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "again"
    shutil.copytree(scored, out)
    before = pq.read_table(out / "per_story.parquet").to_pylist()
    capsys.readouterr()
    assert main(["eval", str(dataset), "--encoders", "random-tiny", "--out", str(out)]) == 0
    assert "scored 0 story(ies), kept 1" in capsys.readouterr().out
    assert pq.read_table(out / "per_story.parquet").to_pylist() == before
    # Other metrics are another evaluation: the story is scored again.
    assert main(["eval", str(dataset), "--encoders", "random-tiny", "--out", str(out), "--metrics", "clip-t"]) == 0
    story = pq.read_table(out / "per_story.parquet").to_pylist()[0]
    assert "scored 1 story(ies)" in capsys.readouterr().out
    assert story["clip_t"] == pytest.approx(before[0]["clip_t"]) and math.isnan(story["clip_i"])


def test_ray_workers_give_the_scores_of_one_process(dataset: Path, scored: Path, tmp_path: Path,
                                                    ray_cluster) -> None:
    out = tmp_path / "ray"
    assert main(["eval", str(dataset), "--encoders", "random-tiny", "--out", str(out), "--workers", "2"]) == 0
    local = pq.read_table(scored / "per_story.parquet").to_pylist()[0]
    remote = pq.read_table(out / "per_story.parquet").to_pylist()[0]
    for column in METRIC_COLUMNS:
        assert remote[column] == pytest.approx(local[column], rel=1e-5, abs=1e-6), column


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("storysync: error: "), err
    return err


def test_missing_weights_exit_2_at_once_and_write_nothing(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "none"
    empty = tmp_path / "weights"
    empty.mkdir()
    assert main(["eval", str(dataset), "--weights", str(empty), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(empty) in err and "clip" in err
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "none"
    assert main(["eval", str(tmp_path / "no-such-dataset"), "--encoders", "random-tiny", "--out", str(out)]) == 2
    assert "no frames" in _one_line_error(capsys)
    assert main(["eval", str(dataset), "--encoders", "random-tiny", "--out", str(out), "--metrics", "fid"]) == 2
    assert "--metrics fid" in _one_line_error(capsys)
    assert not out.exists()


def test_eval_reads_and_writes_fsspec_urls(scored: Path) -> None:
    """A dataset behind an fsspec URL (memory://, as s3:// or gs://) scores like a local one."""
    import fsspec

    url = "memory://eval-cli/story"
    assert main(["render", str(EXAMPLE), "--out", url, *FAST]) == 0
    assert main(["eval", url, "--encoders", "random-tiny", "--metrics", "clip-t,clip-i"]) == 0
    fs = fsspec.filesystem("memory")
    with fs.open("/eval-cli/story/eval/per_story.parquet", "rb") as handle:
        remote = pq.read_table(handle).to_pylist()[0]
    local = pq.read_table(scored / "per_story.parquet").to_pylist()[0]
    # The same story, seeds and model: the same frames, so the same scores.
    assert remote["story_id"] == local["story_id"]
    assert remote["clip_i"] == pytest.approx(local["clip_i"], rel=1e-5)
    assert math.isnan(remote["lpips"])
