"""`storysync render` end to end on tiny-sdxl: the dataset, --only, resume, and user errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from storysync_dist.cli import main
from storysync_dist.io.sink import FRAME_SCHEMA, open_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
FAST = ["--model", "tiny-sdxl", "--steps", "5", "--height", "128", "--width", "128", "--no-progress"]


def render(story: Path, out: Path, *extra: str) -> int:
    return main(["render", str(story), "--out", str(out), *FAST, *extra])


def frames_of(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "data", schema=FRAME_SCHEMA)
    return {row["frame_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def full_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    assert render(EXAMPLE, out) == 0
    return out


def test_render_writes_the_dataset_storyboard_and_manifest(full_render: Path) -> None:
    story = yaml.safe_load(EXAMPLE.read_text())
    table = open_dataset(full_render).to_table()
    assert table.num_rows == len(story["frames"])
    for field in FRAME_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    rows = frames_of(full_render)
    for frame_id, row in rows.items():
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (128, 128)
        assert row["image"]["path"] == f"ginger-cat/{frame_id}.png"
        mask = Image.open(io.BytesIO(row["mask"]))
        assert mask.size == (128, 128)
        config = json.loads(row["config"])
        assert config["storysync"]["rfh_gamma"] == 0.3 and config["storysync"]["bli_lambda"] == 0.7
        assert row["method"] == "storysync" and row["model"] == "tiny-sdxl"
    assert {r["frame_id"] for r in rows.values() if r["is_anchor"]} == {"beach", "kitchen"}
    assert rows["beach"]["seed"] == 7 and rows["garden"]["seed"] == 2
    board = Image.open(full_render / "storyboard.png")
    assert board.width >= 3 * 128
    manifest = json.loads((full_render / "manifest.json").read_text())
    entry = manifest["stories"]["ginger-cat"]
    assert entry["complete"] and all(f["done"] for f in entry["frames"])


def test_only_renders_the_same_pixels_as_the_full_story(full_render: Path, tmp_path: Path) -> None:
    out = tmp_path / "only"
    assert render(EXAMPLE, out, "--only", "market,kitchen") == 0
    partial, full = frames_of(out), frames_of(full_render)
    assert set(partial) == {"market", "kitchen"}
    for frame_id, row in partial.items():
        assert row["image"]["bytes"] == full[frame_id]["image"]["bytes"]


def test_rerun_renders_only_missing_frames(full_render: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "resume"
    assert render(EXAMPLE, out, "--only", "beach,garden") == 0
    capsys.readouterr()
    assert render(EXAMPLE, out) == 0
    assert "rendered 4 frame(s), skipped 2" in capsys.readouterr().out
    resumed, full = frames_of(out), frames_of(full_render)
    assert len(resumed) == 6
    assert all(resumed[k]["image"]["bytes"] == full[k]["image"]["bytes"] for k in full)
    assert render(EXAMPLE, out) == 0
    assert "rendered 0 frame(s), skipped 6" in capsys.readouterr().out


def test_vanilla_method_and_saved_anchors(tmp_path: Path, full_render: Path) -> None:
    out = tmp_path / "bank"
    assert render(EXAMPLE, out, "--only", "beach", "--save-anchors") == 0
    bundle = out / "anchors" / "ginger-cat.safetensors"
    assert bundle.exists()
    reuse = tmp_path / "reuse"
    assert render(EXAMPLE, reuse, "--only", "rooftop", "--anchors", str(bundle)) == 0
    assert frames_of(reuse)["rooftop"]["image"]["bytes"] == frames_of(full_render)["rooftop"]["image"]["bytes"]
    vanilla = tmp_path / "vanilla"
    assert render(EXAMPLE, vanilla, "--method", "vanilla", "--only", "rooftop") == 0
    row = frames_of(vanilla)["rooftop"]
    assert row["method"] == "vanilla" and row["mask"] is None
    assert row["image"]["bytes"] != frames_of(full_render)["rooftop"]["image"]["bytes"]


def bad_story(tmp_path: Path, change) -> Path:
    story = yaml.safe_load(EXAMPLE.read_text())
    change(story)
    path = tmp_path / "bad_story.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


def set_steps(story):
    story["defaults"]["steps"] = -3


def drop_frames(story):
    story["frames"] = []
    story.pop("anchors")


def duplicate_id(story):
    story["frames"][3]["id"] = "beach"


def no_subject_token(story):
    story["frames"][2]["prompt"] = "a dog chasing butterflies in a garden"


def long_prompt(story):
    story["frames"][4]["prompt"] = "{cat} " + "walking through a very long and winding market " * 12


def odd_size(story):
    story["defaults"]["height"] = 250


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (set_steps, ["bad_story.yaml", "steps", "-3"]),
        (drop_frames, ["bad_story.yaml", "frame"]),
        (duplicate_id, ["bad_story.yaml", "'beach'", "duplicate"]),
        (no_subject_token, ["bad_story.yaml", "'garden'", "cat"]),
        (long_prompt, ["bad_story.yaml", "'market'", "77"]),
        (odd_size, ["bad_story.yaml", "250", "multiple"]),
    ],
)
def test_spec_errors_exit_2_with_one_line_and_no_output(tmp_path: Path, capsys, change, needles) -> None:
    story = bad_story(tmp_path, change)
    out = tmp_path / "out"
    main_args = ["render", str(story), "--out", str(out), "--model", "tiny-sdxl", "--no-progress"]
    assert main(main_args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("storysync: error: ") and "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err
    assert not out.exists()


def test_unknown_preset_and_unknown_only_id(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["render", str(EXAMPLE), "--out", str(out), "--model", "tiny-nope", "--no-progress"]) == 2
    assert "tiny-nope" in capsys.readouterr().err
    assert render(EXAMPLE, out, "--only", "nowhere") == 2
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()


def test_console_script_exit_code_in_a_real_process(tmp_path: Path) -> None:
    story = bad_story(tmp_path, set_steps)
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "storysync_dist.cli", "render", str(story), "--model", "tiny-sdxl",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2
    # One line, naming the file, and nothing else on stderr (no traceback, no warnings).
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"storysync: error: {story}"), proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "CUDA is not available on this machine"), ("cuda:1", "CUDA is not available"),
     ("tpu9", "not a torch device"), ("meta", "cannot render")],
)
def test_a_device_this_machine_lacks_is_a_user_error(tmp_path: Path, capsys, device: str, message: str) -> None:
    import torch

    if torch.cuda.is_available():  # on a GPU machine cuda:0 exists; ask for one past the last instead
        device = device if not device.startswith("cuda") else f"cuda:{torch.cuda.device_count()}"
        message = message if not device.startswith("cuda") else "CUDA device(s)"
    out = tmp_path / "out"
    assert render(EXAMPLE, out, "--device", device) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"storysync: error: --device {device}") and message in err[0], err
    assert not out.exists()
