"""Base Layout Interpolation, BLI (paper Eq. 12)."""

from __future__ import annotations

import torch

from .bli_schedule import BLI_WINDOWS, bli_schedule

__all__ = ["BLI_WINDOWS", "bli_schedule", "interpolate_layout"]


def interpolate_layout(consistent: torch.Tensor, vanilla: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 12: X_final = (1 - lambda) X_consistent + lambda X_vanilla.

    Args:
        consistent: (..., N, C) self-attention output of the consistent branch.
        vanilla: same shape, the vanilla branch's output at the same layer and step.
        lam: lambda.
    Returns:
        the interpolated output, same shape.
    """
    return torch.lerp(consistent, vanilla, lam)
