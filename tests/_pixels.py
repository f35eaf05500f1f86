"""The two pixel tolerances of the suite, and the one way to render a reference as a Ray worker.

**Ray against one process** (``assert_same_pixels``, ``like_a_ray_worker``). A frame is a pure
function of its inputs (DESIGN.md, "Determinism"), but CPU float sums round differently with
another number of torch threads, and on the tiny random-weight models that can move pixels far
(tiny-kandinsky3's *stock* frames of examples/story.yaml differ by about 18 levels on average, 229 at
most, at 1 against 2 threads, with the hub's scheduler config; docs/testing.md). So a
reference is rendered exactly as a Ray worker renders: with ``WORKER_THREADS`` torch threads (Ray
sets OMP_NUM_THREADS to an actor's CPU count, 1 for a FrameWorker; ``assert_worker_threads``
checks that the workers of a job ran so). With the same thread count both sides run the same
kernels, and the tolerance only covers the last bits: at most ``RAY_MAX_LEVELS`` on any value and
a mean under ``RAY_MEAN_LEVELS``.

**A batch against its batch-of-one renders** (``assert_within_batch_tolerance``, docs/memory.md,
"Frame batching"): a larger batch changes how the float sums of a layer are blocked, so the last
bits differ, and on the tiny random test models an RFH match that is a near tie can flip and move
a few pixels by several levels. Real frames differ by less.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch
from PIL import Image

WORKER_THREADS = 1  # torch threads of a FrameWorker: Ray's OMP_NUM_THREADS for a 1-CPU actor
RAY_MAX_LEVELS = 2  # Ray against one process: no value further off than this (levels of 255)
RAY_MEAN_LEVELS = 0.05  # ... and a mean |difference| under this

MEAN_LEVELS = 0.5  # a batch: mean |difference| over every channel value, in levels of 255
FAR_LEVELS = 2  # a value further off than this counts as far
FAR_SHARE = 0.01  # at most this share of the values may be far


@contextmanager
def like_a_ray_worker() -> Iterator[None]:
    """Render in this process as a Ray FrameWorker renders: ``WORKER_THREADS`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess that renders a reference as a Ray worker does."""
    return {**(env if env is not None else os.environ), "OMP_NUM_THREADS": str(WORKER_THREADS)}


def assert_worker_threads(stats: Mapping[str, Any]) -> None:
    """Every worker of a job (``result.stats``) rendered with ``WORKER_THREADS`` threads, as the
    references do: otherwise a pixel comparison would fail for the wrong reason."""
    workers = [s for s in stats.get("worker_stats", []) if s]
    assert workers and all(s["threads"] == WORKER_THREADS for s in workers), workers


def frame_pixels(out: str | Path, *, by_story: bool = False) -> dict[Any, np.ndarray]:
    """The frames of a dataset folder as int16 arrays, keyed by frame id (or (story, frame))."""
    rows = pads.dataset(str(Path(out) / "data"), format="parquet").to_table(
        columns=["story_id", "frame_id", "image"]).to_pylist()
    keys = [(r["story_id"], r["frame_id"]) if by_story else r["frame_id"] for r in rows]
    assert len(keys) == len(set(keys)), "a frame is in the dataset twice"
    return {k: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).astype(np.int16) for k, r in zip(keys, rows)}


def assert_same_pixels(got: Mapping[Any, np.ndarray], want: Mapping[Any, np.ndarray]) -> None:
    """The same frames, each equal to its reference within the Ray tolerance."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        diff = np.abs(np.asarray(got[key]).astype(np.int16) - np.asarray(want[key]).astype(np.int16))
        assert diff.max() <= RAY_MAX_LEVELS and diff.mean() < RAY_MEAN_LEVELS, (key, int(diff.max()), float(diff.mean()))


def batch_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |a - b|, share of values more than FAR_LEVELS apart) of two uint8 images."""
    diff = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
    return float(diff.mean()), float((diff > FAR_LEVELS).mean())


def assert_within_batch_tolerance(a: np.ndarray, b: np.ndarray, what: object = "") -> None:
    mean, far = batch_difference(a, b)
    assert mean <= MEAN_LEVELS and far <= FAR_SHARE, (what, mean, far)
