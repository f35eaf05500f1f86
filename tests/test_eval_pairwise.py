"""Per-story reduction of the consistency metrics (eval/pairwise.py) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from storysync_dist.eval.pairwise import (
    cosine_per_frame,
    mean_pairwise,
    mean_pairwise_cosine,
    mean_pairwise_distance,
)


def test_mean_pairwise_averages_the_unordered_pairs() -> None:
    scores = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.9], [0.4, 0.9, 1.0]])
    assert mean_pairwise(scores) == pytest.approx((0.2 + 0.4 + 0.9) / 3)  # the diagonal never counts
    assert math.isnan(mean_pairwise(torch.ones(1, 1)))
    with pytest.raises(ValueError):
        mean_pairwise(torch.ones(2, 3))


def test_mean_pairwise_cosine_is_the_mean_of_the_pairs_cosines() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(4, 8, generator=gen)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    by_hand = sum(float(features[i] @ features[j] / (features[i].norm() * features[j].norm())) for i, j in pairs) / 6
    assert mean_pairwise_cosine(features) == pytest.approx(by_hand, abs=1e-6)
    assert mean_pairwise_cosine(torch.ones(3, 5) * torch.tensor([[1.0], [2.0], [3.0]])) == pytest.approx(1.0)
    assert -1.0 <= mean_pairwise_cosine(torch.randn(5, 3, generator=gen)) <= 1.0


def test_mean_pairwise_distance_calls_each_unordered_pair_once() -> None:
    images = [torch.full((3, 2, 2), float(k)) for k in range(4)]
    calls = []

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        calls.append((float(a[0, 0, 0]), float(b[0, 0, 0])))
        return float((a - b).abs().mean())

    # |i - j| over the 6 pairs of 0..3: 1+2+3+1+2+1 = 10.
    assert mean_pairwise_distance(images, distance) == pytest.approx(10 / 6)
    assert len(calls) == 6 and len(set(calls)) == 6


def test_cosine_per_frame_pairs_each_frame_with_its_own_prompt() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(cosine_per_frame(image, text), torch.tensor([1.0, 1 / math.sqrt(2)], dtype=torch.float64))
