"""The ``jobs/*.py`` Ray-job entrypoints (tiny-sdxl), and the dataset they write read back with
Hugging Face ``datasets``. Each script runs once as a subprocess, as ``ray job submit`` runs it;
the other cases call its ``main()`` in this process (the same code, without an interpreter's
start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
from _pixels import assert_same_pixels, like_a_ray_worker
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
SMALL = ["--model", "tiny-sdxl", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]

BENCHMARK = """\
animals:
  - concept_token: fox
    subject: A red fox with a bushy tail
    style: A watercolor painting of
    settings: [running through fresh snow, sleeping in a den]
foods:
  - concept_token: bagel
    subject: A sesame bagel with cream cheese
    style: A studio photo of
    settings: [on a white plate, in a paper bag]
"""


def run_job(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Run as `ray job submit` would, but with no cluster: RAY_ADDRESS must not leak in from outside.
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch):
    """The ``jobs/`` folder's modules, imported as the scripts import each other."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import make_dataset
    import render_story

    return make_dataset, render_story


def load_parquet(out: Path, cache: Path) -> datasets.Dataset:
    # The dataset folder itself: its README.md card points datasets at data/**/*.parquet (without
    # it, the storyboard PNGs would be loaded as an image folder).
    return datasets.load_dataset(str(out), split="train", cache_dir=str(cache))


def test_make_dataset_writes_one_dataset_that_datasets_reads(tmp_path: Path, jobs, capsys) -> None:
    bench = tmp_path / "bench.yaml"
    bench.write_text(BENCHMARK, encoding="utf-8")
    out = tmp_path / "out"
    proc = run_job("make_dataset.py", str(bench), "--out", str(out), "--workers", "0", "--limit", "2", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "2 stories, 4 frame(s) rendered" in proc.stdout
    assert "animals: rendered 2" in proc.stdout and "foods: rendered 2" in proc.stdout

    ds = load_parquet(out, tmp_path / "hf-cache")
    assert ds.num_rows == 4
    assert isinstance(ds.features["image"], datasets.Image)
    # Story ids end in an 8-hex hash of (category, index); the readable part comes first.
    assert sorted((story_id.rsplit("-", 1)[0], frame_id) for story_id, frame_id in zip(ds["story_id"], ds["frame_id"])) == [
        ("animals-000-fox", "s00"), ("animals-000-fox", "s01"), ("foods-000-bagel", "s00"), ("foods-000-bagel", "s01")
    ]
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert set(ds["prompt"]) >= {"A studio photo of A sesame bagel with cream cheese on a white plate"}

    # A rerun into the same --out renders nothing.
    make_dataset, _ = jobs
    assert make_dataset.main([str(bench), "--out", str(out), *SMALL]) == 0
    assert "0 frame(s) rendered, 4 already present" in capsys.readouterr().out

    # --dry-run plans every set against the dataset, prints the totals and writes nothing: the two
    # sets it holds are skipped, a third set (not rendered yet) would render.
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(BENCHMARK + "  - concept_token: muffin\n    subject: A blueberry muffin\n    style: A photo of\n"
                      "    settings: [on a table, in a basket, in the rain]\n", encoding="utf-8")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert make_dataset.main([str(bigger), "--out", str(out), "--dry-run", *SMALL]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"dry run of 3 stories into {out}: nothing was written")
    assert "  render:  3" in printed and "  skip:    4 already present" in printed
    assert "  remove:  0  (no longer in the stories)" in printed
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert make_dataset.main([str(bigger), "--out", str(tmp_path / "none"), "--dry-run", *SMALL]) == 0
    assert "  render:  7" in capsys.readouterr().out.splitlines() and not (tmp_path / "none").exists()


def test_make_dataset_on_two_ray_workers_matches_in_process(tmp_path: Path, jobs, ray_cluster, capsys) -> None:
    # Three scenes per subject: two anchors and one frame for the workers, in each story; one pool
    # of workers (on the session's Ray head, which this process has joined) serves both stories.
    make_dataset, _ = jobs
    bench = tmp_path / "bench.yaml"
    bench.write_text(BENCHMARK.replace("sleeping in a den]", "sleeping in a den, crossing a river]")
                     .replace("in a paper bag]", "in a paper bag, next to a coffee]"), encoding="utf-8")
    frames = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        with like_a_ray_worker():  # the in-process render, as a Ray worker renders
            code = make_dataset.main([str(bench), "--out", str(out), "--workers", workers, *SMALL])
        assert code == 0
        assert "2 stories, 6 frame(s) rendered" in capsys.readouterr().out
        ds = load_parquet(out, tmp_path / f"hf-cache-{workers}")
        frames[workers] = {(r["story_id"], r["frame_id"]): np.asarray(r["image"]) for r in ds}
    assert len(frames["0"]) == 6
    assert_same_pixels(frames["2"], frames["0"])


def test_make_dataset_checks_every_set_before_rendering(tmp_path: Path, jobs, capsys) -> None:
    bench = tmp_path / "bench.yaml"
    # "pretzel" is not in the subject text, so the subject mask has no token to come from.
    bench.write_text(BENCHMARK + textwrap.dedent("""\
        snacks:
          - {concept_token: pretzel, subject: A salty knot, style: A photo of, settings: [on a table]}
        """), encoding="utf-8")
    out = tmp_path / "out"
    make_dataset, _ = jobs
    assert make_dataset.main([str(bench), "--out", str(out), *SMALL]) == 2
    # One line for the set that does not fit, one that says nothing was rendered.
    first, last = capsys.readouterr().err.strip().splitlines()
    assert first.startswith(f"make_dataset: error: {bench}:snacks[0]: frame 's00' (#0): subject 'subject' token 'pretzel'")
    assert last.startswith("make_dataset: error: 1 subject set(s) do not fit --model tiny-sdxl; nothing was rendered")
    assert not out.exists()


def test_render_story_job(tmp_path: Path, jobs, capsys) -> None:
    out = tmp_path / "out"
    proc = run_job("render_story.py", str(EXAMPLE), "--out", str(out), "--only", "beach", *SMALL,
                   "--set", "rfh_gamma=0.5", "--ablation", "no-rfh")
    assert proc.returncode == 0, proc.stderr
    assert "rendered 1 frame(s)" in proc.stdout
    # transformers' notice about image processors without torchvision is not for our users.
    assert "torchvision" not in proc.stderr
    ds = load_parquet(out, tmp_path / "hf-cache")
    assert ds.num_rows == 1 and ds[0]["frame_id"] == "beach"
    assert ds[0]["image"].size == (64, 64)
    # The job reads --set and --ablation as `storysync render` does.
    config = json.loads(ds[0]["config"])["storysync"]
    assert config["rfh_gamma"] == 0.5 and config["harmonize"] is False and config["use_masks"] is True
    assert (out / "storyboard.png").is_file() and (out / "manifest.json").is_file()
    # ... and refuses another config into the same --out, as the CLI does.
    _, render_story = jobs
    assert render_story.main([str(EXAMPLE), "--out", str(out), "--only", "beach", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "storysync.harmonize: false -> true" in err and "--replace-config" in err


def test_render_story_user_error_exits_2(tmp_path: Path, jobs, capsys) -> None:
    out = tmp_path / "out"
    _, render_story = jobs
    assert render_story.main([str(EXAMPLE), "--only", "beach,nowhere", "--out", str(out), *SMALL]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"render_story: error: {EXAMPLE}: no frame has id 'nowhere'")
    assert not out.exists()


def test_address_resolution(jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    import _common

    _, render_story = jobs

    parse = render_story.build_parser().parse_args
    assert parse([str(EXAMPLE), "--model", "m", "--out", "o"]).address is None
    assert parse([str(EXAMPLE), "--model", "m", "--out", "o", "--address"]).address == "auto"
    assert parse([str(EXAMPLE), "--model", "m", "--out", "o", "--address", "ray://h:10001"]).address == "ray://h:10001"
    args = parse([str(EXAMPLE), "--model", "m", "--out", "o", "--set", "rfh_tau=0.2", "--replace-config"])
    options = render_story.options_from_args(args, address=None)
    assert options.overrides == {"rfh_tau": 0.2} and options.replace_config and options.ablation is None

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _common.resolve_address(None) is None
    assert _common.resolve_address("auto") == "auto"
    # Under `ray job submit` RAY_ADDRESS is set: Ray joins that cluster itself.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert _common.resolve_address("auto") is None
    assert _common.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
