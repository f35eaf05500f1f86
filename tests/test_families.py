"""One property suite for every registered model family, on its offline tiny preset(s).

Whatever family is registered in ``models/registry.py`` gets these checks through its presets
(every preset whose name starts with ``tiny-``): mechanisms off equals the stock pipeline (with
and without a negative prompt where the family takes one), every StorySync attention of a render
matches the plain references of test_mechanism_references, a frame does not depend on its
companions (``--only`` gives the same pixels), a bundle round trip gives the same frames, two Ray
workers give the pixels of one process (on the session's shared Ray head, the reference rendered
as a Ray worker renders it: tests/_pixels.py), and the CLI end to end.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker
from _replay import assert_frames_independent
from _stories import fox_story

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.renderer import StoryRenderer
from storysync_dist.errors import StorySyncUserError
from storysync_dist.models.presets import PRESETS, load_pipeline
from storysync_dist.models.registry import adapter_for, families, family_for_pipeline

TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))
STEPS, SIZE = 3, 64

STORY = fox_story()


def test_every_family_has_a_tiny_preset() -> None:
    covered = {family_for_pipeline(load_pipeline(name)).name for name in TINY}
    assert covered == {family.name for family in families()}


@pytest.fixture(scope="module", params=TINY)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(preset: str):
    return load_pipeline(preset)


def story_file(tmp_path: Path, negative: str | None = None) -> Path:
    story = {**STORY, "defaults": {"steps": STEPS, "height": SIZE, "width": SIZE}}
    if negative is not None:
        story["defaults"]["negative_prompt"] = negative
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


# What a preset's model card adds to the stock call: FLUX.1-schnell's card calls it with
# max_sequence_length=256 (tiny-flux is schnell-shaped: no guidance embedding).
MODEL_CARD_KWARGS = {"tiny-flux": {"max_sequence_length": 256}}


def stock_image(pipe, prompt: str, negative: str | None, seed: int, guidance: float,
                preset: str | None = None) -> np.ndarray:
    """The stock ``pipe(...)`` call as the model card makes it, with only the arguments its
    ``__call__`` takes."""
    kwargs = {"prompt": [prompt], "num_inference_steps": STEPS, "height": SIZE, "width": SIZE,
              "guidance_scale": guidance, "generator": [torch.Generator("cpu").manual_seed(seed)],
              **MODEL_CARD_KWARGS.get(preset, {})}
    if negative is not None:
        kwargs["negative_prompt"] = [negative]
    accepted = inspect.signature(type(pipe).__call__).parameters
    image = pipe(**{k: v for k, v in kwargs.items() if k in accepted}).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["no-negative-prompt", "negative-prompt"])
def test_mechanisms_off_equal_the_stock_pipeline(pipe, preset: str, tmp_path: Path, negative: str | None) -> None:
    adapter = adapter_for(pipe)
    if negative is not None and not adapter.info.negative_prompt:
        # The family's stock pipeline takes no negative prompt: a story with one is refused.
        with pytest.raises(StorySyncUserError, match="takes no negative prompt"):
            prepare_job(str(story_file(tmp_path, negative)),
                        RenderOptions(model=preset, out=str(tmp_path / "o"), method="vanilla"), pipe=pipe)
        return
    plan = prepare_job(str(story_file(tmp_path, negative)),
                       RenderOptions(model=preset, out=str(tmp_path / "o"), method="vanilla", progress=False), pipe=pipe)
    job = plan.jobs["snow"]
    ours = StoryRenderer(adapter, StorySyncConfig.vanilla(), plan.settings).render_frame(job, None).image
    assert ours.size == (SIZE, SIZE)
    stock = stock_image(pipe, job.prompt, negative, job.seed, plan.settings.guidance_scale, preset)
    assert np.abs(np.asarray(ours).astype(np.int16) - stock).max() <= 1


def test_frames_are_independent_of_companions_and_bundles_round_trip(pipe, preset: str, tmp_path: Path) -> None:
    adapter = adapter_for(pipe)
    plan = prepare_job(str(story_file(tmp_path)), RenderOptions(model=preset, out=str(tmp_path / "o"),
                                                                progress=False), pipe=pipe)
    # StorySync did the right thing: every StorySync attention of the anchors' and the frames'
    # renders returned what the plain reference computes from its inputs, a frame's pixels depend
    # on its own inputs, and subject keys were shared and RFH moved patches in the family's shared
    # layers only.
    replay, _ = assert_frames_independent(adapter, plan)
    assert all(c.name.startswith(plan.config.share_layers) for c in replay.calls if c.did.shared or c.did.moved)
    # The config the job resolved names the family's layers.
    assert plan.config.share_layers == adapter.info.share_layers
    assert plan.config.mask_layers == adapter.info.mask_layers


def test_cli_only_and_two_workers_give_the_same_pixels(preset: str, tmp_path: Path, ray_cluster) -> None:
    story = str(story_file(tmp_path))
    base = ["render", story, "--model", preset, "--no-progress"]
    with like_a_ray_worker():  # the in-process renders are the references of the Ray render below
        assert main([*base, "--out", str(tmp_path / "w0")]) == 0
        assert main([*base, "--out", str(tmp_path / "only"), "--only", "city"]) == 0
    in_process = frame_pixels(tmp_path / "w0")
    assert set(in_process) == {f["id"] for f in STORY["frames"]}
    assert all(image.shape[:2] == (SIZE, SIZE) for image in in_process.values())
    assert np.array_equal(frame_pixels(tmp_path / "only")["city"], in_process["city"])

    result = render_story(story, RenderOptions(model=preset, out=str(tmp_path / "w2"), workers=2, progress=False))
    assert_worker_threads(result.stats)
    assert_same_pixels(frame_pixels(tmp_path / "w2"), in_process)
