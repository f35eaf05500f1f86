"""How the consistency metrics of issue 11 reduce to one number per story, as the papers report
them (ConsiStory, StoryDiffusion, StorySync Table 1): subject similarity (CLIP-I, DINO, LPIPS,
DreamSim) is the mean over every unordered pair of the story's frames; prompt adherence (CLIP-T)
is per frame, then the story's mean. Pure tensor code: the encoders are elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["cosine_per_frame", "mean_pairwise", "mean_pairwise_cosine", "mean_pairwise_distance"]


def mean_pairwise(scores: torch.Tensor) -> float:
    """The mean of ``scores[i, j]`` over the unordered pairs i < j of a symmetric (F, F) matrix.

    A story of fewer than two frames has no pair: NaN, which the tables show as missing.
    """
    frames = scores.shape[0]
    if scores.shape != (frames, frames):
        raise ValueError(f"mean_pairwise: a square matrix is needed, not {tuple(scores.shape)}")
    if frames < 2:
        return float("nan")
    upper = torch.triu_indices(frames, frames, offset=1)
    return float(scores[upper[0], upper[1]].double().mean())


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """CLIP-I and DINO: the mean cosine similarity of the (F, D) image embeddings over frame pairs."""
    unit = F.normalize(features.double(), dim=-1)
    return mean_pairwise(unit @ unit.T)


def mean_pairwise_distance(images: list[torch.Tensor], distance: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """LPIPS and DreamSim: the mean of ``distance(a, b)`` over the unordered pairs of frames."""
    frames = len(images)
    scores = torch.zeros(frames, frames, dtype=torch.float64)
    for i in range(frames):
        for j in range(i + 1, frames):
            scores[i, j] = scores[j, i] = distance(images[i], images[j])
    return mean_pairwise(scores)


def cosine_per_frame(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP-T: the cosine similarity of each frame's (F, D) image embedding with its prompt's."""
    return F.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
