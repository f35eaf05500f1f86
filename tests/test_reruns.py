"""A rerun after a story edit leaves the dataset exactly as a fresh render of the edited story
would (rows and pixels), the manifest tells the truth, --dry-run predicts the work, and
--save-anchors works on a finished dataset. In process, on tiny-sdxl."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from storysync_dist.api import JobResult, RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.errors import StorySyncUserError
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.presets import load_pipeline

FAST = {"model": "tiny-sdxl", "steps": 4, "height": 64, "width": 64, "progress": False}

STORY = {
    "id": "fox",
    "style": "A pencil sketch of",
    "subjects": [{"name": "fox", "description": "a red fox with a white tail tip", "tokens": ["fox"]}],
    "anchors": ["den", "river"],
    "defaults": {"steps": 4, "height": 64, "width": 64, "guidance_scale": 5.0, "seed": 0},
    "frames": [
        {"id": "den", "prompt": "{fox} sleeping in its den", "seed": 3},
        {"id": "river", "prompt": "{fox} drinking from a river"},
        {"id": "snow", "prompt": "{fox} jumping into deep snow"},
        {"id": "moon", "prompt": "{fox} howling at the moon"},
    ],
}


def write_story(path: Path, story: dict) -> str:
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return str(path)


_PIPE: list = []
BASE_STORIES: dict[str, Path] = {}  # where the base render's story file lives (its manifest "source")


def render(story: dict, out: Path, tmp: Path, **extra) -> JobResult:
    """Render in this process, with one pipeline loaded once for the module."""
    if not _PIPE:
        _PIPE.append(load_pipeline("tiny-sdxl"))
    path = write_story(tmp / f"story-{abs(hash(json.dumps(story, sort_keys=True)))}.yaml", story)
    return render_story(path, RenderOptions(out=str(out), **{**FAST, **extra}), pipe=_PIPE[0])


def rows(out: Path) -> list[dict]:
    return open_dataset(out).to_table().to_pylist()


def state(out: Path) -> dict[str, tuple]:
    """frame id -> (prompt, seed, fingerprint, is_anchor, pixels); each frame must occur once."""
    table = rows(out)
    ids = [r["frame_id"] for r in table]
    assert len(ids) == len(set(ids)), f"a frame occurs twice: {sorted(ids)}"
    return {
        r["frame_id"]: (r["prompt"], r["seed"], r["fingerprint"], r["is_anchor"],
                        np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))))
        for r in table
    }


def assert_same_dataset(rerun: Path, fresh: Path) -> None:
    a, b = state(rerun), state(fresh)
    assert sorted(a) == sorted(b)
    for frame_id in a:
        assert a[frame_id][:4] == b[frame_id][:4], frame_id
        np.testing.assert_array_equal(a[frame_id][4], b[frame_id][4], err_msg=frame_id)
    # The storyboard shows the story as it is now: the same picture as a fresh render's.
    np.testing.assert_array_equal(np.asarray(Image.open(rerun / "storyboard.png")),
                                  np.asarray(Image.open(fresh / "storyboard.png")))


def assert_manifest_true(out: Path, story: dict) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["stories"][story["id"]]
    stored = state(out)
    frames = entry["frames"]
    assert [f["id"] for f in frames] == [f.get("id", f"frame-{i:04d}") for i, f in enumerate(story["frames"])]
    assert entry["complete"] and all(f["done"] and not f["stale"] for f in frames)
    assert set(stored) == {f["id"] for f in frames}  # nothing else is in the data
    for f in frames:
        prompt, seed, fingerprint, _, _ = stored[f["id"]]
        assert (f["prompt"], f["seed"], f["fingerprint"]) == (prompt, seed, fingerprint)
    board = Image.open(out / entry["storyboard"])
    assert board.width > 64
    assert (out / "storyboard.png").exists()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "out"
    result = render(STORY, out, BASE_STORIES.setdefault("dir", tmp_path_factory.mktemp("stories")))
    assert sorted(result.rendered) == ["den", "moon", "river", "snow"]
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edited(**changes) -> dict:
    story = json.loads(json.dumps(STORY))
    for key, value in changes.items():
        story[key] = value
    return story


def test_prompt_change_rerenders_only_that_frame(base: Path, tmp_path: Path) -> None:
    story = edited()
    story["frames"][2]["prompt"] = "{fox} chasing a mouse through deep snow"
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(story, out, tmp_path)
    assert result.rendered == ["snow"] and result.replaced == ["snow"]
    assert sorted(result.skipped) == ["den", "moon", "river"]
    assert_same_dataset(out, _fresh(story, tmp_path))
    assert_manifest_true(out, story)


def test_inserted_frame_with_automatic_ids(tmp_path: Path) -> None:
    auto = edited(anchors=None)
    del auto["anchors"]
    for frame in auto["frames"]:
        del frame["id"]
    out = tmp_path / "auto"
    render(auto, out, tmp_path)
    inserted = json.loads(json.dumps(auto))
    inserted["frames"].insert(0, {"prompt": "{fox} standing on a hill at dawn"})
    result = render(inserted, out, tmp_path)
    # Every automatic id now names another prompt, and the default anchors (the first two
    # frames) changed, so every frame is rendered again; none is kept with a stale prompt.
    assert sorted(result.rendered) == [f"frame-{i:04d}" for i in range(5)]
    assert sorted(result.replaced) == [f"frame-{i:04d}" for i in range(4)]
    assert_same_dataset(out, _fresh(inserted, tmp_path))
    assert_manifest_true(out, inserted)
    prompts = {frame_id: v[0] for frame_id, v in state(out).items()}
    assert "standing on a hill" in prompts["frame-0000"]


def test_removed_frame_leaves_data_manifest_and_storyboard(base: Path, tmp_path: Path) -> None:
    story = edited()
    del story["frames"][3]
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(story, out, tmp_path)
    assert result.rendered == [] and result.removed == ["moon"]
    assert_same_dataset(out, _fresh(story, tmp_path))
    assert_manifest_true(out, story)


def test_seed_override_rerenders_every_derived_seed(base: Path, tmp_path: Path) -> None:
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(STORY, out, tmp_path, seed=99)
    # The anchors' seeds changed (river's is derived), so every frame depends on new anchors.
    assert sorted(result.rendered) == ["den", "moon", "river", "snow"]
    assert state(out)["river"][1] == 100 and state(out)["den"][1] == 3
    assert_same_dataset(out, _fresh(STORY, tmp_path, seed=99))
    again = render(STORY, out, tmp_path, seed=99)
    assert again.rendered == [] and len(again.skipped) == 4


def test_anchor_prompt_change_rerenders_every_frame(base: Path, tmp_path: Path) -> None:
    story = edited()
    story["frames"][0]["prompt"] = "{fox} curled up in a hollow log"
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(story, out, tmp_path)
    assert sorted(result.rendered) == ["den", "moon", "river", "snow"]
    assert_same_dataset(out, _fresh(story, tmp_path))
    assert_manifest_true(out, story)


def test_config_change_is_refused_then_replace_config_rerenders_every_frame(base: Path, tmp_path: Path) -> None:
    out = copy_dataset(base, tmp_path / "rerun")
    config = StorySyncConfig(rfh_gamma=0.5)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # One story, one set of settings: another config into the same --out is refused, untouched.
    with pytest.raises(StorySyncUserError, match=r"story 'fox' has 4 frame\(s\) there rendered with other "
                       r"settings \(storysync\.rfh_gamma: 0\.3 -> 0\.5\).*--replace-config"):
        render(STORY, out, tmp_path, config=config)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(StorySyncUserError, match="cannot be combined with --only"):
        render(STORY, out, tmp_path, config=config, replace_config=True, only=["snow"])
    result = render(STORY, out, tmp_path, config=config, replace_config=True)
    assert sorted(result.rendered) == ["den", "moon", "river", "snow"]
    assert sorted(result.replaced) == ["den", "moon", "river", "snow"]
    assert_same_dataset(out, _fresh(STORY, tmp_path, config=config))
    for row in rows(out):
        assert json.loads(row["config"])["storysync"]["rfh_gamma"] == 0.5
    assert_manifest_true(out, STORY)


def test_only_leaves_out_of_date_frames_alone_and_reports_them(base: Path, tmp_path: Path) -> None:
    story = edited()
    story["frames"][2]["prompt"] = "{fox} asleep under deep snow"
    story["frames"][3]["prompt"] = "{fox} howling at a red moon"
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(story, out, tmp_path, only=["snow"])
    assert result.rendered == ["snow"] and result.stale == ["moon"]
    entry = json.loads((out / "manifest.json").read_text())["stories"]["fox"]
    flags = {f["id"]: (f["done"], f["stale"]) for f in entry["frames"]}
    assert flags == {"den": (True, False), "river": (True, False), "snow": (True, False), "moon": (False, True)}
    assert not entry["complete"]


def test_dry_run_predicts_the_work_and_writes_nothing(base: Path, tmp_path: Path, capsys) -> None:
    story = edited()
    story["frames"][2]["prompt"] = "{fox} rolling in deep snow"
    del story["frames"][3]
    story["frames"].append({"id": "cave", "prompt": "{fox} peeking out of a cave"})
    out = copy_dataset(base, tmp_path / "rerun")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    path = write_story(tmp_path / "dry.yaml", story)
    assert main(["render", path, "--out", str(out), "--model", "tiny-sdxl", "--no-progress", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "nothing was written" in printed
    assert "render:  1 (cave)" in printed and "replace: 1 (snow)" in printed and "remove:  1 (moon)" in printed
    assert "skip:    2 already present" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    result = render(story, out, tmp_path)  # the real run does what the dry run said
    assert sorted(result.rendered) == ["cave", "snow"] and result.removed == ["moon"]


def test_save_anchors_on_a_finished_dataset(base: Path, tmp_path: Path, capsys) -> None:
    out = copy_dataset(base, tmp_path / "rerun")
    result = render(STORY, out, tmp_path, save_anchors=True)
    assert result.rendered == [] and result.anchor_bundle and os.path.exists(result.anchor_bundle)
    again = render(STORY, out, tmp_path, save_anchors=True)
    assert again.anchor_bundle is None and any("already holds these anchors" in n for n in again.notes)
    # The saved bundle renders the same frames as the anchors rendered in the job.
    other = tmp_path / "from-bundle"
    reused = render(STORY, other, tmp_path, anchors=result.anchor_bundle, only=["snow", "moon"])
    assert sorted(reused.rendered) == ["moon", "snow"]
    a, b = state(other), state(out)
    for frame_id in ("snow", "moon"):
        assert a[frame_id][2] == b[frame_id][2]  # same identity
        np.testing.assert_array_equal(a[frame_id][4], b[frame_id][4])


def test_a_damaged_part_file_is_set_aside_not_a_traceback(base: Path, tmp_path: Path, capsys) -> None:
    out = copy_dataset(base, tmp_path / "rerun")
    folder = out / "data" / "fox"
    garbage = folder / "part-00002-0123456789abcdef.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    wrong = folder / "part-00003-fedcba9876543210.parquet"
    pq.write_table(pq.read_table(folder / next(p.name for p in folder.iterdir()
                                               if p.name.startswith("part-00000"))).drop(["frame_id"]),
                   wrong)
    path = write_story(tmp_path / "story.yaml", STORY)
    assert main(["render", path, "--out", str(out), *_cli_fast()]) == 0
    printed = capsys.readouterr().out
    assert printed.count("set aside:") == 2
    assert (out / "quarantine" / folder.name / garbage.name).exists() and not garbage.exists()
    assert (out / "quarantine" / folder.name / wrong.name).exists() and not wrong.exists()
    assert_manifest_true(out, STORY)
    # pyarrow reads the dataset again: nothing unreadable is left under data/.
    assert len(rows(out)) == 4


def test_output_location_problems_are_user_errors(tmp_path: Path, capsys) -> None:
    path = write_story(tmp_path / "story.yaml", STORY)
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below"):
        assert main(["render", path, "--out", str(out), *_cli_fast()]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"storysync: error: --out {out}: cannot write there"), err
    assert a_file.read_text() == "not a folder"


def _cli_fast() -> list[str]:
    return ["--model", "tiny-sdxl", "--steps", "4", "--height", "64", "--width", "64", "--no-progress"]


def _fresh(story: dict, tmp: Path, **extra) -> Path:
    out = tmp / f"fresh-{len(list(tmp.iterdir()))}"
    render(story, out, tmp, **extra)
    return out


def test_nan_latents_fail_the_frame_instead_of_recording_a_black_one(tmp_path: Path) -> None:
    from storysync_dist.errors import NonFiniteOutputError

    pipe = load_pipeline("tiny-sdxl")
    pipe.unet.register_forward_hook(lambda module, args, output: (output[0] * float("nan"), *output[1:]))
    path = write_story(tmp_path / "story.yaml", STORY)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteOutputError, match=r"anchors \['den', 'river'\]: the denoiser produced NaN"):
        render_story(path, RenderOptions(out=str(out), **FAST), pipe=pipe)
    assert not out.exists()  # nothing recorded, no empty folder left behind


def test_a_rerun_into_a_finished_dataset_writes_nothing(base: Path, tmp_path: Path) -> None:
    out = copy_dataset(base, tmp_path / "rerun")
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    result = render(STORY, out, BASE_STORIES["dir"])  # the same story file
    assert result.rendered == [] and len(result.skipped) == 4
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
