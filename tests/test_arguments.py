"""One argument layer (``storysync_dist.arguments``): ``storysync render``, ``jobs/render_story.py``
and ``jobs/make_dataset.py`` take the same options from the same groups and read them the same
way, and a bad value of any of them is one line and exit 2 with nothing written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

from storysync_dist import arguments
from storysync_dist.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import make_dataset
    import render_story

    yield render_story, make_dataset
    for name in ("make_dataset", "render_story", "_common"):
        sys.modules.pop(name, None)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def render_parser() -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["render"]
    raise AssertionError("no render command")


def group(add) -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add(parser)
    return option_strings(parser)


def test_render_story_takes_exactly_the_options_of_storysync_render(jobs) -> None:
    render_story, _ = jobs
    assert option_strings(render_story.build_parser()) == option_strings(render_parser()) | {"-v", "--verbose"}


def test_make_dataset_takes_the_shared_groups(jobs) -> None:
    _, make_dataset = jobs
    ours = option_strings(make_dataset.build_parser())
    for add in (arguments.add_model_arguments, arguments.add_device_arguments, arguments.add_config_arguments,
                arguments.add_efficiency_arguments, arguments.add_cluster_arguments):
        assert group(add) <= ours, add.__name__
    # And reads them as storysync render does: --set parsed, --ablation and --replace-config kept.
    args = make_dataset.build_parser().parse_args(
        ["bench.yaml", "--model", "tiny-sdxl", "--out", "o", "--set", "rfh_gamma=0.4", "--ablation", "no-rfh",
         "--replace-config", "--frame-batch", "2", "--bundle-on", "host", "--steps", "3"])
    options = arguments.options_from_args(args, steps=None)
    assert options.overrides == {"rfh_gamma": 0.4} and options.ablation == "no-rfh" and options.replace_config
    assert options.frame_batch == 2 and options.bundle_on == "host" and options.steps is None


def test_the_same_arguments_give_the_same_options_everywhere(jobs) -> None:
    render_story, _ = jobs
    argv = [str(EXAMPLE), "--model", "tiny-sdxl", "--out", "o", "--only", "beach", "--steps", "3", "--set",
            "bli_lambda=0.5", "--workers", "2", "--address", "--frame-batch", "4", "--offload", "model"]
    cli = arguments.options_from_args(build_parser().parse_args(["render", *argv]))
    job = arguments.options_from_args(render_story.build_parser().parse_args(argv))
    assert cli == job
    assert cli.only == ["beach"] and cli.workers == 2 and cli.frame_batch == 4 and cli.offload == "model"


def write_benchmark(folder: Path) -> Path:
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump({"animals": [{"concept_token": "fox", "subject": "A red fox", "style": "A photo of",
                                                 "settings": ["in snow", "in a den"]}]}))
    return path


@pytest.mark.parametrize("flags, named", [
    (["--set", "no_such_option=1"], "--set no_such_option"),
    (["--ablation", "no-everything"], "--ablation"),
    (["--bundle-on", "gpu"], "--bundle-on"),
    (["--offload", "all"], "--offload"),
])
def test_make_dataset_bad_options_exit_2_with_one_line(jobs, tmp_path: Path, capsys, flags: list[str],
                                                       named: str) -> None:
    _, make_dataset = jobs
    out = tmp_path / "out"
    code = make_dataset.main([str(write_benchmark(tmp_path)), "--model", "tiny-sdxl", "--out", str(out),
                              "--steps", "2", "--height", "64", "--width", "64", "--no-progress", *flags])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_dataset: error:")]
    assert len(lines) == 1 and named in lines[0], lines
    assert not out.exists()
