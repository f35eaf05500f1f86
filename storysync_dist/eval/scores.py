"""Scoring one story: per-frame prompt adherence and per-story subject consistency (issue 11).

* CLIP-T per frame: cosine of the full frame's CLIP image embedding with its prompt's text embedding
  (Radford et al. 2021, as DreamBooth and ConsiStory); per story, the mean over its frames.
* CLIP-I, DINO, LPIPS, DreamSim per story: the mean over the unordered pairs of its frames
  (``pairwise.py``), on the frames with their background removed (rembg, ``background.py``) when a
  remover is given, so that the subject is compared and not the scene.
* ``oracle`` (toyworld renders only, ``oracle.py``): per frame ``oracle_adherent`` (1.0/0.0),
  ``oracle_identity`` (the subject's ``colour/pattern/accessory`` or None) and
  ``oracle_background``; per story ``identity_consistency``, ``adherence`` and
  ``background_leakage``.

Column names use underscores (``clip_t``); a metric that was not requested is NaN, except the
oracle's columns, which are None (null) then: its NaN means "no pair" or "no eligible frame". ``score_names`` gives the names of the per-story scores of a list of
metrics (``oracle`` has three: ``identity-consistency``, ``adherence``, ``background-leakage``),
under which ``summary.json`` keeps their means over stories; a score's column is
``column_name(name)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .background import BackgroundRemover
from .encoders import ORACLE, SUBJECT_METRICS, Encoders, dreamsim_distance, validate_metrics
from .oracle import ORACLE_FRAME_COLUMNS, ORACLE_SCORES, ORACLE_STORY_COLUMNS, score_oracle
from .pairwise import cosine_per_frame, mean_pairwise_cosine, mean_pairwise_distance

__all__ = ["FRAME_COLUMNS", "STORY_COLUMNS", "FrameForEval", "column_name", "score_names", "score_story"]

FRAME_COLUMNS = ("story_id", "frame_id", "prompt", "clip_t", *ORACLE_FRAME_COLUMNS)
STORY_COLUMNS = ("story_id", "num_frames", "clip_t", "clip_i", "dino", "lpips", "dreamsim", *ORACLE_STORY_COLUMNS,
                 "plumbing_check")


@dataclass(frozen=True)
class FrameForEval:
    """One rendered frame of a story, with the prompt it was rendered from; ``is_anchor``: the
    dataset's flag (None when unknown), used by the oracle's background leakage."""

    story_id: str
    frame_id: str
    prompt: str
    image: Image.Image
    is_anchor: bool | None = None


def column_name(metric: str) -> str:
    """The table column of a metric or score: ``clip-t`` → ``clip_t``."""
    return metric.replace("-", "_")


def score_names(metrics: Sequence[str]) -> tuple[str, ...]:
    """The per-story scores of ``metrics``, in order: each metric is its own score, except
    ``oracle``, which is ``identity-consistency``, ``adherence`` and ``background-leakage``.
    Names that are already scores pass through."""
    return tuple(name for m in metrics for name in (ORACLE_SCORES if m == ORACLE else (m,)))


def score_story(
    frames: list[FrameForEval], encoders: Encoders, remover: BackgroundRemover | None, metrics: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score the frames of one story with the requested ``metrics``.

    Returns the per-frame rows (``FRAME_COLUMNS``) and the story's row (``STORY_COLUMNS``). Subject
    metrics are computed on ``remover.remove(frame)`` when ``remover`` is given, else on the frames
    themselves; a story of one frame has no pair, so its subject metrics are NaN. ``oracle`` reads
    the frames themselves (``oracle.score_oracle``); a prompt outside toyworld's grammar is a
    ``StorySyncUserError`` naming the story and frame.
    """
    chosen = validate_metrics(metrics)
    if not frames:
        raise ValueError("score_story: a story needs at least one frame")
    story_ids = {f.story_id for f in frames}
    if len(story_ids) != 1:
        raise ValueError(f"score_story: frames of several stories {sorted(story_ids)}")
    not_loaded = [m for m in chosen if m not in encoders.metrics]
    if not_loaded:
        raise ValueError(f"score_story: encoders were not loaded for {not_loaded}")

    nan = float("nan")
    images = [f.image for f in frames]
    # The oracle first: a prompt outside toyworld's grammar fails before any encoder runs.
    oracle_frames: list[dict[str, Any]] = [dict.fromkeys(ORACLE_FRAME_COLUMNS) for _ in frames]
    oracle_story: dict[str, float | None] = dict.fromkeys(ORACLE_STORY_COLUMNS)
    if ORACLE in chosen:
        oracle_frames, oracle_story = score_oracle(
            frames[0].story_id, [f.frame_id for f in frames], [f.prompt for f in frames], images,
            [f.is_anchor for f in frames])

    clip_t = [nan] * len(frames)
    if "clip-t" in chosen:
        per_frame = cosine_per_frame(
            encoders.clip_image_embeddings(images), encoders.text_embeddings([f.prompt for f in frames])
        )
        clip_t = [float(v) for v in per_frame]

    scores = dict.fromkeys(SUBJECT_METRICS, nan)
    subject = [m for m in chosen if m in SUBJECT_METRICS]
    if subject:
        subjects = [remover.remove(im) for im in images] if remover is not None else images
        if "clip-i" in subject:
            scores["clip-i"] = mean_pairwise_cosine(encoders.clip_image_embeddings(subjects))
        if "dino" in subject:
            scores["dino"] = mean_pairwise_cosine(encoders.dino_embeddings(subjects))
        if "lpips" in subject:
            pixels = list(encoders.lpips_pixels(subjects))
            scores["lpips"] = mean_pairwise_distance(pixels, encoders.lpips_distance_pixels)
        if "dreamsim" in subject:
            embeddings = list(encoders.dreamsim_embeddings(subjects))
            scores["dreamsim"] = mean_pairwise_distance(embeddings, dreamsim_distance)

    rows = [
        {"story_id": f.story_id, "frame_id": f.frame_id, "prompt": f.prompt, "clip_t": v, **o}
        for f, v, o in zip(frames, clip_t, oracle_frames)
    ]
    story = {
        "story_id": frames[0].story_id,
        "num_frames": len(frames),
        "clip_t": math.fsum(clip_t) / len(clip_t) if "clip-t" in chosen else nan,
        **{column_name(m): scores[m] for m in SUBJECT_METRICS},
        **oracle_story,
        "plumbing_check": bool(encoders.plumbing_check or (remover is not None and remover.plumbing_check)),
    }
    return rows, story
