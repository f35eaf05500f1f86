"""Seeded dropouts of section 3.3 (shared keys, RFH, subject masks).

A frame must be a pure function of its seed, so each dropout draws from a generator seeded by
(frame seed, step, layer, kind) on the CPU and then moves to the device: the same bits on every
machine and in every batch composition.
"""

from __future__ import annotations

import hashlib

import torch

KIND_SHARE = 1
KIND_RFH = 2
KIND_MASK = 3


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
