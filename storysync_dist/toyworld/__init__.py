"""Toyworld: the procedural world of the quality instrument (issue 21), numpy and PIL only.

``world`` defines the classes, identities, backgrounds, places, the prompt grammar and the
renderer of training pictures with exact masks; ``oracle`` reads any picture back into classes,
places, identities and background.
"""

from .oracle import Found, FrameScore, Reading, read_image, score_frame
from .world import Identity, Placed, Scene, identities, prompt_of, random_scene, render, scene_of_prompt

__all__ = [
    "Found",
    "FrameScore",
    "Identity",
    "Placed",
    "Reading",
    "Scene",
    "identities",
    "prompt_of",
    "random_scene",
    "read_image",
    "render",
    "scene_of_prompt",
    "score_frame",
]
