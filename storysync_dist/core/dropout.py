"""Seeded dropouts of section 3.3 (shared keys, RFH, subject masks).

A frame must be a pure function of its seed, so each dropout draws from a generator seeded by
(frame seed, step, layer, kind) on the CPU and then moves to the device: the same bits on every
machine and in every batch composition.
"""

from __future__ import annotations

import functools
import hashlib

import torch

KIND_SHARE = 1
KIND_RFH = 2
KIND_MASK = 3
KIND_SHARE_RESOLUTION = 5  # 4 is core/storydiffusion.py's


def dropout_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keep_mask(
    shape: tuple[int, ...] | int, rate: float, *seed_parts: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep-mask: each entry is False with probability ``rate``.

    Args:
        shape: the mask shape.
        rate: dropout probability in [0, 1].
        seed_parts: integers that identify the draw (frame seed, step, layer, kind, ...).
    Returns:
        boolean tensor of ``shape`` on ``device``.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if rate <= 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    generator = torch.Generator(device="cpu").manual_seed(dropout_seed(*seed_parts))
    return (torch.rand(shape, generator=generator) >= rate).to(device)


def resolution_keep(anchor_seeds: list[int], step: int, num_tokens: int, rate: float) -> torch.Tensor:
    """See :func:`_resolution_keep` (cached: every shared layer of a resolution reads the same
    draw, so it is made once per step and resolution; the result is shared, never written)."""
    return _resolution_keep(tuple(int(s) for s in anchor_seeds), step, num_tokens, rate)


@functools.lru_cache(maxsize=64)
def _resolution_keep(anchor_seeds: tuple[int, ...], step: int, num_tokens: int, rate: float) -> torch.Tensor:
    """Share dropout drawn once per step and resolution (``share_dropout_scope: resolution``, as
    ConsiStory's release draws ``last_mask_dropout``): which of each anchor's N tokens every layer of
    that resolution and every querying image may attend to.

    Row j is keyed by (anchor j's seed, step, N) only, so anchors and the frames that read their
    bundle (on any process) draw the same bits without shipping them.

    Args:
        anchor_seeds: the A anchors' seeds, in bundle order.
        step: the denoising step.
        num_tokens: N, the layer's patch count (its resolution).
        rate: dropout probability in [0, 1].
    Returns:
        (A, N) boolean keep-mask on the CPU.
    """
    if not anchor_seeds:
        return torch.ones(0, num_tokens, dtype=torch.bool)
    return torch.stack([keep_mask(num_tokens, rate, seed, step, num_tokens, KIND_SHARE_RESOLUTION)
                        for seed in anchor_seeds])
