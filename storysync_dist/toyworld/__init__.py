"""Toyworld: the procedural world of the quality instrument (issue 21), numpy and PIL only.

``world`` defines the classes, identities, backgrounds, places, the prompt grammar and the
renderer of training pictures with exact masks; ``oracle`` reads any picture back into classes,
places, identities and background.
"""

import os
import pathlib

from .oracle import Found, FrameScore, Reading, read_image, score_frame
from .world import Identity, Placed, Scene, identities, prompt_of, random_scene, render, scene_of_prompt

__all__ = [
    "MODEL_ENV",
    "Found",
    "FrameScore",
    "Identity",
    "Placed",
    "Reading",
    "Scene",
    "identities",
    "model_folder",
    "prompt_of",
    "random_scene",
    "read_image",
    "render",
    "scene_of_prompt",
    "score_frame",
]

# Where the `toyworld` preset's pipeline folder is: the one shipped in this package, unless this
# variable names another (a checkpoint being validated, or the short training run of the tests).
MODEL_ENV = "STORYSYNC_TOYWORLD_MODEL"


def model_folder() -> pathlib.Path:
    """The `toyworld` preset's pipeline folder: ``$STORYSYNC_TOYWORLD_MODEL``, else ``model/`` here."""
    override = os.environ.get(MODEL_ENV)
    return pathlib.Path(override).expanduser() if override else pathlib.Path(__file__).with_name("model")
