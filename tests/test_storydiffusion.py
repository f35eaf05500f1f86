"""StoryDiffusion's consistent self-attention (a baseline, core/storydiffusion.py) against a plain
reference: a dense softmax over every image's tokens with the log of its attention mask added,
the mask built as the released StoryDiffusion code builds it (``cal_attn_mask_xl``); and the rule of
each pinned release (early steps, skips, one sample per step) against the released processor's
branches, written out as loops."""

from __future__ import annotations

import math

import pytest
import torch

from storysync_dist.core.config import TOKEN_SAMPLINGS
from storysync_dist.core.methods import method_config
from storysync_dist.core.state import layer_id
from storysync_dist.core.storydiffusion import (
    DEFAULT_RELEASE,
    RELEASES,
    anchor_sample,
    consistent_self_attention,
    frame_sample,
    identity_sample,
    layer_skips,
    skip_probability,
    story_sample,
)


def dense_reference(query, key, value, sample, own_identity, num_identity):
    """Loops over images and heads; keys of every identity image and the image itself, -inf
    where the mask says no."""
    b, h, n, d = query.shape  # the identity images come first in the batch, as in StoryDiffusion's
    out = torch.zeros_like(query)
    for i in range(b):
        # StoryDiffusion's row for image i: the shared draw over the identity images' tokens,
        # its own block all True, every non-identity block False.
        allowed = torch.zeros(b, n, dtype=torch.bool)
        allowed[:num_identity] = sample
        if own_identity[i] is not None:
            allowed[own_identity[i]] = True
        allowed[i] = True
        log_mask = torch.where(allowed.reshape(-1), 0.0, -math.inf)
        for head in range(h):
            k_all = key[:, head].reshape(b * n, d)
            v_all = value[:, head].reshape(b * n, d)
            scores = query[i, head] @ k_all.T / math.sqrt(d) + log_mask
            out[i, head] = torch.softmax(scores, dim=-1) @ v_all
    return out


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_consistent_self_attention_matches_the_dense_masked_softmax(rate: float) -> None:
    gen = torch.Generator().manual_seed(3)
    b, identity, h, n, d = 5, 2, 2, 7, 4
    query, key, value = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    sample = identity_sample(identity, n, rate, 11, 3, 42)
    assert sample.shape == (identity, n) and sample.dtype == torch.bool
    # The first two images are the identity images (anchors, rendered together); the rest are frames.
    own = [0, 1, None, None, None]
    ours = consistent_self_attention(query, key, value, key[:identity], value[:identity], sample, own)
    reference = dense_reference(query, key, value, sample, own, identity)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_the_sample_is_seeded_and_keeps_about_rate_of_the_tokens() -> None:
    a = identity_sample(2, 4096, 0.5, 7, 10, 99)
    assert torch.equal(a, identity_sample(2, 4096, 0.5, 7, 10, 99))  # the same draw for the same call
    assert not torch.equal(a, identity_sample(2, 4096, 0.5, 7, 11, 99))  # another step, another draw
    assert abs(a.float().mean().item() - 0.5) < 0.03
    assert not identity_sample(2, 16, 0.0, 1).any() and identity_sample(2, 16, 1.0, 1).all()


def test_each_resolution_takes_its_rate() -> None:
    from storysync_dist.core.storydiffusion import sampling_rate

    rates = {1024: 0.3, 4096: 0.6}
    assert sampling_rate(1024, rates) == 0.3 and sampling_rate(4096, rates) == 0.6
    assert sampling_rate(256, rates) == 0.3 and sampling_rate(16384, rates) == 0.6  # nearest resolution
    assert sampling_rate(1024) == 0.5  # StoryDiffusion's defaults


# ---- the pinned releases: early steps, skips, one sample per step ---------------------------------
def released_allowed(file: str, step: int, random_number: float, sample_row: torch.Tensor, id_length: int,
                     n: int) -> torch.Tensor:
    """The keys each image of [identity images..., one frame] may attend to at one layer call, as the
    released ``SpatialAttnProcessor2_0.__call__`` of ``file`` decides (predict.py at d1244ce, the
    low-VRAM script at 9ad2e39), given that call's ``random.random()`` and the step's
    ``cal_attn_mask_xl`` draw ``sample_row`` ((id_length + 1) * n booleans, one row for every query).
    Returns (id_length + 1, (id_length + 1) * n) booleans over [identity images..., frame]."""
    total = id_length + 1
    early = 5 if file == "predict.py" else 1  # "if cur_step < 5" / "if cur_step < 1"
    allowed = torch.zeros(total, total * n, dtype=torch.bool)
    for i in range(total):
        write = i < id_length  # the identity images render together ("write"), a frame reads the bank
        own = slice(i * n, (i + 1) * n)
        if step < early:
            if file == "predict.py" and not write:
                allowed[i, :] = True  # __call2__ over the whole bank and itself, no mask
            else:
                allowed[i, own] = True  # __call2__(hidden_states, None): plain self-attention
            continue
        rand_num = 0.3 if step < 20 else 0.1
        if random_number > rand_num:  # __call1__ with its row of the mask
            for col in range(total * n):
                allowed[i, col] = bool(sample_row[col]) and col < id_length * n
            allowed[i, own] = True
        else:
            allowed[i, own] = True
    return allowed


def ours_allowed(release: str, seeds: list[int], step: int, layer: int, n: int) -> torch.Tensor:
    """The same matrix from this module: each anchor sees its own block and ``anchor_sample`` of the
    others; the frame sees its own block and ``frame_sample`` (what the anchors publish)."""
    ids = len(seeds)
    allowed = torch.zeros(ids + 1, (ids + 1) * n, dtype=torch.bool)
    among, published = anchor_sample(seeds, step, n, layer, release), frame_sample(seeds, step, n, layer, release)
    for i in range(ids + 1):
        for j in range(ids):
            if j != i:
                allowed[i, j * n:(j + 1) * n] = (among if i < ids else published)[j]
        allowed[i, i * n:(i + 1) * n] = True
    return allowed


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_each_layer_call_follows_the_released_processor(release: str) -> None:
    """Steps 0..29, many layers: the early rule (predict.py: anchors plain and frames see every
    anchor token for steps 0-4; low-VRAM: everyone plain at step 0), then per layer call either
    plain self-attention or the step's sample, one row shared by every query."""
    seeds, n = [5, 9, 13], 12
    file = RELEASES[release].file
    for step in range(30):
        for layer in range(40):
            sample = story_sample(seeds, step, n)
            row = torch.cat([sample.reshape(-1), torch.zeros(n, dtype=torch.bool)])  # the frame's block: unused
            random_number = 0.0 if layer_skips(seeds, step, layer) else 1.0
            want = released_allowed(file, step, random_number, row, len(seeds), n)
            assert torch.equal(ours_allowed(release, seeds, step, layer, n), want), (release, step, layer)


def test_the_release_names_and_the_default() -> None:
    assert set(RELEASES) == set(TOKEN_SAMPLINGS) - {"mask"}
    assert method_config("storydiffusion").token_sampling == DEFAULT_RELEASE == "storydiffusion-predict"
    assert (RELEASES[DEFAULT_RELEASE].file, RELEASES[DEFAULT_RELEASE].commit[:7]) == ("predict.py", "d1244ce")
    low = RELEASES["storydiffusion-lowvram"]
    assert (low.file, low.commit[:7]) == ("gradio_app_sdxl_specific_id_low_vram.py", "9ad2e39")


def test_the_skip_is_drawn_per_layer_call_at_its_rates() -> None:
    """A plain loop over layer calls: each call of a step skips on its own (layers of one
    resolution differ, unlike one draw per resolution), about 0.3 of them before step 20 and 0.1
    after; the draw is a function of (anchor seeds, step, layer)."""
    seeds = [21, 22]
    layers = [layer_id(f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}.attn1.processor")
              for b in range(2) for a in range(3) for t in range(10)]
    early = [[layer_skips(seeds, step, layer) for layer in layers] for step in range(5, 20)]
    late = [[layer_skips(seeds, step, layer) for layer in layers] for step in range(20, 50)]
    assert all(any(calls) and not all(calls) for calls in early)  # per layer call, not per step
    rate = lambda rows: sum(map(sum, rows)) / sum(map(len, rows))  # noqa: E731
    assert abs(rate(early) - 0.3) < 0.03 and abs(rate(late) - 0.1) < 0.02
    assert (skip_probability(5), skip_probability(19), skip_probability(20)) == (0.3, 0.3, 0.1)
    again = [[layer_skips(seeds, step, layer) for layer in layers] for step in range(5, 20)]
    assert again == early
    assert [[layer_skips([21, 23], step, layer) for layer in layers] for step in range(5, 20)] != early


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_one_sample_per_step_and_resolution_and_frames_see_what_anchors_see(release: str) -> None:
    """Every layer call of a step and resolution that does not skip attends to the same sample
    (about half of the tokens, the released rate 0.5), another step draws another one, and at
    every call past the early steps a frame sees exactly what the anchors see of each other."""
    seeds, first = [3, 4], RELEASES[release].first_sampled_step
    for n in (1024, 4096):
        for step in range(first, first + 6):
            draws = [anchor_sample(seeds, step, n, layer, release) for layer in range(30)]
            for layer, draw in enumerate(draws):
                assert torch.equal(frame_sample(seeds, step, n, layer, release), draw)
            kept = [d for d in draws if d.any()]
            assert kept and all(torch.equal(d, kept[0]) for d in kept)
            assert torch.equal(kept[0], story_sample(seeds, step, n))
            assert abs(kept[0].float().mean().item() - 0.5) < 0.05
        assert not torch.equal(story_sample(seeds, first, n), story_sample(seeds, first + 1, n))
