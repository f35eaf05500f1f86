"""The methods ``--method`` chooses: StorySync, stock generation, and two baselines re-implemented
from their papers as configurations of the same mechanisms, so every method runs through the same
anchor/frame path, in one process or on Ray, on the same prompts, seeds and model.

- ``storysync``: the paper's method (the story's ``storysync:`` section, ``--ablation``, ``--set``).
- ``vanilla``: every mechanism off, bit-for-bit the stock diffusers pipeline.
- ``consistory``: a re-implementation of ConsiStory (Tewel et al., "Training-Free Consistent
  Text-to-Image Generation", SIGGRAPH 2024), from its Sec. 3 and the constants of its released
  code: subject-driven shared self-attention (SDSA, its Eq. 1-2: each image attends to its own
  tokens and to the other images' subject tokens) in the decoder layers, with masks from the
  previous step's cross-attention maps and a 0.5 dropout of the shared subject patches (its
  "self-attention dropout"); vanilla query blending (Sec. 3.2) in the first 10% of the steps with
  weight 0.9 on the vanilla queries; feature injection (Sec. 3.3: subject patches blended with
  their nearest-neighbour patch in the anchors, alpha 0.8) in the 10%..33% window of the steps.
- ``storydiffusion``: a re-implementation of StoryDiffusion's consistent self-attention (Zhou et
  al. 2024, Sec. 3.1, Eq. 1-2): each image attends to its own tokens and to a random sample of the
  identity images' tokens (every token, no mask) at its per-resolution rates, in the decoder
  layers as its code does; the identity images are the story's anchors (``core.storydiffusion``).

Where the baselines' own code differs from what a frame-independent renderer can do, the choice
made here is written in ``docs/evaluation.md`` (section "Baselines").
"""

from __future__ import annotations

from typing import Any

from .config import StorySyncConfig

__all__ = ["BASELINES", "METHODS", "method_config", "uses_anchors"]

# Every mechanism of each baseline as StorySync config values; the layers stay the model family's
# default (UNet: the decoder, "up_blocks", where both baselines share).
BASELINES: dict[str, dict[str, Any]] = {
    "consistory": {
        "share_attention": True, "use_masks": True, "mask_source": "previous",
        "share_dropout": 0.5, "mask_dropout": 0.0,  # its mask_dropout=0.5 drops shared subject patches
        "layout_interpolation": True, "bli_target": "query", "bli_lambda": 0.9, "bli_fraction": 0.1,
        "harmonize": True, "rfh_gamma": 0.8, "rfh_start": 0.1, "rfh_end": 1 / 3, "rfh_dropout": 0.0,
    },
    "storydiffusion": {
        "share_attention": True, "use_masks": False, "token_sampling": "storydiffusion",
        "share_dropout": 0.0, "mask_dropout": 0.0,
        "layout_interpolation": False, "harmonize": False, "rfh_dropout": 0.0,
    },
}
METHODS = ("storysync", "vanilla", *BASELINES)


def uses_anchors(method: str) -> bool:
    """Whether the method's frames render against anchors (every method but ``vanilla``)."""
    return method != "vanilla"


def method_config(method: str) -> StorySyncConfig:
    """The fixed config of ``vanilla`` or a baseline (``storysync`` takes the story's own)."""
    if method == "vanilla":
        return StorySyncConfig.vanilla()
    if method not in BASELINES:
        raise ValueError(f"method {method!r} has no fixed config (methods: {', '.join(METHODS)})")
    return StorySyncConfig.from_dict(BASELINES[method])
