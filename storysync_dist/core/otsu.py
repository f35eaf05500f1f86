"""Otsu's threshold in torch, batched, on the device (used for the subject masks of Eq. 2-4 and
for the match-score gate of RFH, Eq. 9-11).

It follows ``skimage.filters.threshold_otsu`` for float input: a 256-bin histogram over
[min, max] of each row and the bin centre that maximizes the between-class variance, so a mask
is ``x > threshold``.
"""

from __future__ import annotations

import torch


def otsu_threshold(values: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Otsu threshold of each row.

    Args:
        values: (B, N) or (N,) real tensor.
        nbins: histogram bins (skimage's default is 256).
    Returns:
        (B,) or () thresholds in ``values.dtype``; a constant row returns its value.
    """
    squeeze = values.ndim == 1
    x = values.reshape(1, -1) if squeeze else values
    x64 = x.to(torch.float64)
    # Non-finite values (a diverging fp16 render) count as 0 so binning cannot index out of range;
    # such a render is refused when it ends (NonFiniteOutputError), never recorded.
    x64 = torch.where(torch.isfinite(x64), x64, torch.zeros_like(x64))
    lo = x64.amin(dim=1, keepdim=True)
    hi = x64.amax(dim=1, keepdim=True)
    span = hi - lo
    constant = span.squeeze(1) == 0
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    # Same binning as numpy.histogram with range=(min, max): the last bin includes its right edge.
    idx = ((x64 - lo) / safe_span * nbins).floor().clamp_(0, nbins - 1).long()
    counts = torch.zeros(x.shape[0], nbins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(x64))
    centers = lo + (torch.arange(nbins, device=x.device, dtype=torch.float64) + 0.5) * (safe_span / nbins)

    # Class weights and means for every split; bin 0 and bin nbins-1 always hold the min and the
    # max, so no weight below is zero.
    weight1 = counts.cumsum(1)
    weight2 = counts.flip(1).cumsum(1).flip(1)
    mean1 = (counts * centers).cumsum(1) / weight1
    mean2 = (counts * centers).flip(1).cumsum(1).flip(1) / weight2
    between = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    best = between.argmax(dim=1)
    threshold = centers.gather(1, best[:, None]).squeeze(1)
    threshold = torch.where(constant, lo.squeeze(1), threshold).to(values.dtype)
    return threshold[0] if squeeze else threshold


def otsu_foreground(values: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Boolean foreground ``values > otsu_threshold(values)`` per row; shapes as ``values``."""
    thr = otsu_threshold(values, nbins)
    return values > (thr if values.ndim == 1 else thr[:, None])
