"""The pixel tolerance of a frame rendered in a batch against its batch-of-one render
(docs/memory.md, "Frame batching"): a larger batch changes how the float sums of a layer are
blocked, so the last bits differ, and on the tiny random test models an RFH match that is a near
tie can flip and move a few pixels by several levels. Real frames differ by less."""

from __future__ import annotations

import numpy as np

MEAN_LEVELS = 0.5  # mean |difference| over every channel value, in levels of 255
FAR_LEVELS = 2  # a value further off than this counts as far
FAR_SHARE = 0.01  # at most this share of the values may be far


def batch_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |a - b|, share of values more than FAR_LEVELS apart) of two uint8 images."""
    diff = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
    return float(diff.mean()), float((diff > FAR_LEVELS).mean())


def assert_within_batch_tolerance(a: np.ndarray, b: np.ndarray, what: object = "") -> None:
    mean, far = batch_difference(a, b)
    assert mean <= MEAN_LEVELS and far <= FAR_SHARE, (what, mean, far)
