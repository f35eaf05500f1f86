"""The engine on the real diffusers pipeline classes (offline presets): stock equivalence, the
vanilla branch leaving after T steps, every layer of a StorySync render against the plain
references of test_mechanism_references, determinism, anchors and the bundle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _pixels import RAY_MAX_LEVELS, assert_same_pixels
from _replay import assert_render_replays, rendered_by_the_reference, replayed
from _stories import cat_job

from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.engine.renderer import FrameJob, RenderSettings, StoryRenderer
from storysync_dist.models.presets import load_pipeline
from storysync_dist.models.unet import UNetAdapter

STEPS, SIZE, GUIDANCE = 3, 64, 5.0


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd"])
def adapter(request: pytest.FixtureRequest) -> UNetAdapter:
    return UNetAdapter(load_pipeline(request.param))


@pytest.fixture(scope="module")
def xl() -> UNetAdapter:
    return UNetAdapter(load_pipeline("tiny-sdxl"))


def job(adapter: UNetAdapter, index: int, scene: str, seed: int) -> FrameJob:
    return cat_job(adapter, index, scene, seed, negative="blurry")


def jobs(adapter: UNetAdapter) -> list[FrameJob]:
    scenes = ["on a beach", "in a kitchen", "in a garden", "on a roof"]
    return [job(adapter, i, s, 100 + i) for i, s in enumerate(scenes)]


def settings(model: str) -> RenderSettings:
    return RenderSettings(model, STEPS, SIZE, SIZE, GUIDANCE)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def stock(adapter: UNetAdapter, frame: FrameJob):
    """The stock pipeline call; no ``negative_prompt`` argument at all when the frame has none."""
    negative = {} if frame.negative_prompt is None else {"negative_prompt": [frame.negative_prompt]}
    return adapter.pipe(
        prompt=[frame.prompt], num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(frame.seed)], **negative,
    ).images[0]


@pytest.mark.parametrize("negative", ["blurry", None], ids=["negative-prompt", "no-negative-prompt"])
def test_every_mechanism_off_equals_stock_diffusers(adapter: UNetAdapter, negative: str | None) -> None:
    frame = dataclasses.replace(jobs(adapter)[2], negative_prompt=negative)
    renderer = StoryRenderer(adapter, StorySyncConfig.vanilla(), settings("m"))
    ours = renderer.render_frame(frame, None).image
    assert ours.size == (SIZE, SIZE)
    assert np.array_equal(pixels(ours), pixels(stock(adapter, frame)))
    # The stock processors are back afterwards.
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in adapter.pipe.unet.attn_processors.values())


def test_no_negative_prompt_is_not_the_empty_string_on_sdxl(xl: UNetAdapter) -> None:
    # SDXL's pipe(prompt) uses zero unconditional embeddings (force_zeros_for_empty_prompt), an
    # explicit "" encodes the empty string: two different images, and ours follows each.
    assert dict(xl.pipe.config)["force_zeros_for_empty_prompt"]
    renderer = StoryRenderer(xl, StorySyncConfig.vanilla(), settings("m"))
    base = jobs(xl)[2]
    none, empty = (renderer.render_frame(dataclasses.replace(base, negative_prompt=n), None).image for n in (None, ""))
    assert not np.array_equal(pixels(none), pixels(empty))


def test_bli_with_lambda_one_follows_the_vanilla_branch(adapter: UNetAdapter) -> None:
    # Eq. 12 with lambda = 1 for every step: the consistent branch takes the vanilla branch's
    # self-attention output everywhere, so the image is the stock image.
    config = StorySyncConfig(share_attention=False, harmonize=False, bli_fraction=1.0, bli_lambda=1.0)
    frame = jobs(adapter)[1]
    ours = StoryRenderer(adapter, config, settings("m")).render_anchors([frame])[0][0].image
    assert np.abs(pixels(ours) - pixels(stock(adapter, frame))).max() <= 1


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_the_vanilla_branch_leaves_after_t_steps_and_the_frame_is_stock(adapter: UNetAdapter, lam: float) -> None:
    # BLI alone for T = 2 of 4 steps, at lambda 0 (the consistent branch ignores the vanilla
    # branch) and lambda 1 (it follows it): either way the frame is the stock frame, so the
    # vanilla branch is stepped with its own scheduler (tiny-sd's PNDM keeps a history) and its
    # leaving the batch after step T disturbs nothing. The UNet sees [uncond, cond] x [vanilla,
    # consistent] rows for the first T steps, then [uncond, cond] to the end.
    config = StorySyncConfig(share_attention=False, harmonize=False, bli_fraction=0.5, bli_lambda=lam)
    steps = 4
    assert config.bli_steps(steps) == 2
    frame = jobs(adapter)[1]
    batches: list[int] = []
    hook = adapter.pipe.unet.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        ours = StoryRenderer(adapter, config, RenderSettings("m", steps, SIZE, SIZE, GUIDANCE)).render_frame(frame, None)
    finally:
        hook.remove()
    calls = len(adapter.pipe.scheduler.timesteps)  # PNDM (tiny-sd) runs one more call than it has steps
    assert batches == [4, 4] + [2] * (calls - 2)
    stock_image = adapter.pipe(
        prompt=[frame.prompt], negative_prompt=[frame.negative_prompt], num_inference_steps=steps, height=SIZE,
        width=SIZE, guidance_scale=GUIDANCE, generator=[torch.Generator("cpu").manual_seed(frame.seed)],
    ).images[0]
    assert np.abs(pixels(ours.image) - pixels(stock_image)).max() <= 1  # a larger batch rounds the last bits apart


def test_storysync_frames_are_deterministic_and_every_layer_does_what_the_method_says(adapter: UNetAdapter) -> None:
    # The default config (sharing, RFH, BLI, every dropout): each StorySync self-attention of the
    # anchors' and the frame's render returns what the plain reference computes from its inputs,
    # with subject keys shared and RFH moving patches in both.
    story = jobs(adapter)
    renderer = StoryRenderer(adapter, StorySyncConfig(), settings("m"))
    with replayed(adapter) as replay:
        anchors, bundle = renderer.render_anchors(story[:2])
        first = renderer.render_frame(story[2], bundle)
    assert_render_replays(replay)
    assert {c.step for c in replay.calls} >= set(range(STEPS))
    assert all(c.name.startswith("up_blocks") for c in replay.calls if c.did.shared or c.did.moved)
    again = renderer.render_frame(story[2], bundle)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert first.mask is not None and first.mask.shape == (SIZE, SIZE) and first.mask.any()
    assert [a.is_anchor for a in anchors] == [True, True]


def test_sharing_without_rfh_gives_the_pixels_of_the_plain_reference(adapter: UNetAdapter) -> None:
    # Sharing (with its dropout) and BLI, no RFH: the frame rendered by the product equals the
    # frame rendered with the plain reference in place of every StorySync self-attention, within
    # the rounding of float sums; the frame without sharing does not, so a build that dropped
    # sharing would fail here.
    story = jobs(adapter)
    config = StorySyncConfig(harmonize=False)
    renderer = StoryRenderer(adapter, config, settings("m"))
    _, bundle = renderer.render_anchors(story[:2])
    ours = renderer.render_frame(story[2], bundle).image
    with rendered_by_the_reference(adapter):
        reference = renderer.render_frame(story[2], bundle).image
    assert_same_pixels({"frame": pixels(ours)}, {"frame": pixels(reference)})
    unshared = StoryRenderer(adapter, config.replace(share_attention=False), settings("m")).render_frame(story[2], None)
    assert np.abs(pixels(unshared.image) - pixels(reference)).max() > RAY_MAX_LEVELS


def test_a_frame_does_not_depend_on_the_frames_rendered_with_it(xl: UNetAdapter) -> None:
    story = jobs(xl)
    renderer = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl"))
    _, bundle = renderer.render_anchors(story[:2])
    in_sequence = [renderer.render_frame(f, bundle).image for f in story[2:]]
    alone = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl")).render_frame(story[3], bundle).image
    assert np.array_equal(pixels(in_sequence[1]), pixels(alone))


def test_frames_depend_on_the_anchors(xl: UNetAdapter) -> None:
    story = jobs(xl)
    renderer = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl"))
    _, bundle_a = renderer.render_anchors(story[:2])
    _, bundle_b = renderer.render_anchors([job(xl, 0, "in the snow", 7), job(xl, 1, "in a city", 8)])
    with_a = renderer.render_frame(story[2], bundle_a).image
    with_b = renderer.render_frame(story[2], bundle_b).image
    assert not np.array_equal(pixels(with_a), pixels(with_b))


def test_bundle_export_import_gives_identical_frames(xl: UNetAdapter, tmp_path) -> None:
    story = jobs(xl)
    renderer = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl"))
    _, bundle = renderer.render_anchors(story[:2])
    same_run = renderer.render_frame(story[3], bundle).image
    path = tmp_path / "anchors.safetensors"
    path.write_bytes(bundle.to_bytes())
    imported = AnchorBundle.from_bytes(path.read_bytes())
    fresh = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl"))
    assert np.array_equal(pixels(fresh.render_frame(story[3], imported).image), pixels(same_run))


def test_bundle_holds_subject_tokens_of_shared_layers_in_half_precision(xl: UNetAdapter) -> None:
    story = jobs(xl)
    config = StorySyncConfig()
    renderer = StoryRenderer(xl, config, settings("tiny-sdxl"))
    _, bundle = renderer.render_anchors(story[:2])
    # Current-step masks: the anchors share, and publish, from step 0.
    assert sorted(bundle.steps) == list(range(config.first_shared_step(), STEPS)) == list(range(STEPS))
    for anchor_step in bundle.steps.values():
        assert anchor_step.layers
        for name, layer in anchor_step.layers.items():
            assert name.startswith("up_blocks") and ".attn1." in name
            assert layer.hidden.dtype == torch.float16 and layer.features.dtype == torch.float16
            assert layer.hidden.shape[0] == 2  # both guidance branches
            # subject tokens only: fewer than all tokens of both anchors
            assert 0 < layer.index.numel() < 2 * layer.num_tokens
            assert layer.hidden.shape[1] == layer.index.numel()


def test_a_bundle_from_other_settings_is_refused(xl: UNetAdapter) -> None:
    story = jobs(xl)
    _, bundle = StoryRenderer(xl, StorySyncConfig(), settings("tiny-sdxl")).render_anchors(story[:2])
    other = StoryRenderer(xl, StorySyncConfig(rfh_gamma=0.5), settings("tiny-sdxl"))
    with pytest.raises(ValueError, match="config"):
        other.render_frame(story[2], bundle)
