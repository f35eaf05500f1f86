"""Which denoising steps Base Layout Interpolation (BLI, Eq. 12) blends at, and with what weight.

Plain Python, no torch: the config (``StorySyncConfig.bli_schedule``) uses it, and the story
checks import the config without loading torch.
"""

from __future__ import annotations

import math

# Which steps BLI blends at (``StorySyncConfig.bli_window``): see ``bli_schedule``.
BLI_WINDOWS = ("leading", "while_sharing")


def bli_schedule(
    num_steps: int,
    fraction: float,
    lam: float,
    lam_end: float | None = None,
    window: str = "leading",
    first_step: int = 0,
) -> dict[int, float]:
    """The steps at which BLI blends (Eq. 12) and its weight lambda at each.

    The window spans steps ``0 .. last`` (K = last + 1 steps):
      - ``"leading"`` (StorySync): the first K = min(steps, round(fraction * steps)) steps;
      - ``"while_sharing"`` (ConsiStory's release: its QueryStore's ``t_range = [0, steps // 10]``,
        inclusive): last = min(steps - 1, floor(fraction * steps)).
    Blending runs at the window's steps ``i >= first_step`` (``"leading"``: every one, from step 0;
    ``"while_sharing"``: from the first step that shares, ``StorySyncConfig.first_shared_step()``,
    as the release blends only where its shared attention runs, steps >= 1). The weight at step i
    is ``lam`` (``lam_end`` None), else ``numpy.linspace(lam, lam_end, K)[i]``: indexed by the
    absolute step, so the window's first points are skipped when blending starts later.

    Args:
        num_steps: the run's denoising steps.
        fraction: ``bli_fraction``, in [0, 1].
        lam, lam_end: ``bli_lambda`` and ``bli_lambda_end`` (weights of the vanilla branch).
        window: ``bli_window``.
        first_step: the first step BLI may blend at (used by ``"while_sharing"`` only).
    Returns:
        {step: lambda} in step order; empty when no step blends. For example 50 steps, fraction
        0.1, lambda 0.9 -> 0.81836735, ``"while_sharing"`` from step 1: {1: 0.88367347,
        2: 0.86734694, 3: 0.85102041, 4: 0.83469388, 5: 0.81836735}, that is
        ``linspace(0.9, 0.81836735, 6)[1:]``.
    """
    if window not in BLI_WINDOWS:
        raise ValueError(f"bli window must be one of {', '.join(BLI_WINDOWS)}, not {window!r}")
    if num_steps <= 0:
        return {}
    if window == "leading":
        count = min(num_steps, round(fraction * num_steps))
        start = 0
    else:
        count = min(num_steps - 1, math.floor(fraction * num_steps + 1e-9)) + 1
        start = max(0, first_step)
    if count <= 0:
        return {}

    def weight(i: int) -> float:
        if lam_end is None or count == 1:
            return float(lam)
        if i == count - 1:
            return float(lam_end)  # numpy.linspace ends on its stop exactly
        return float(lam + (lam_end - lam) / (count - 1) * i)

    return {i: weight(i) for i in range(start, count)}
