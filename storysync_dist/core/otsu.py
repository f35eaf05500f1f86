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
        values: (..., N) real tensor: a threshold per row of its last dim (any leading dims,
            strided views included: nothing is copied into a 2-D layout).
        nbins: histogram bins (skimage's default is 256).
        within: optional boolean broadcastable to ``values``: the threshold of each row's
            ``True`` entries only, as if the others were not there (a dense form of
            ``values[within]``: no ``nonzero``, so the host never waits for the device). A row with
            no such entry is constant.
    Returns:
        (...) thresholds in ``values.dtype`` (a constant row returns its lowest value) and (...)
        booleans: the row is constant (its entries, or those ``within``, are all equal).
    """
    # Non-finite values (a diverging fp16 render) count as 0 so binning cannot index out of range;
    # such a render is refused when it ends (NonFiniteOutputError), never recorded.
    x64 = values.to(torch.float64).nan_to_num(0.0, 0.0, 0.0)
    if within is None:
        lo, hi = x64.amin(dim=-1, keepdim=True), x64.amax(dim=-1, keepdim=True)
        weight = torch.ones_like(x64)
    else:
        # A row with nothing within has lo = +inf and hi = -inf: no positive span, so constant.
        lo = torch.where(within, x64, torch.inf).amin(dim=-1, keepdim=True)
        hi = torch.where(within, x64, -torch.inf).amax(dim=-1, keepdim=True)
        weight = within.to(torch.float64).expand(x64.shape)
    span = hi - lo
    spread = span > 0
    safe_span = torch.where(spread, span, 1.0)
    # Same binning as numpy.histogram with range=(min, max): the last bin includes its right edge.
    # (An empty row's infinities clamp into range; its threshold is its lo.)
    idx = ((x64 - lo) / safe_span * nbins).floor().clamp_(0, nbins - 1).long()
    counts = torch.zeros((*x64.shape[:-1], nbins), dtype=torch.float64, device=x64.device)
    counts.scatter_add_(-1, idx, weight)
    centers = lo + _half_steps(nbins, x64.device) * (safe_span / nbins)

    # Class weights and means for every split; bin 0 and bin nbins-1 always hold the min and the
    # max, so no weight below is zero (outside constant rows, whose threshold is lo).
    weight1 = counts.cumsum(-1)  # weight (count) up to and including each bin
    moment1 = (counts * centers).cumsum(-1)
    w1, m1 = weight1[..., :-1], moment1[..., :-1]  # the class up to bin k, for each split k
    w2, m2 = weight1[..., -1:] - w1, moment1[..., -1:] - m1  # the class above it
    between = w1 * w2 * (m1 / w1 - m2 / w2) ** 2
    threshold = centers.gather(-1, between.argmax(dim=-1, keepdim=True))
    threshold = torch.where(spread, threshold, lo).squeeze(-1).to(values.dtype)
    return threshold, ~spread.squeeze(-1)


_HALF_STEPS: dict[tuple[int, str], torch.Tensor] = {}


def _half_steps(nbins: int, device: torch.device) -> torch.Tensor:
    """[0.5, 1.5, ..., nbins - 0.5] in float64 on ``device``: the bin centres' offsets, made once."""
    key = (nbins, str(device))
    found = _HALF_STEPS.get(key)
    if found is None:
        found = _HALF_STEPS[key] = torch.arange(nbins, device=device, dtype=torch.float64) + 0.5
    return found


def otsu_foreground(values: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Boolean foreground ``values > otsu_threshold(values)`` per row; shapes as ``values``."""
    return values > otsu_threshold(values, nbins).unsqueeze(-1)
