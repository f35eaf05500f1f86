"""The `toyworld` preset and suites (issue 21): the preset resolves to its pipeline folder and
renders through the CLI, the API and Ray workers with the same pixels; the suites hold what the
quality instrument needs. Until the trained model is shipped, the folder is a one-step training
run (conftest.py ``toyworld_model``): these tests check the path, not quality."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.io.suites import resolve_suite
from storysync_dist.models.info import load_model_info
from storysync_dist.story import load_benchmark
from storysync_dist.toyworld import MODEL_ENV, scene_of_prompt
from storysync_dist.toyworld.stories import FRAMES, STORIES
from storysync_dist.toyworld.world import BACKGROUNDS, CLASSES

FAST = {"model": "toyworld", "steps": 4, "progress": False}

STORY = {
    "id": "toy-ball",
    "subjects": [{"name": "hero", "description": "a ball", "tokens": ["ball"]}],
    "frames": [
        {"id": "f0", "prompt": "{hero} on the left in the forest"},
        {"id": "f1", "prompt": "{hero} right of a tent on the beach"},
        {"id": "f2", "prompt": "{hero} in the middle in the city"},
        {"id": "f3", "prompt": "{hero} left of a log in the lake"},
    ],
}

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, toyworld_model: Path) -> str:
    path = tmp_path_factory.mktemp("story") / "toy.yaml"
    path.write_text(yaml.safe_dump(STORY))
    return str(path)


@pytest.fixture(scope="module")
def in_process(story: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("api") / "out"
    with like_a_ray_worker():
        result = render_story(story, RenderOptions(out=str(out), **FAST))
    assert sorted(result.rendered) == ["f0", "f1", "f2", "f3"]
    return frame_pixels(out)


def test_the_preset_is_the_trained_folder_at_64_pixels(toyworld_model: Path) -> None:
    info = load_model_info("toyworld")
    assert (info.default_height, info.default_width) == (64, 64)
    assert (toyworld_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_toyworld_renders_the_same_pixels_through_the_cli_and_two_ray_workers(story: str, in_process,
                                                                                tmp_path: Path) -> None:
    pixels = next(iter(in_process.values()))
    assert pixels.shape == (64, 64, 3)
    cli = tmp_path / "cli"
    with like_a_ray_worker():
        code = main(["render", story, "--model", "toyworld", "--out", str(cli), "--steps", "4", "--no-progress"])
    assert code == 0
    assert_same_pixels(frame_pixels(cli), in_process)
    workers = tmp_path / "workers"
    result = render_story(story, RenderOptions(out=str(workers), workers=2, device="cpu",
                                               resources_per_worker={"CPU": 1}, **FAST))
    assert_worker_threads(result.stats)
    assert_same_pixels(frame_pixels(workers), in_process)


def test_a_missing_toyworld_folder_is_one_line_and_exit_2(story: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    assert main(["render", story, "--model", "toyworld", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "toyworld" in err[0] and "nowhere" in err[0] and "train_toyworld.py" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["toyworld", "toyworld-tune"])
def test_the_toyworld_suites_are_one_subject_stories_over_every_background(name: str) -> None:
    stories = load_benchmark(resolve_suite(name))
    assert len(stories) == STORIES and all(len(s.frames) == FRAMES for s in stories)
    for story in stories:
        (subject,) = story.subjects
        (cls,) = subject.tokens
        assert cls in CLASSES and subject.description == f"a {cls}"
        scenes = [scene_of_prompt(f.prompt) for f in story.frames]
        # The subject is named first in every frame, so its token is the subject's, and the
        # identity is never named: the prompt has only the grammar's words.
        assert all(s.objects[0].cls == cls and s.kind in ("single", "pair") for s in scenes)
        backgrounds = [s.background for s in scenes]
        assert set(backgrounds) == set(BACKGROUNDS) and backgrounds[0] != backgrounds[1]
    assert {s.subjects[0].tokens[0] for s in stories} == set(CLASSES)


def test_the_tuning_and_test_splits_are_different_stories() -> None:
    test = [[f.prompt for f in s.frames] for s in load_benchmark(resolve_suite("toyworld"))]
    tune = [[f.prompt for f in s.frames] for s in load_benchmark(resolve_suite("toyworld-tune"))]
    assert sum(a == b for a in test for b in tune) == 0
