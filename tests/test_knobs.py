"""Every StorySync knob from the story and the command line, end to end through ``storysync render``
(tiny-sdxl, in this process): ``--set``, ``--ablation``, the story's ``storysync:`` section, their
precedence, one-line errors that leave nothing behind, and the rule that one dataset never mixes
two sets of render settings for one story (``--replace-config``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from storysync_dist.cli import main
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.unet import MASK_LAYERS, SHARE_LAYERS

FAST = ["--model", "tiny-sdxl", "--workers", "0", "--steps", "2", "--height", "64", "--width", "64",
        "--no-progress"]
# The defaults as a float32 (CPU) tiny-sdxl job resolves them: the layers its family fills in and
# float16 anchors (StorySyncConfig leaves both to the model).
DEFAULTS = StorySyncConfig().with_layers(SHARE_LAYERS, MASK_LAYERS).with_anchor_dtype("float32").to_dict()

STORY = {
    "id": "heron",
    "subjects": [{"name": "heron", "description": "a grey heron", "tokens": ["heron"]}],
    "frames": [
        {"id": "pond", "prompt": "{heron} standing in a pond"},
        {"id": "reeds", "prompt": "{heron} among tall reeds"},
        {"id": "sky", "prompt": "{heron} flying over a lake"},
    ],
}


def story_file(tmp: Path, name: str = "story.yaml", **top: object) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({**STORY, **top}, sort_keys=False))
    return path


def render(story: Path, out: Path, *extra: str) -> int:
    return main(["render", str(story), "--out", str(out), *FAST, *extra])


def configs(out: Path) -> dict[str, dict]:
    """frame id -> the parsed ``config`` column; every frame of the story occurs exactly once."""
    rows = open_dataset(out).to_table().to_pylist()
    ids = [r["frame_id"] for r in rows]
    assert sorted(ids) == ["pond", "reeds", "sky"], ids
    return {r["frame_id"]: json.loads(r["config"]) for r in rows}


def storysync_of(out: Path) -> dict:
    """The StorySync config every row records (they must all agree)."""
    found = {json.dumps(c["storysync"], sort_keys=True) for c in configs(out).values()}
    assert len(found) == 1, found
    return json.loads(found.pop())


def manifest_entry(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["stories"]["heron"]


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("storysync: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_set_shows_in_every_row_and_in_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert render(story_file(tmp_path), out, "--set", "rfh_gamma=0.5", "--set", "share_layers=[up_blocks.0]") == 0
    got = storysync_of(out)
    assert got == {**DEFAULTS, "rfh_gamma": 0.5, "share_layers": ["up_blocks.0"]}
    entry = manifest_entry(out)
    assert entry["config"]["storysync"] == got and entry["method"] == "storysync"
    assert entry["config"]["steps"] == 2 and entry["config"]["height"] == 64
    assert entry["config_sources"]["set"] == {"rfh_gamma": 0.5, "share_layers": ["up_blocks.0"]}


def test_story_section_shows_and_set_beats_it(tmp_path: Path) -> None:
    story = story_file(tmp_path, storysync={"rfh_gamma": 0.4, "rfh_tau": 0.2})
    out = tmp_path / "story-only"
    assert render(story, out) == 0
    assert storysync_of(out) == {**DEFAULTS, "rfh_gamma": 0.4, "rfh_tau": 0.2}
    assert manifest_entry(out)["config_sources"]["story"] == {"rfh_gamma": 0.4, "rfh_tau": 0.2}
    out = tmp_path / "story-and-set"
    assert render(story, out, "--set", "rfh_gamma=0.6") == 0
    assert storysync_of(out) == {**DEFAULTS, "rfh_gamma": 0.6, "rfh_tau": 0.2}


def test_ablations_switch_their_component_off(tmp_path: Path) -> None:
    story = story_file(tmp_path)
    assert render(story, tmp_path / "no-mask", "--ablation", "no-mask") == 0
    assert storysync_of(tmp_path / "no-mask") == {**DEFAULTS, "use_masks": False}
    assert manifest_entry(tmp_path / "no-mask")["config_sources"]["ablation"] == "no-mask"
    # --set is applied after the ablation.
    assert render(story, tmp_path / "no-pose", "--ablation", "no-pose", "--set", "rfh_dropout=0.05") == 0
    assert storysync_of(tmp_path / "no-pose") == {
        **DEFAULTS, "layout_interpolation": False, "share_dropout": 0.0, "rfh_dropout": 0.05, "mask_dropout": 0.0,
    }


def bad_section(tmp: Path) -> list[str]:
    return [str(story_file(tmp, "bad.yaml", storysync={"rfh_gama": 0.5}))]


def bad_section_value(tmp: Path) -> list[str]:
    return [str(story_file(tmp, "bad.yaml", storysync={"rfh_gamma": 3}))]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--set", "nope=1"], ["--set nope:", "unknown option"]),
        (["--set", "rfh_gamma=2"], ["--set rfh_gamma:", "within [0, 1]", "2"]),
        (["--set", "use_masks=maybe"], ["--set use_masks:", "true or false", "maybe"]),
        (["--set", "rfh_gamma"], ["--set rfh_gamma:", "key=value"]),
        (["--set", "=0.5"], ["--set =0.5:", "key=value"]),
        (["--ablation", "bogus"], ["--ablation:", "bogus", "no-mask"]),
        (["--method", "vanilla", "--ablation", "no-rfh"], ["--ablation:", "--method vanilla"]),
        (["--method", "vanilla", "--set", "rfh_gamma=0.5"], ["--set:", "--method vanilla"]),
        (["--replace-config", "--only", "pond"], ["--replace-config", "--only"]),
        (bad_section, ["bad.yaml", "storysync.rfh_gama", "unknown option"]),
        (bad_section_value, ["bad.yaml", "storysync.rfh_gamma", "[0, 1]"]),
    ],
)
def test_bad_knobs_exit_2_with_one_line_and_leave_nothing(tmp_path: Path, capsys, extra, needles) -> None:
    out = tmp_path / "out"
    story = str(story_file(tmp_path))
    if callable(extra):
        story, extra = extra(tmp_path)[0], []
    assert main(["render", story, "--out", str(out), *FAST, *extra]) == 2
    err = one_error_line(capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_another_config_into_the_same_out_is_refused_until_replace_config(tmp_path: Path, capsys) -> None:
    story = story_file(tmp_path)
    out = tmp_path / "out"
    assert render(story, out, "--set", "rfh_gamma=0.5") == 0
    capsys.readouterr()
    before = snapshot(out)

    # Another --set, an ablation, other steps, a dry run of either: refused, nothing changes.
    refusals = [
        (["--set", "rfh_gamma=0.6"], "storysync.rfh_gamma: 0.5 -> 0.6"),
        (["--set", "rfh_gamma=0.6", "--dry-run"], "storysync.rfh_gamma: 0.5 -> 0.6"),
        (["--ablation", "no-mask", "--set", "rfh_gamma=0.5"], "storysync.use_masks: true -> false"),
        (["--set", "rfh_gamma=0.5", "--steps", "3"], "steps: 2 -> 3"),
        (["--method", "vanilla"], 'method: "storysync" -> "vanilla"'),
    ]
    for extra, difference in refusals:
        assert main(["render", str(story), "--out", str(out), *FAST, *extra]) == 2, extra
        err = one_error_line(capsys)
        assert f"--out {out}: story 'heron' has 3 frame(s) there rendered with other settings" in err, err
        assert difference in err and "its own --out" in err and "--replace-config" in err, err
        assert snapshot(out) == before, extra

    # The same settings again: nothing to do, nothing refused.
    assert render(story, out, "--set", "rfh_gamma=0.5") == 0
    assert "rendered 0 frame(s), skipped 3" in capsys.readouterr().out
    assert snapshot(out) == before

    assert render(story, out, "--set", "rfh_gamma=0.6", "--replace-config", "--only", "pond") == 2
    assert "cannot be combined with --only" in one_error_line(capsys)
    assert snapshot(out) == before

    assert render(story, out, "--set", "rfh_gamma=0.6", "--replace-config") == 0
    printed = capsys.readouterr().out
    assert "rendered 3 frame(s)" in printed and "replaced:   3 frame(s)" in printed
    assert storysync_of(out) == {**DEFAULTS, "rfh_gamma": 0.6}  # every frame, once, new config
    entry = manifest_entry(out)
    assert entry["config"]["storysync"]["rfh_gamma"] == 0.6 and entry["complete"]
    assert all(f["done"] and not f["stale"] for f in entry["frames"])


def test_prompt_and_seed_edits_with_the_same_settings_are_not_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert render(story_file(tmp_path), out) == 0
    edited = json.loads(json.dumps(STORY))
    edited["frames"][2]["prompt"] = "{heron} flying over a misty lake"
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    capsys.readouterr()
    assert render(path, out) == 0
    assert "rendered 1 frame(s), skipped 2" in capsys.readouterr().out
    assert render(path, out, "--seed", "5") == 0  # new seeds: every frame again, same settings
    assert "rendered 3 frame(s)" in capsys.readouterr().out


def test_help_lists_the_knobs(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    text = capsys.readouterr().out
    for flag in ("--set KEY=VALUE", "--ablation {none,no-mask,no-rfh,no-pose}", "--replace-config"):
        assert flag in text, flag
