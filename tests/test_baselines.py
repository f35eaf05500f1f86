"""The baselines of issue 11 (``--method consistory|storydiffusion``) through the real processor on
a real diffusers ``Attention``, each against a plain reference written here: loops and a dense
softmax with a log-mask, on random tensors."""

from __future__ import annotations

import pytest
import torch

from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.core.config import ConfigError, StorySyncConfig
from storysync_dist.core.dropout import KIND_SHARE, keep_mask
from storysync_dist.core.methods import BASELINES, METHODS, method_config, uses_anchors
from storysync_dist.core.state import ROLE_ANCHORS, ROLE_FRAMES, StorySyncState, layer_id
from storysync_dist.core.storydiffusion import consistent_self_attention, story_sample, vanilla_probability
from storysync_dist.models.unet import StorySyncSelfAttnProcessor
from tests.test_core_math import make_attention, reference_rfh, reference_self_attention

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
    with pytest.raises(ConfigError, match="token_sampling"):
        StorySyncConfig(token_sampling="storydiffusion")  # it samples without a subject mask
    with pytest.raises(ValueError, match="storysync"):
        method_config("storysync")


# ---- StoryDiffusion: consistent self-attention, its Eq. 1-2 ------------------------------------
def _sampled_step(seeds: list[int], n: int) -> int:
    """A step at which the story's draw shares tokens (not one of its plain self-attention steps)."""
    return next(t for t in range(1, 50) if story_sample(seeds, t, n).any())


def test_storydiffusion_story_sample_is_seeded_and_skips_like_its_code() -> None:
    seeds, n = [3, 4], 64
    assert vanilla_probability(0) == 1.0 and vanilla_probability(5) == 0.3 and vanilla_probability(30) == 0.1
    assert not story_sample(seeds, 0, n).any()  # step 0 is always plain self-attention
    draws = [story_sample(seeds, t, n) for t in range(1, 201)]
    assert all(torch.equal(a, story_sample(seeds, t, n)) for t, a in zip(range(1, 201), draws))
    plain = sum(not d.any() for d in draws[:19]) / 19, sum(not d.any() for d in draws[19:]) / 181
    assert plain[1] < 0.25 and sum(not d.any() for d in draws) > 0  # about 0.3 before step 20, 0.1 after
    kept = torch.stack([d for d in draws if d.any()]).float().mean()
    assert 0.45 < float(kept) < 0.55  # its sa32/sa64 rate of 0.5


def test_storydiffusion_anchors_and_frames_attend_to_the_story_sample() -> None:
    """Anchors: own tokens + the other anchor's sampled tokens; they publish exactly the sample,
    and a frame then attends to its own tokens + every sampled anchor token: Eq. 2 with
    ``consistent_self_attention`` and with a dense softmax over the gathered keys."""
    attn = make_attention()
    n, dim, seeds, steps = 16, 16, [7, 8], 30
    config = method_config("storydiffusion")
    step = _sampled_step(seeds, n)
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


def test_storydiffusion_plain_steps_are_stock_attention() -> None:
    attn = make_attention()
    n, dim = 16, 16
    anchors = _state(method_config("storydiffusion"), ROLE_ANCHORS, [1, 2], 30)
    x = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(22))
    out = StorySyncSelfAttnProcessor(LAYER, anchors, shares=True)(attn, x)  # step 0
    for i in range(2):
        expected = attn.to_out[0](reference_self_attention(attn, x[i], None, None))
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)


# ---- ConsiStory: SDSA, vanilla query blending, feature injection --------------------------------
def test_consistory_frame_sdsa_with_query_blending_matches_reference() -> None:
    """In the first 10% of the steps the frame's queries are 0.1 Q_sdsa + 0.9 Q_vanilla, and it
    attends to its own tokens and to the anchors' subject tokens its 0.5 dropout keeps."""
    attn = make_attention()
    n, dim, steps = 16, 16, 20
    config = method_config("consistory")
    gen = torch.Generator().manual_seed(23)
    anchors = _state(config, ROLE_ANCHORS, [1, 2], steps)
    assert anchors.bli_steps == 2 and config.first_shared_step() == 1  # masks from the previous step
    anchors.step = 1
    anchors.set_subject_map(torch.rand(2, n, generator=gen), (4, 4))
    xa = torch.randn(4, n, dim, generator=gen)  # rows: [vanilla a1, a2, consistent a1, a2]
    StorySyncSelfAttnProcessor(LAYER, anchors, shares=True)(attn, xa)
    layer = anchors.published[1].layers[LAYER]
    assert torch.equal(layer.index, anchors.masks(n).reshape(-1).nonzero(as_tuple=True)[0])

    bundle = AnchorBundle(meta={"num_anchors": 2}, steps=dict(anchors.published))
    frame = _state(config, ROLE_FRAMES, [5], steps, bundle=bundle)
    frame.step = 1
    frame.set_subject_map(torch.rand(1, n, generator=gen), (4, 4))
    x = torch.randn(2, n, dim, generator=gen)  # rows: [vanilla, consistent]
    out = StorySyncSelfAttnProcessor(LAYER, frame, shares=True)(attn, x)
    keep = keep_mask(layer.index.numel(), 0.5, 5, 1, layer_id(LAYER), KIND_SHARE)
    shared = layer.hidden[0].float()[keep]
    blended = 0.1 * attn.to_q(x[1]) + 0.9 * attn.to_q(x[0])
    expected = attn.to_out[0](reference_self_attention(attn, x[1], shared, None, query=blended))
    # Feature injection starts at 10% of the steps (step 2 of 20): not at step 1.
    torch.testing.assert_close(out[1], expected, rtol=1e-3, atol=1e-4)


def test_consistory_feature_injection_runs_in_its_window_only() -> None:
    """Nearest-neighbour feature injection, alpha 0.8, at steps [10%, 33%) of the run only."""
    n, c, steps = 24, 8, 30
    gen = torch.Generator().manual_seed(24)
    state = _state(method_config("consistory"), ROLE_ANCHORS, [1, 2], steps)
    features = torch.randn(2, n, c, generator=gen, dtype=torch.float64)
    masks = torch.rand(2, n, generator=gen) > 0.4
    for step in range(steps):
        state.step = step
        got = state.harmonize(LAYER, features, [slice(0, 2)], masks)
        if not 3 <= step < 10:
            assert torch.equal(got, features), step
            continue
        for i in range(2):
            ref = features[1 - i][masks[1 - i]]
            expected = reference_rfh(features[i], masks[i], [ref], 0.8, state.config.rfh_tau,
                                     torch.ones(n, dtype=torch.bool))
            torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)
