"""The baselines of issue 11 (``--method consistory|storydiffusion``) through the real processor on
a real diffusers ``Attention``, each against a plain reference written here: loops and a dense
softmax with a log-mask, on random tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _replay import replayed
from _stories import cat_job
from diffusers.models.attention_processor import AttnProcessor2_0

from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.core.config import ConfigError, StorySyncConfig
from storysync_dist.core.dropout import resolution_keep
from storysync_dist.core.methods import BASELINES, METHODS, method_config, uses_anchors
from storysync_dist.core.state import ROLE_ANCHORS, ROLE_FRAMES, StorySyncState, layer_id
from storysync_dist.core.storydiffusion import (
    RELEASES,
    consistent_self_attention,
    frame_sample,
    layer_skips,
    story_sample,
)
from storysync_dist.engine.renderer import RenderSettings, StoryRenderer
from storysync_dist.models.attention import StorySyncSelfAttnProcessor
from storysync_dist.models.presets import load_pipeline
from storysync_dist.models.unet import UNetAdapter
from tests.test_core_math import make_attention, reference_self_attention

torch.set_grad_enabled(False)

LAYER = "up_blocks.0.attn1.processor"


def _state(config: StorySyncConfig, role: str, seeds: list[int], num_steps: int,
           bundle: AnchorBundle | None = None) -> StorySyncState:
    return StorySyncState(
        config.with_layers(("up_blocks",), ("up_blocks",)), role=role, seeds=seeds,
        token_positions=[[[1]] for _ in seeds], latent_hw=(4, 4), num_steps=num_steps, guidance=False,
        bundle=bundle,
    )


def test_methods_and_their_configs() -> None:
    assert METHODS == ("storysync", "vanilla", "consistory", "storydiffusion")
    assert not uses_anchors("vanilla") and all(uses_anchors(m) for m in ("storysync", *BASELINES))
    assert not method_config("vanilla").any_mechanism
    sd = method_config("storydiffusion")
    assert sd.share_attention and not sd.use_masks and not sd.harmonize and not sd.layout_interpolation
    assert sd.token_sampling == "storydiffusion-predict"  # the pinned release (core/storydiffusion.py)
    for release in RELEASES:
        with pytest.raises(ConfigError, match="token_sampling"):
            StorySyncConfig(token_sampling=release)  # it samples without a subject mask
        assert StorySyncConfig(token_sampling=release, use_masks=False).token_sampling == release
    with pytest.raises(ConfigError, match="must be one of"):
        StorySyncConfig(token_sampling="storydiffusion", use_masks=False)  # which release: name it
    with pytest.raises(ValueError, match="storysync"):
        method_config("storysync")


# ---- StoryDiffusion: consistent self-attention, its Eq. 1-2 ------------------------------------
def _sampled_step(seeds: list[int], layer: str, skipped: bool = False) -> int:
    """A step past the pinned release's early steps at which the layer call attends to the step's
    sample (or, ``skipped``, runs plain self-attention); the draws and their rates are checked
    against the released processor in test_storydiffusion.py."""
    return next(t for t in range(5, 50) if layer_skips(seeds, t, layer_id(layer)) == skipped)


def _anchors_then_frame(config: StorySyncConfig, layer: str, step: int, x: torch.Tensor, y: torch.Tensor,
                        seeds: list[int], steps: int = 30):
    """The anchors (x: (A, N, C)) render one layer call at ``step`` and publish it; one frame (y:
    (1, N, C)) renders the same call against that bundle. Returns (attention, anchors' output, the
    published layer, frame's output)."""
    attn = make_attention()
    anchors = _state(config, ROLE_ANCHORS, seeds, steps)
    anchors.step = step
    out = StorySyncSelfAttnProcessor(layer, anchors, shares=True)(attn, x)
    bundle = AnchorBundle(meta={"num_anchors": len(seeds)}, steps=dict(anchors.published))
    frame = _state(config, ROLE_FRAMES, [99], steps, bundle=bundle)
    frame.step = step
    got = StorySyncSelfAttnProcessor(layer, frame, shares=True)(attn, y)
    return attn, out, anchors.published[step].layers[layer], got


def test_storydiffusion_anchors_and_frames_attend_to_the_story_sample() -> None:
    """Anchors: own tokens + the other anchor's sampled tokens; they publish exactly the sample,
    and a frame then attends to its own tokens + every sampled anchor token: Eq. 2 with
    ``consistent_self_attention`` and with a dense softmax over the gathered keys."""
    attn = make_attention()
    n, dim, seeds, steps = 16, 16, [7, 8], 30
    config = method_config("storydiffusion")
    step = _sampled_step(seeds, LAYER)
    sample = story_sample(seeds, step, n)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, n, dim, generator=gen)

    anchors = _state(config, ROLE_ANCHORS, seeds, steps)
    anchors.step = step
    out = StorySyncSelfAttnProcessor(LAYER, anchors, shares=True)(attn, x)
    heads = attn.heads
    split = lambda t: t.view(t.shape[0], n, heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    core = consistent_self_attention(q, k, v, k, v, sample, own_identity=[0, 1])
    for i in range(2):
        j = 1 - i
        expected = attn.to_out[0](reference_self_attention(attn, x[i], x[j][sample[j]], None))
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
        merged = core[i].transpose(0, 1).reshape(n, -1)
        torch.testing.assert_close(out[i], attn.to_out[0](merged), rtol=1e-4, atol=1e-5)
    published = anchors.published[step].layers[LAYER]
    assert torch.equal(published.index, sample.reshape(-1).nonzero(as_tuple=True)[0])

    bundle = AnchorBundle(meta={"num_anchors": 2}, steps=dict(anchors.published))
    frame = _state(config, ROLE_FRAMES, [99], steps, bundle=bundle)
    frame.step = step
    y = torch.randn(1, n, dim, generator=gen)
    got = StorySyncSelfAttnProcessor(LAYER, frame, shares=True)(attn, y)
    identity = x.reshape(-1, dim)[published.index].half().float()  # the bundle keeps float16
    expected = attn.to_out[0](reference_self_attention(attn, y[0], identity, None))
    torch.testing.assert_close(got[0], expected, rtol=1e-3, atol=1e-4)
    # Another frame seed sees the very same tokens: the sample is the story's, not the frame's.
    other = _state(config, ROLE_FRAMES, [12345], steps, bundle=bundle)
    other.step = step
    torch.testing.assert_close(StorySyncSelfAttnProcessor(LAYER, other, shares=True)(attn, y), got)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_storydiffusion_early_steps_follow_the_release(release: str) -> None:
    """predict.py, steps 0-4: the anchors run stock self-attention, publish every token, and a frame
    attends to its own tokens and all of them, unsampled. The low-VRAM script, step 0: stock
    self-attention for anchors and frames, nothing published."""
    n, dim, seeds = 16, 16, [1, 2]
    config = method_config("storydiffusion").replace(token_sampling=release)
    gen = torch.Generator().manual_seed(22)
    for step in range(RELEASES[release].first_sampled_step):
        x, y = torch.randn(2, n, dim, generator=gen), torch.randn(1, n, dim, generator=gen)
        attn, out, published, got = _anchors_then_frame(config, LAYER, step, x, y, seeds)
        for i in range(2):
            expected = attn.to_out[0](reference_self_attention(attn, x[i], None, None))
            torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
        if RELEASES[release].early_frames_see_all:
            assert torch.equal(published.index, torch.arange(2 * n))
            identity = x.reshape(-1, dim).half().float()  # every anchor token; the bundle keeps float16
        else:
            assert published.index.numel() == 0
            identity = None
        expected = attn.to_out[0](reference_self_attention(attn, y[0], identity, None))
        torch.testing.assert_close(got[0], expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_storydiffusion_skips_per_layer_call_alike_in_anchors_and_frames(release: str) -> None:
    """At one step past the early ones, a layer call the story's draw skips is stock self-attention
    for the anchors (nothing published) and so for the frame; another layer of the same resolution
    at the same step that does not skip shares the step's sample in both."""
    n, dim, seeds = 16, 16, [7, 8]
    config = method_config("storydiffusion").replace(token_sampling=release)
    other = "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"
    step = next(t for t in range(5, 50)
                if layer_skips(seeds, t, layer_id(LAYER)) and not layer_skips(seeds, t, layer_id(other)))
    gen = torch.Generator().manual_seed(24)
    x, y = torch.randn(2, n, dim, generator=gen), torch.randn(1, n, dim, generator=gen)
    attn, out, published, got = _anchors_then_frame(config, LAYER, step, x, y, seeds)
    assert published.index.numel() == 0
    for row, image in ((out[0], x[0]), (out[1], x[1]), (got[0], y[0])):
        torch.testing.assert_close(row, attn.to_out[0](reference_self_attention(attn, image, None, None)),
                                   rtol=1e-4, atol=1e-5)
    attn, out, published, got = _anchors_then_frame(config, other, step, x, y, seeds)
    sample = story_sample(seeds, step, n)
    assert torch.equal(published.index, sample.reshape(-1).nonzero(as_tuple=True)[0])
    for i in range(2):
        shared = x[1 - i][sample[1 - i]]
        torch.testing.assert_close(out[i], attn.to_out[0](reference_self_attention(attn, x[i], shared, None)),
                                   rtol=1e-4, atol=1e-5)
    identity = x.reshape(-1, dim)[published.index].half().float()
    torch.testing.assert_close(got[0], attn.to_out[0](reference_self_attention(attn, y[0], identity, None)),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_storydiffusion_renders_on_tiny_sdxl_as_its_release(release: str) -> None:
    """End to end through the renderer (tiny-sdxl, 8 steps: the early ones and sampled ones): every
    StoryDiffusion layer call of the anchors' and a frame's render equals the plain reference of
    _references.py, the anchors publish at each step and layer exactly what the release lets a
    frame see, and the frame has the same pixels when rendered again in a fresh renderer after
    another frame."""
    adapter = UNetAdapter(load_pipeline("tiny-sdxl"))
    config = method_config("storydiffusion").replace(token_sampling=release)
    settings = RenderSettings("tiny-sdxl", 8, 64, 64, 5.0)
    story = [cat_job(adapter, i, s, 100 + i) for i, s in enumerate(["on a beach", "in a kitchen", "on a roof"])]
    renderer = StoryRenderer(adapter, config, settings)
    with replayed(adapter) as replay:
        _, bundle = renderer.render_anchors(story[:2])
        first = renderer.render_frame(story[2], bundle)
    replay.assert_match()
    assert replay.shared_keys(ROLE_ANCHORS) > 0 and replay.shared_keys(ROLE_FRAMES) > 0
    early = RELEASES[release].first_sampled_step
    assert sorted(bundle.steps) == list(range(8)) and {c.step for c in replay.calls} >= set(range(8))
    for step, anchor_step in bundle.steps.items():
        assert anchor_step.layers
        for name, layer in anchor_step.layers.items():
            want = frame_sample([100, 101], step, layer.num_tokens, layer_id(name), release)
            assert torch.equal(layer.index, want.reshape(-1).nonzero(as_tuple=True)[0]), (step, name)
            if step < early:
                assert layer.index.numel() == (2 * layer.num_tokens if RELEASES[release].early_frames_see_all else 0)
    fresh = StoryRenderer(adapter, config, settings)
    fresh.render_frame(story[1], bundle)
    again = fresh.render_frame(story[2], bundle)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))


# ---- ConsiStory: SDSA, vanilla query blending, feature injection --------------------------------
def test_consistory_frame_sdsa_with_query_blending_matches_reference() -> None:
    """At a blending step (1 of 20 steps: its window is steps 1..20//10) the frame's queries are
    (1 - s) Q_sdsa + s Q_vanilla with s = linspace(0.9, 0.81836735, 3)[1], and it attends to its own
    tokens and to the anchors' subject tokens that their one draw per step and resolution keeps."""
    attn = make_attention()
    n, dim, steps = 16, 16, 20
    config = method_config("consistory")
    gen = torch.Generator().manual_seed(23)
    anchors = _state(config, ROLE_ANCHORS, [1, 2], steps)
    assert anchors.bli_steps == 3 and config.first_shared_step() == 1  # masks from earlier steps
    assert list(anchors.bli_schedule) == [1, 2]
    anchors.step = 1
    anchors.set_subject_map(torch.rand(2, n, generator=gen), (4, 4))
    xa = torch.randn(4, n, dim, generator=gen)  # rows: [vanilla a1, a2, consistent a1, a2]
    StorySyncSelfAttnProcessor(LAYER, anchors, shares=True)(attn, xa)
    layer = anchors.published[1].layers[LAYER]
    assert torch.equal(layer.index, anchors.masks(n).reshape(-1).nonzero(as_tuple=True)[0])

    bundle = AnchorBundle(meta={"num_anchors": 2, "anchor_seeds": [1, 2]}, steps=dict(anchors.published))
    frame = _state(config, ROLE_FRAMES, [5], steps, bundle=bundle)
    frame.step = 1
    frame.set_subject_map(torch.rand(1, n, generator=gen), (4, 4))
    x = torch.randn(2, n, dim, generator=gen)  # rows: [vanilla, consistent]
    out = StorySyncSelfAttnProcessor(LAYER, frame, shares=True)(attn, x)
    keep = resolution_keep([1, 2], 1, n, 0.5).reshape(-1)[layer.index]  # the anchors' draw, not the frame's
    shared = layer.hidden[0].float()[keep]
    s = float(np.linspace(0.9, 0.81836735, 3)[1])
    blended = (1 - s) * attn.to_q(x[1]) + s * attn.to_q(x[0])
    expected = attn.to_out[0](reference_self_attention(attn, x[1], shared, None, query=blended))
    torch.testing.assert_close(out[1], expected, rtol=1e-3, atol=1e-4)


def test_consistory_feature_injection_runs_in_pass_two_in_its_window_only() -> None:
    """The real processor injects (core/consistory.py, checked against loops in
    tests/test_consistory_injection.py) into the attention output of a layer at the finest
    resolution, in pass 2 and at steps n//10..n//3 only; elsewhere it is stock attention."""
    attn = make_attention()
    n, dim, steps = 16, 16, 30
    gen = torch.Generator().manual_seed(24)
    config = method_config("consistory").replace(share_attention=False, layout_interpolation=False)
    state = _state(config, ROLE_ANCHORS, [1, 2], steps)
    x = torch.randn(2, n, dim, generator=gen)
    processor = StorySyncSelfAttnProcessor("down_blocks.1.attn1.processor", state, shares=False)
    stock = AttnProcessor2_0()(attn, x)
    torch.testing.assert_close(processor(attn, x), stock)  # pass 1: it only learns the resolution
    assert state.injection.tokens == n
    state.injection.record_dift(torch.randn(2, 8, 4, 4, generator=gen))
    state._last_map = (torch.rand(2, n, generator=gen), (4, 4))
    state.begin_second_pass()
    injected_steps = []
    for step in range(steps):
        state.step = step
        got = processor(attn, x)
        if not torch.equal(got, stock):
            injected_steps.append(step)
            torch.testing.assert_close(got, state.injection.inject(stock, None, None))
    assert injected_steps == list(range(3, 11))
