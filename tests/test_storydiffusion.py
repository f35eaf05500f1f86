"""StoryDiffusion's consistent self-attention (a baseline, core/storydiffusion.py) against a plain
reference: a dense softmax over every image's tokens with the log of its attention mask added,
the mask built as the released StoryDiffusion code builds it (``cal_attn_mask_xl``)."""

from __future__ import annotations

import math

import pytest
import torch

from storysync_dist.core.storydiffusion import consistent_self_attention, identity_sample


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
