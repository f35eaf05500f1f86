"""Toyworld stories: the quality instrument's benchmark suites, drawn from the world's grammar.

A story follows one subject, a class noun (``ball``), through five frames. Every frame names the
subject first, so the suite has the ConsiStory+ shape (``story.load_benchmark``: the prompt is
"{subject} {setting}", the subject token is the noun): "a ball on the left in the forest", "a ball
right of a tent on the beach". The frames vary what a story method must not copy from its anchors
(the first two frames):
- the background: the five frames cover all four backgrounds, the anchors two distinct ones, so
  at least two later frames ask for a background no anchor has (background leakage shows there);
- the place, and a companion of another class in about half the frames (its own identity is
  free: a method that copies the subject's identity onto it leaks identity).

The identity is never named, so a vanilla model draws one per seed.

Two splits with disjoint seeds: ``toyworld-tune`` to choose constants on, ``toyworld`` (the test
split) for the published tables. Each is 24 stories, six per class.
"""

from __future__ import annotations

import numpy as np

from .world import BACKGROUNDS, CLASSES, PLACES

__all__ = ["FRAMES", "SPLITS", "STORIES", "story_sets", "suite_document"]

SPLITS = {"toyworld": 20261206, "toyworld-tune": 20261207}  # suite name -> its seed
STORIES = 24
FRAMES = 5
CATEGORY = "toyworld"


def _where(background: str) -> str:
    return "on the beach" if background == "beach" else f"in the {background}"


def _setting(rng: np.random.Generator, cls: str, background: str) -> str:
    """What follows "a {cls}" in one frame's prompt (``world.prompt_of``'s grammar)."""
    if rng.random() < 0.5:
        place = str(rng.choice(list(PLACES)))
        return f"{'in the middle' if place == 'middle' else f'on the {place}'} {_where(background)}"
    companion = str(rng.choice([c for c in CLASSES if c != cls]))
    return f"{rng.choice(['left', 'right'])} of a {companion} {_where(background)}"


def story_sets(seed: int, stories: int = STORIES, frames: int = FRAMES) -> list[dict[str, object]]:
    """``stories`` subject sets (the classes in turn), each with ``frames`` settings."""
    rng = np.random.default_rng(seed)
    sets = []
    for index in range(stories):
        cls = CLASSES[index % len(CLASSES)]
        backgrounds = list(rng.permutation(list(BACKGROUNDS)))
        backgrounds += [str(rng.choice(list(BACKGROUNDS))) for _ in range(frames - len(backgrounds))]
        sets.append({"concept_token": cls, "subject": f"a {cls}", "style": "",
                     "settings": [_setting(rng, cls, str(b)) for b in backgrounds[:frames]]})
    return sets


def suite_document(name: str) -> dict[str, list[dict[str, object]]]:
    """The suite ``name`` (a key of ``SPLITS``) in the ConsiStory+ shape: one category."""
    return {CATEGORY: story_sets(SPLITS[name])}
