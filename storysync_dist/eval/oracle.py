"""The ``oracle`` metric of ``storysync eval``: toyworld renders scored by the world's own oracle.

The quality instrument's metric (docs/quality.md): ``toyworld.oracle`` reads each 64 x 64 frame
back into its background and objects (class, place, identity = colour/pattern/accessory) with the
world's palette and shapes; no learned model, no weights, numpy only. It applies to toyworld
renders only: every frame prompt must be in the world's grammar (``toyworld.world.scene_of_prompt``),
else a one-line ``StorySyncUserError`` names the story and frame (exit 2).

Definitions, for one story of ``F`` frames in frame order:

* **subject class**: the most common first-named class over the story's frame prompts (toyworld
  story prompts name the subject first); a tie goes to the class the earliest frame names among
  the tied ones (the first frame's, when it is one of them).
* per frame: ``oracle_adherent`` (1.0 or 0.0): the background read is the one prompted and the
  objects read are exactly the prompted classes in their places; ``oracle_identity``: the label
  ``colour/pattern/accessory`` of the subject-class object read (the first the oracle lists,
  regions largest first, if several), None
  when the oracle found no object of the subject class; ``oracle_background``: the background
  read (None when the border matches no named background).
* ``identity_consistency``: over all ``F (F - 1) / 2`` unordered pairs of frames, the fraction
  whose subject identities are equal; a pair where either frame has no subject counts as unequal;
  NaN for one frame. Chance is 1/36 (``toyworld.world.chance_consistency``). Higher is more
  consistent.
* ``adherence``: the mean of ``oracle_adherent`` over the frames. Higher is better.
* ``background_leakage``: the anchors are the frames flagged ``is_anchor`` in the dataset; when
  none is flagged (the column is absent, or the method renders without anchors, as ``vanilla``),
  the first two frames (a benchmark set's anchors). Eligible: the non-anchor frames whose prompted
  background differs from at least one anchor's prompted background. Leakage: the fraction of the
  eligible frames whose background read is not their own prompted one but equals some anchor's
  prompted background; NaN when no frame is eligible. Lower is better.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import StorySyncUserError, one_line

__all__ = [
    "ORACLE_FRAME_COLUMNS", "ORACLE_SCORES", "ORACLE_STORY_COLUMNS", "anchor_positions", "background_leakage",
    "identity_consistency", "score_oracle", "subject_class", "toyworld_scenes",
]

ORACLE_FRAME_COLUMNS = ("oracle_adherent", "oracle_identity", "oracle_background")
ORACLE_STORY_COLUMNS = ("identity_consistency", "adherence", "background_leakage")
# Their names in summary.json's means and bench's rows (as "clip-t" is clip_t's).
ORACLE_SCORES = tuple(c.replace("_", "-") for c in ORACLE_STORY_COLUMNS)
DEFAULT_ANCHORS = 2  # a benchmark set's anchors: its first two frames


def toyworld_scenes(story_id: str, frame_ids: Sequence[str], prompts: Sequence[str]) -> list[Any]:
    """Each frame prompt's ``toyworld.world.Scene`` (what it asks for); a prompt outside the
    world's grammar is a one-line ``StorySyncUserError`` naming the story and the frame."""
    from ..toyworld.world import scene_of_prompt

    scenes = []
    for index, (frame_id, prompt) in enumerate(zip(frame_ids, prompts)):
        try:
            scenes.append(scene_of_prompt(prompt))
        except ValueError as exc:
            raise StorySyncUserError(
                f"--metrics oracle: story {story_id} frame {frame_id} (index {index}): {one_line(exc)}; "
                "the oracle scores toyworld renders only (docs/quality.md)") from None
    return scenes


def subject_class(first_classes: Sequence[str]) -> str:
    """The story's subject class from each frame's first-named class, in frame order: the most
    common; among tied classes, the one the earliest frame names."""
    counts = Counter(first_classes)
    best = max(counts.values())
    return next(c for c in first_classes if counts[c] == best)


def anchor_positions(is_anchor: Sequence[bool | None] | None, frames: int) -> list[int]:
    """The positions of the story's anchors: the frames flagged True, else the first two."""
    flagged = [i for i, flag in enumerate(is_anchor or ()) if flag]
    return flagged or list(range(min(DEFAULT_ANCHORS, frames)))


def identity_consistency(identities: Sequence[str | None]) -> float:
    """The fraction of unordered frame pairs whose subject identities are equal (None, no subject,
    equals nothing); NaN with fewer than two frames."""
    pairs = list(itertools.combinations(identities, 2))
    if not pairs:
        return math.nan
    return sum(a is not None and a == b for a, b in pairs) / len(pairs)


def background_leakage(wanted: Sequence[str], read: Sequence[str | None], anchors: Sequence[int]) -> float:
    """Among the non-anchor frames whose prompted background (``wanted``) differs from at least one
    anchor's, the fraction whose background ``read`` is not their own but an anchor's prompted
    one; NaN when no frame is eligible."""
    anchor_backgrounds = {wanted[a] for a in anchors}
    eligible = [i for i in range(len(wanted)) if i not in anchors and anchor_backgrounds - {wanted[i]}]
    if not eligible:
        return math.nan
    leaked = sum(read[i] != wanted[i] and read[i] in anchor_backgrounds for i in eligible)
    return leaked / len(eligible)


def score_oracle(story_id: str, frame_ids: Sequence[str], prompts: Sequence[str], images: Sequence[Any],
                 is_anchor: Sequence[bool | None] | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Score one story's frames (``images``: PIL images or ``(H, W, 3)`` uint8 arrays, any size; the
    oracle reads them at 64 x 64). Returns one dict per frame (``ORACLE_FRAME_COLUMNS``) and the
    story's scores (``ORACLE_STORY_COLUMNS``), as defined in the module docstring."""
    from ..toyworld.oracle import score_frame

    scenes = toyworld_scenes(story_id, frame_ids, prompts)
    subject = subject_class([scene.objects[0].cls for scene in scenes])
    frames: list[dict[str, Any]] = []
    read: list[str | None] = []
    for image, prompt in zip(images, prompts):
        pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        score = score_frame(pixels, prompt, subject)
        read.append(score.background)
        frames.append({"oracle_adherent": 1.0 if score.adherent else 0.0,
                       "oracle_identity": score.subject.label() if score.subject is not None else None,
                       "oracle_background": score.background})
    anchors = anchor_positions(is_anchor, len(frames))
    story = {
        "identity_consistency": identity_consistency([f["oracle_identity"] for f in frames]),
        "adherence": math.fsum(f["oracle_adherent"] for f in frames) / len(frames),
        "background_leakage": background_leakage([s.background for s in scenes], read, anchors),
    }
    return frames, story
