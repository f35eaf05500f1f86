"""``share_layers`` and ``mask_layers`` are checked against the model's attention layers before
anything renders (issue 19): a typo switched the method off without a word; now it is one line
naming the entry and the model's prefixes, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _stories import fox_story

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.engine.layers import check_layers, layer_prefixes
from storysync_dist.errors import StorySyncUserError
from storysync_dist.models.info import attention_processor_names, attention_processor_names_of
from storysync_dist.models.presets import load_pipeline
from storysync_dist.models.registry import family_named, model_info


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("story") / "fox.yaml"
    path.write_text(yaml.safe_dump(fox_story(2, steps=2, height=64, width=64)))
    return path


def _render(story: Path, out: Path, model: str, *sets: str, capsys: pytest.CaptureFixture[str],
            dry_run: bool = False) -> tuple[int, str, str]:
    """``storysync render`` in this process (the check runs before anything loads); (code, out, err)."""
    args = [a for s in sets for a in ("--set", s)]
    code = main(["render", str(story), "--model", model, "--out", str(out), "--no-progress", *args,
                 *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("model", "setting", "named"), [
    ("tiny-sdxl", "share_layers=[no_such_block]", "share_layers: 'no_such_block' matches no self-attention layer"),
    ("tiny-sdxl", "mask_layers=[up_blocks, downblocks]", "mask_layers: 'downblocks' matches no cross-attention"),
    ("tiny-flux", "share_layers=[single_blocks]", "share_layers: 'single_blocks' matches no"),
    ("tiny-kandinsky3", "share_layers=[up_blocks.7]", "share_layers: 'up_blocks.7' matches no"),
])
def test_an_unknown_layer_name_exits_2_in_one_line_with_nothing_written(
        story: Path, tmp_path: Path, model: str, setting: str, named: str, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = _render(story, out, model, setting, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and named in lines[0] and f"--model {model}" in lines[0], lines
    assert "its layers start with" in lines[0]
    assert not out.exists()


def test_the_message_lists_the_prefixes_the_model_has() -> None:
    names = attention_processor_names("tiny-sdxl")
    family = family_named(model_info("tiny-sdxl").family)
    config = StorySyncConfig().with_layers(("up_blocks.9",), ("down_blocks",))
    with pytest.raises(StorySyncUserError) as caught:
        check_layers(config, names, shares_at=family.shares_at, maps_at=family.maps_at, model="tiny-sdxl")
    listed = str(caught.value).split("start with ", 1)[1].split(", ")
    # Every listed prefix selects a self-attention layer, and every such layer is under one of them.
    selfs = [n for n in names if family.shares_at(n)]
    assert all(any(n.startswith(p) for n in selfs) for p in listed)
    assert all(any(n.startswith(p) for p in listed) for n in selfs)
    assert "up_blocks.0" in listed and "up_blocks.9" not in listed


def test_prefixes_of_a_long_run_of_blocks_are_shortened() -> None:
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(19)]
    assert layer_prefixes(names) == ["transformer_blocks", "transformer_blocks.0 ... transformer_blocks.18"]
    assert layer_prefixes(["mid_block.attentions.0.attn1.processor", "up_blocks.1.a.processor"]) == [
        "mid_block", "up_blocks", "up_blocks.1"]


def test_a_config_that_shares_nowhere_is_refused(story: Path, tmp_path: Path, capsys) -> None:
    names = attention_processor_names("tiny-sdxl")
    family = family_named("unet")
    # An entry that names a layer, but a cross-attention one: it shares nothing.
    config = StorySyncConfig().with_layers(("down_blocks.1.attentions.0.transformer_blocks.0.attn2",),
                                           ("down_blocks",))
    with pytest.raises(StorySyncUserError, match="matches no self-attention layer"):
        check_layers(config, names, shares_at=family.shares_at, maps_at=family.maps_at, model="tiny-sdxl")
    # No entry at all: refused as an option value.
    out = tmp_path / "cli"
    code, _, err = _render(story, out, "tiny-sdxl", "share_layers=[]", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "share_layers" in err and not out.exists()
    # Through the API: the same error as the CLI's, before anything is written.
    out = tmp_path / "api"
    with pytest.raises(StorySyncUserError, match="no_block"):
        render_story(str(story), RenderOptions(model="tiny-sdxl", out=str(out), progress=False,
                                               overrides={"share_layers": ["no_block"]}))
    assert not out.exists()


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd", "tiny-flux", "tiny-kandinsky3"])
def test_names_read_without_weights_are_those_of_the_loaded_pipeline(model: str) -> None:
    pipe = load_pipeline(model, device="cpu")
    assert attention_processor_names(model) == attention_processor_names_of(pipe)
    # The family's defaults pass the check on every family.
    info = model_info(model)
    family = family_named(info.family)
    config = StorySyncConfig().with_layers(info.share_layers, info.mask_layers)
    check_layers(config, attention_processor_names(model), shares_at=family.shares_at, maps_at=family.maps_at,
                 model=model)


def test_a_valid_prefix_passes_and_is_what_the_job_records(story: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, printed, err = _render(story, out, "tiny-sdxl", "share_layers=[up_blocks.0]",
                                 "mask_layers=[down_blocks.2]", capsys=capsys, dry_run=True)
    assert code == 0, err
    assert "render:  2 (meadow, stream)" in printed, printed
    assert not out.exists()
