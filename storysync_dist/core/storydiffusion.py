"""StoryDiffusion's consistent self-attention, re-implemented from its paper (Zhou et al. 2024,
"StoryDiffusion: Consistent Self-Attention for Long-Range Image and Video Generation", Sec. 3.1,
Eq. 1-2) and pinned to one release of its code; a baseline of issue 11, not StorySync.

Eq. 1: for image i of a batch, S_i = RandSample(I_1, ..., I_{i-1}, I_{i+1}, ..., I_B) takes a
random subset of the other images' tokens, and P_i = [S_i, I_i]. Eq. 2: O_i = Attention(Q_i,
K_{P_i}, V_{P_i}) with the query of I_i only. There is no subject mask: the sample is drawn from
every token. Its code draws one keep vector per step over the identity images' tokens (a token is
kept with probability ``rate``: ``sa32`` / ``sa64`` per resolution, 0.5), shared by every querying
image; an image always sees all of its own tokens, and never the tokens of a non-identity image.
Here the identity images are the story's anchors, so a non-anchor frame attends to its own tokens
and to the anchors' tokens only, and frames stay independent.

Which release (:data:`RELEASES`, chosen by ``token_sampling``): ``storydiffusion-predict`` (the
default, ``--method storydiffusion``) follows HVision-NKU/StoryDiffusion ``predict.py`` at commit
d1244ce4543259a21f7b91be8d3f139a334e5de7: for steps 0-4 the identity images run plain
self-attention while every other image attends to all identity tokens, unsampled; from step 5 on
each layer call runs plain self-attention with probability 0.3 before step 20 and 0.1 after
(:func:`skip_probability`), else attends to the step's sample. ``storydiffusion-lowvram``
follows ``gradio_app_sdxl_specific_id_low_vram.py`` at commit
9ad2e39571545b5ee3563d815c03a28b36a52fba: step 0 plain for every image, the same skip rule
from step 1 on.

In the engine the draws are keyed by the anchors' seeds, so a frame's pixels depend only on its own
inputs and its anchors: the sample per story, step and resolution (:func:`story_sample`, as the
code draws one per step), the skip per story, step and layer (:func:`layer_skips`, as the code
draws one per layer call). The anchors attend to :func:`anchor_sample` among themselves and
publish :func:`frame_sample`, what every frame attends to, so anchors and frames skip the same
layer calls and every frame sees exactly the sample its anchors drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dropout import dropout_seed

KIND_STORYDIFFUSION = 4
# StoryDiffusion's per-resolution sampling rates (its sa32 and sa64: 0.5 in both pinned releases),
# by the layer's token count at 1024 px: 32x32 and 64x64 latent patches.
DEFAULT_RATES = {1024: 0.5, 4096: 0.5}


@dataclass(frozen=True)
class Release:
    """The rule of one released StoryDiffusion script (file at commit, HVision-NKU/StoryDiffusion).

    Attributes:
        file, commit: where the rule is read.
        first_sampled_step: steps before it follow the early rule, with no skip draw.
        early_frames_see_all: the early rule for the non-identity images: attend to every identity
            token (True), or plain self-attention as the identity images (False).
    """

    file: str
    commit: str
    first_sampled_step: int
    early_frames_see_all: bool


# The ``token_sampling`` values that select a release (core/config.py lists the same names).
RELEASES = {
    "storydiffusion-predict": Release("predict.py", "d1244ce4543259a21f7b91be8d3f139a334e5de7", 5, True),
    "storydiffusion-lowvram": Release(
        "gradio_app_sdxl_specific_id_low_vram.py", "9ad2e39571545b5ee3563d815c03a28b36a52fba", 1, False),
}
DEFAULT_RELEASE = "storydiffusion-predict"


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


def skip_probability(step: int) -> float:
    """The probability that a layer call from the release's first sampled step on runs plain
    self-attention: 0.3 before step 20, 0.1 after (its ``SpatialAttnProcessor2_0``, one
    ``random.random()`` per call)."""
    return 0.3 if step < 20 else 0.1


def layer_skips(anchor_seeds: list[int], step: int, layer: int) -> bool:
    """Whether one layer call runs plain self-attention (:func:`skip_probability`), drawn per
    story, step and layer, so the anchors and every frame draw the same.

    Args:
        anchor_seeds: the story's anchors' seeds, the key of the draw.
        step: the denoising step.
        layer: the layer's id (``core.state.layer_id`` of its processor name).
    """
    generator = torch.Generator(device="cpu").manual_seed(
        dropout_seed(len(anchor_seeds), *anchor_seeds, step, layer, KIND_STORYDIFFUSION, 1))
    return float(torch.rand((), generator=generator)) < skip_probability(step)


def story_sample(anchor_seeds: list[int], step: int, num_tokens: int, rates: dict[int, float] | None = None) -> torch.Tensor:
    """The identity tokens every image of a story shares at one step and resolution (its code's
    ``cal_attn_mask_xl``: one draw per step, shared by every query and every layer of a resolution).

    Args:
        anchor_seeds: the story's anchors' seeds (the identity images, in order), the key of the draw.
        step: the denoising step.
        num_tokens: N, the layer's tokens per image.
        rates: token count at the native size -> keep rate (:data:`DEFAULT_RATES`).
    Returns:
        (I, N) boolean on the CPU: :func:`identity_sample` at this resolution's rate.
    """
    return identity_sample(len(anchor_seeds), num_tokens, sampling_rate(num_tokens, rates), *anchor_seeds, step, num_tokens)


def _sampled(anchor_seeds: list[int], step: int, layer: int, release: str) -> bool:
    """Whether a layer call attends to the step's sample: past the early steps and not skipped."""
    return step >= RELEASES[release].first_sampled_step and not layer_skips(anchor_seeds, step, layer)


def anchor_sample(anchor_seeds: list[int], step: int, num_tokens: int, layer: int, release: str = DEFAULT_RELEASE,
                  rates: dict[int, float] | None = None) -> torch.Tensor:
    """The tokens of the other identity images that each identity image (anchor) attends to at one
    layer call: the step's sample, or none at an early step and at a skipped call.

    Args:
        anchor_seeds, step, num_tokens, rates: as :func:`story_sample`.
        layer: the layer's id, as :func:`layer_skips`.
        release: a key of :data:`RELEASES`.
    Returns:
        (I, N) boolean on the CPU.
    """
    if _sampled(anchor_seeds, step, layer, release):
        return story_sample(anchor_seeds, step, num_tokens, rates)
    return torch.zeros(len(anchor_seeds), num_tokens, dtype=torch.bool)


def frame_sample(anchor_seeds: list[int], step: int, num_tokens: int, layer: int, release: str = DEFAULT_RELEASE,
                 rates: dict[int, float] | None = None) -> torch.Tensor:
    """The identity tokens a non-identity image (a frame) attends to at one layer call, which the
    anchors publish: at an early step all of them (``predict.py``) or none (low-VRAM); none at a
    skipped call; else the step's sample, the one the anchors attend to.

    Args:
        as :func:`anchor_sample`.
    Returns:
        (I, N) boolean on the CPU.
    """
    if step < RELEASES[release].first_sampled_step:
        return torch.full((len(anchor_seeds), num_tokens), RELEASES[release].early_frames_see_all)
    return anchor_sample(anchor_seeds, step, num_tokens, layer, release, rates)


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
