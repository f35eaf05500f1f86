"""Otsu's threshold in torch, batched, on the device (used for the subject masks of Eq. 2-4 and
for the match-score gate of RFH, Eq. 9-11).

It follows ``skimage.filters.threshold_otsu`` for float input: a 256-bin histogram over
[min, max] of each row and the bin centre that maximizes the between-class variance, so a mask
is ``x > threshold``.
"""

from __future__ import annotations

import torch


def otsu_threshold(values: torch.Tensor, nbins: int = 256, within: torch.Tensor | None = None) -> torch.Tensor:
    """Otsu threshold of each row (see :func:`otsu_split`)."""
    return otsu_split(values, nbins, within)[0]


def otsu_split(
    values: torch.Tensor, nbins: int = 256, within: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu threshold of each row, and whether the row is constant.

    Args:
        values: (B, N) or (N,) real tensor.
        nbins: histogram bins (skimage's default is 256).
        within: optional boolean of ``values``' shape: the threshold of each row's ``True``
            entries only, as if the others were not there (a dense form of ``values[within]``:
            no ``nonzero``, so the host never waits for the device). A row with no such entry
            is constant.
    Returns:
        (B,) or () thresholds in ``values.dtype`` (a constant row returns its value), and (B,) or
        () booleans: the row is constant (its entries, or those ``within``, are all equal).
    """
    squeeze = values.ndim == 1
    x = values.reshape(1, -1) if squeeze else values
    x64 = x.to(torch.float64)
    # Non-finite values (a diverging fp16 render) count as 0 so binning cannot index out of range;
    # such a render is refused when it ends (NonFiniteOutputError), never recorded.
    x64 = torch.where(torch.isfinite(x64), x64, torch.zeros_like(x64))
    if within is None:
        lo = x64.amin(dim=1, keepdim=True)
        hi = x64.amax(dim=1, keepdim=True)
        weight = torch.ones_like(x64)
    else:
        inside = within.reshape(x.shape)
        lo = torch.where(inside, x64, torch.inf).amin(dim=1, keepdim=True)
        hi = torch.where(inside, x64, -torch.inf).amax(dim=1, keepdim=True)
        empty = ~inside.any(dim=1, keepdim=True)
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        weight = inside.to(torch.float64)
    span = hi - lo
    constant = span.squeeze(1) == 0
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    # Same binning as numpy.histogram with range=(min, max): the last bin includes its right edge.
    idx = ((x64 - lo) / safe_span * nbins).floor().clamp_(0, nbins - 1).long()
    counts = torch.zeros(x.shape[0], nbins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, idx, weight)
    centers = lo + (torch.arange(nbins, device=x.device, dtype=torch.float64) + 0.5) * (safe_span / nbins)

    # Class weights and means for every split; bin 0 and bin nbins-1 always hold the min and the
    # max, so no weight below is zero (outside constant rows, whose threshold is lo).
    weight1 = counts.cumsum(1)  # weight (count) up to and including each bin
    moment1 = (counts * centers).cumsum(1)
    w1, m1 = weight1[:, :-1], moment1[:, :-1]  # the class up to bin k, for each split k
    w2, m2 = weight1[:, -1:] - w1, moment1[:, -1:] - m1  # the class above it
    between = w1 * w2 * (m1 / w1 - m2 / w2) ** 2
    best = between.argmax(dim=1)
    threshold = centers.gather(1, best[:, None]).squeeze(1)
    threshold = torch.where(constant, lo.squeeze(1), threshold).to(values.dtype)
    return (threshold[0], constant[0]) if squeeze else (threshold, constant)


def otsu_foreground(values: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Boolean foreground ``values > otsu_threshold(values)`` per row; shapes as ``values``."""
    thr = otsu_threshold(values, nbins)
    return values > (thr if values.ndim == 1 else thr[:, None])
