"""`storysync bench` end to end on tiny-sdxl: two subject sets, all four methods, random-tiny
encoders. The table (labelled a plumbing check), the CSV, the plot and a storyboard per subject set
exist and hold what they should; a rerun resumes; Ray workers render the baselines' pixels of one
process; bad options exit 2 with nothing written."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from _pixels import assert_same_pixels, like_a_ray_worker
from PIL import Image

from storysync_dist.cli import main
from storysync_dist.io.sink import open_dataset

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vanilla", "storysync", "consistory", "storydiffusion"]
SIZE = ["--steps", "3", "--height", "64", "--width", "64"]
SUITE = {
    "animals": [{"concept_token": "fox", "subject": "a red fox", "style": "A watercolor painting of",
                 "settings": ["in the snow", "by a river", "under the moon"]}],
    "objects": [{"concept_token": "teapot", "subject": "a blue teapot", "style": "A photo of",
                 "settings": ["on a table", "in a garden", "on a shelf"]}],
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


def bench(suite: Path, out: Path, *extra: str) -> int:
    return main(["bench", "--suite", str(suite), "--model", "tiny-sdxl", "--out", str(out), *SIZE,
                 "--encoders", "random-tiny", "--no-progress", *extra])


@pytest.fixture(scope="module")
def result(suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "table1"
    with like_a_ray_worker():  # the in-process renders are the references of the Ray test below
        assert bench(suite, out, "--methods", ",".join(METHODS)) == 0
    return out


def pixels(dataset: Path) -> dict[tuple[str, str], np.ndarray]:
    rows = open_dataset(dataset).to_table().to_pylist()
    return {(r["story_id"], r["frame_id"]): np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in rows}


def test_every_method_renders_every_frame_with_the_same_seeds(result: Path) -> None:
    seen = {}
    for method in METHODS:
        rows = open_dataset(result / "renders" / method).to_table().to_pylist()
        assert len(rows) == 6 and {r["method"] for r in rows} == {method}
        seen[method] = {(r["story_id"], r["frame_id"]): (r["prompt"], r["seed"]) for r in rows}
    assert all(seen[m] == seen["vanilla"] for m in METHODS)
    # The methods differ in their non-anchor frames (the baselines are not stock generation).
    frames = {m: pixels(result / "renders" / m) for m in METHODS}
    for method in ("storysync", "consistory", "storydiffusion"):
        assert any(not np.array_equal(frames[method][f], frames["vanilla"][f]) for f in frames["vanilla"]), method


def test_table_csv_plot_and_storyboards(result: Path) -> None:
    table = (result / "table.md").read_text()
    assert "PLUMBING CHECK" in table and "quality" in table
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert header.split("|")[1:7] == [" Method ", " Model ", " CLIP-T ↑ ", " CLIP-I ↑ ", " LPIPS ↓ ", " DreamSim ↓ "]
    for name in ("Vanilla", "StorySync", "ConsiStory", "StoryDiffusion"):
        assert sum(line.startswith(f"| {name} | tiny-sdxl |") for line in table.splitlines()) == 1, name
    rows = list(csv.DictReader((result / "results.csv").open()))
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["stories"] == "2" and row["frames"] == "6"
        per_story = pq.read_table(result / "scores" / row["method"] / "per_story.parquet").to_pylist()
        assert len(per_story) == 2
        assert float(row["clip_i"]) == pytest.approx(sum(s["clip_i"] for s in per_story) / 2)
    plot = Image.open(result / "adherence_vs_similarity.png")
    assert plot.format == "PNG" and plot.width > 300
    boards = sorted((result / "storyboards").glob("*.png"))
    assert len(boards) == 2
    story_ids = {r["story_id"] for r in open_dataset(result / "renders" / "vanilla").to_table().to_pylist()}
    assert {b.stem for b in boards} == story_ids
    board = np.asarray(Image.open(boards[0]).convert("RGB"))
    assert board.shape[0] > 4 * 64 and board.shape[1] > 3 * 64  # 4 method rows of 3 frames


def test_a_rerun_resumes(suite: Path, result: Path, capsys) -> None:
    before = (result / "results.csv").read_text()
    capsys.readouterr()
    assert bench(suite, result, "--methods", ",".join(METHODS)) == 0
    out = capsys.readouterr().out
    assert "rendered frames: vanilla 0, storysync 0, consistory 0, storydiffusion 0" in out
    assert (result / "results.csv").read_text() == before


def test_ray_workers_render_the_baselines_of_one_process(suite: Path, result: Path, tmp_path: Path,
                                                         ray_cluster) -> None:
    out = tmp_path / "ray"
    assert bench(suite, out, "--methods", "consistory,storydiffusion", "--workers", "2", "--limit", "1",
                 "--category", "animals", "--metrics", "clip-t") == 0
    for method in ("consistory", "storydiffusion"):
        local, remote = pixels(result / "renders" / method), pixels(out / "renders" / method)
        assert len(remote) == 3
        assert_same_pixels(remote, {key: local[key] for key in remote})


def test_bad_options_exit_2_and_write_nothing(suite: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "none"
    assert bench(suite, out, "--methods", "vanilla,dreambooth") == 2
    assert "--methods dreambooth" in capsys.readouterr().err
    empty = tmp_path / "weights"
    empty.mkdir()
    assert main(["bench", "--suite", str(suite), "--model", "tiny-sdxl", "--out", str(out), *SIZE,
                 "--weights", str(empty), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(empty) in err
    assert not out.exists()


def test_jobs_benchmark_takes_the_same_options() -> None:
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        from benchmark import build_parser
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    args = build_parser().parse_args(["--suite", "s.yaml", "--model", "tiny-sdxl", "--out", "o",
                                      "--encoders", "random-tiny", "--workers", "3"])
    assert args.methods == ",".join(METHODS) and args.workers == 3 and args.encoders == "random-tiny"
