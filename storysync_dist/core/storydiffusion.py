"""StoryDiffusion's consistent self-attention, re-implemented from its paper (Zhou et al. 2024,
"StoryDiffusion: Consistent Self-Attention for Long-Range Image and Video Generation", Sec. 3.1,
Eq. 1-2) and the attention mask of its public code; a baseline of issue 11, not StorySync.

Eq. 1: for image i of a batch, S_i = RandSample(I_1, ..., I_{i-1}, I_{i+1}, ..., I_B) takes a
random subset of the other images' tokens, and P_i = [S_i, I_i]. Eq. 2: O_i = Attention(Q_i,
K_{P_i}, V_{P_i}) with the query of I_i only. There is no subject mask: the sample is drawn from
every token. Its code draws one keep vector per attention call over the identity images' tokens
(a token is kept with probability ``rate``: ``sa32`` / ``sa64`` per resolution, 0.5 by default),
shared by every querying image; an image always sees all of its own tokens, and never the tokens
of a non-identity image. Here the identity images are the story's anchors, so a non-anchor frame
attends to its own tokens and to the sampled anchor tokens only, and frames stay independent.

In the engine (``token_sampling: storydiffusion``, ``--method storydiffusion``) the draw is
:func:`story_sample`: one per story, step and resolution, keyed by the anchors' seeds, as its code
draws one mask per step for the whole batch. The anchors share it among themselves and record only
the kept tokens, so every frame attends to exactly that sample, whatever other frames exist. Its
code also runs a layer as plain self-attention at step 0 and, after that, with probability 0.3
before step 20 and 0.1 from then on (:func:`vanilla_probability`); here that draw too is per story,
step and resolution, so anchors and frames skip the same layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import dropout_seed

KIND_STORYDIFFUSION = 4
# StoryDiffusion's per-resolution sampling rates (its sa32 and sa64, both 0.5 in the released
# demo), by the layer's token count at 1024 px: 32x32 and 64x64 latent patches.
DEFAULT_RATES = {1024: 0.5, 4096: 0.5}


def sampling_rate(num_tokens: int, rates: dict[int, float] | None = None) -> float:
    """The rate of a layer with ``num_tokens`` patches: its own entry of ``rates`` (token count at
    the native size -> rate), else the entry nearest on a log scale (a 512 px render's 16x16 layers
    take the 32x32 rate, as the lowest resolution of the model)."""
    rates = DEFAULT_RATES if rates is None else rates
    if num_tokens in rates:
        return rates[num_tokens]
    nearest = min(rates, key=lambda tokens: abs(math.log(tokens / num_tokens)))
    return rates[nearest]


def identity_sample(num_identity: int, num_tokens: int, rate: float, *seed_parts: int) -> torch.Tensor:
    """Eq. 1's RandSample for one attention call: which identity-image tokens are kept.

    Args:
        num_identity: the identity images (the anchors), I.
        num_tokens: N, the layer's tokens per image.
        rate: the probability that a token is kept.
        seed_parts: integers that identify the draw (story seed, step, layer), as ``core.dropout``.
    Returns:
        (I, N) boolean on the CPU, the same for every querying image.
    """
    generator = torch.Generator(device="cpu").manual_seed(dropout_seed(*seed_parts, KIND_STORYDIFFUSION))
    return torch.rand(num_identity, num_tokens, generator=generator) < rate


def vanilla_probability(step: int) -> float:
    """The probability that StoryDiffusion's code runs a consistent layer as plain self-attention
    at ``step``: always at step 0, 0.3 before step 20, 0.1 after (its ``SpatialAttnProcessor2_0``)."""
    if step < 1:
        return 1.0
    return 0.3 if step < 20 else 0.1


def story_sample(anchor_seeds: list[int], step: int, num_tokens: int, rates: dict[int, float] | None = None) -> torch.Tensor:
    """The identity tokens every image of a story shares at one step and resolution.

    Args:
        anchor_seeds: the story's anchors' seeds (the identity images, in order), the key of the draw.
        step: the denoising step.
        num_tokens: N, the layer's tokens per image.
        rates: token count at the native size -> keep rate (:data:`DEFAULT_RATES`).
    Returns:
        (I, N) boolean on the CPU: :func:`identity_sample` at this resolution's rate, or all False
        when the step runs plain self-attention (:func:`vanilla_probability`).
    """
    generator = torch.Generator(device="cpu").manual_seed(
        dropout_seed(len(anchor_seeds), *anchor_seeds, step, num_tokens, KIND_STORYDIFFUSION, 0))
    if float(torch.rand((), generator=generator)) < vanilla_probability(step):
        return torch.zeros(len(anchor_seeds), num_tokens, dtype=torch.bool)
    return identity_sample(len(anchor_seeds), num_tokens, sampling_rate(num_tokens, rates), *anchor_seeds, step, num_tokens)


def consistent_self_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, identity_key: torch.Tensor,
    identity_value: torch.Tensor, sample: torch.Tensor, own_identity: list[int | None],
) -> torch.Tensor:
    """Eq. 2: each image attends to its own tokens and to the sampled identity tokens (but its own).

    Args:
        query, key, value: (B, H, N, d) the images' own projections.
        identity_key, identity_value: (I, H, N, d) the identity images' keys and values.
        sample: (I, N) boolean, :func:`identity_sample`.
        own_identity: for each of the B images, its index among the identity images (an anchor
            rendering with the others), or None (a frame); an image's own tokens are never taken
            twice.
    Returns:
        (B, H, N, d) the attention output O_i.
    """
    # The sample lives on the CPU: its indices are known there, so gathering needs no device sync.
    kept = [row.nonzero(as_tuple=True)[0].to(identity_key.device) for row in sample.cpu()]
    outputs = []
    for i, own in enumerate(own_identity):
        others = [j for j in range(identity_key.shape[0]) if j != own]
        shared_k = [identity_key[j].index_select(1, kept[j]) for j in others]  # (H, M_j, d)
        shared_v = [identity_value[j].index_select(1, kept[j]) for j in others]
        k = torch.cat([key[i], *shared_k], dim=1)[None]
        v = torch.cat([value[i], *shared_v], dim=1)[None]
        outputs.append(F.scaled_dot_product_attention(query[i : i + 1], k, v))
    return torch.cat(outputs, dim=0)
