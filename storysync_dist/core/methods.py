"""The methods ``--method`` chooses: StorySync, stock generation, and two baselines re-implemented
from their papers as configurations of the same mechanisms, so every method runs through the same
anchor/frame path, in one process or on Ray, on the same prompts, seeds and model.

- ``storysync``: the paper's method (the story's ``storysync:`` section, ``--ablation``, ``--set``).
- ``vanilla``: every mechanism off, bit-for-bit the stock diffusers pipeline.
- ``consistory``: a re-implementation of ConsiStory (Tewel et al., "Training-Free Consistent
  Text-to-Image Generation", SIGGRAPH 2024), from its Sec. 3 and NVlabs' released code (SDXL,
  50 steps): subject-driven shared self-attention (SDSA, its Eq. 1-2: each image attends to its
  own tokens and to the other images' subject tokens) in the decoder layers from step 1, with
  masks from the cross-attention maps of the lowest resolution averaged over the layers and the
  last 20 steps, each subject's map Otsu-thresholded on its own at each resolution and the masks
  united (``mask_source: window``); a 0.5 dropout of the shared subject patches drawn once per
  step and resolution for every layer and querying image (``share_dropout_scope: resolution``);
  vanilla query blending (Sec. 3.2) at steps 1..steps//10 in the decoder self-attentions, the
  vanilla queries from the stock UNet on the same latents, weight linspace(0.9, 0.81836735)
  (``bli_window: while_sharing``, ``bli_layers: shared``, ``bli_latents: consistent``,
  ``bli_lambda_end``); feature injection (Sec. 3.3) in its two-pass form (``feature_injection``,
  ``core/consistory.py``): pass 1 yields DIFT features and final masks, pass 2 renders the same
  latents again and, at steps n//10..n//3 in the finest self-attention layers, blends each gated
  subject patch with its single nearest anchor patch, alpha 0.8. Its sampler is the release's
  too (``METHOD_SAMPLING``): DDIM built from the model's scheduler config, and FreeU (s1 0.6, s2
  0.4, b1 1.1, b2 1.2), on the model families that have FreeU (a UNet); the others keep their own
  sampler and render the one-pass form.
- ``storydiffusion``: a re-implementation of StoryDiffusion's consistent self-attention (Zhou et
  al. 2024, Sec. 3.1, Eq. 1-2): each image attends to its own tokens and to a random sample of the
  identity images' tokens (every token, no mask) at its per-resolution rates (0.5), in the decoder
  layers as its code does; the identity images are the story's anchors (``core.storydiffusion``).
  Pinned to one release of its code, HVision-NKU/StoryDiffusion ``predict.py`` at commit d1244ce4
  (``token_sampling: storydiffusion-predict``): for steps 0-4 the anchors run plain self-attention
  while every frame attends to all anchor tokens, unsampled; from step 5 each layer call runs
  plain self-attention with probability 0.3 (0.1 from step 20), drawn per story, step and layer so
  anchors and frames skip alike, else attends to the step's sample (one per story, step and
  resolution, shared by every query). The low-VRAM script's rule (plain self-attention at step 0
  only) is the option ``token_sampling: storydiffusion-lowvram``.

Where the baselines' own code differs from what a frame-independent renderer can do, the choice
made here is written in ``docs/evaluation.md`` (section "Baselines").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import StorySyncConfig

__all__ = ["BASELINES", "METHODS", "METHOD_SAMPLING", "SamplingOverride", "method_config", "method_sampling",
           "uses_anchors"]

# Every mechanism of each baseline as StorySync config values; the layers stay the model family's
# default (UNet: the decoder, "up_blocks", where both baselines share).
BASELINES: dict[str, dict[str, Any]] = {
    "consistory": {
        # Its AttentionStore: masks from the 32x32 maps (SDXL 1024 px) of the last 20 steps, per
        # subject, for the next step; its mask_dropout=0.5 drops shared subject patches, one draw per
        # step and resolution (last_mask_dropout).
        "share_attention": True, "use_masks": True, "mask_source": "window", "mask_window": 20,
        "share_dropout": 0.5, "share_dropout_scope": "resolution", "mask_dropout": 0.0,
        # Its QueryStore: t_range [0, steps // 10], strengths linspace(0.9, 0.81836735), applied where
        # its extended attention runs (decoder, steps >= 1) to queries of a stock pass on the same latents.
        "layout_interpolation": True, "bli_target": "query", "bli_lambda": 0.9, "bli_lambda_end": 0.81836735,
        "bli_fraction": 0.1, "bli_window": "while_sharing", "bli_layers": "shared", "bli_latents": "consistent",
        # Its feature injection (Sec. 3.3) as released: a second pass (core/consistory.py), not RFH.
        "harmonize": False, "rfh_dropout": 0.0, "feature_injection": True,
    },
    "storydiffusion": {
        "share_attention": True, "use_masks": False, "token_sampling": "storydiffusion-predict",
        "share_dropout": 0.0, "mask_dropout": 0.0,
        "layout_interpolation": False, "harmonize": False, "rfh_dropout": 0.0,
    },
}
METHODS = ("storysync", "vanilla", *BASELINES)


@dataclass(frozen=True)
class SamplingOverride:
    """A method's own sampler, as its released code loads the pipeline (plain data: it travels in
    ``RenderSettings`` and is part of every frame's fingerprint and of the anchor bundle's meta).

    ``scheduler``: a diffusers scheduler class name, built from the model's own scheduler config
    (``cls.from_config``, as ``--scheduler`` swaps it); ``freeu``: ``(s1, s2, b1, b2)`` for
    ``enable_freeu``. It applies only on model families with FreeU (``ModelInfo.freeu``); the
    others keep their own sampler.
    """

    scheduler: str
    freeu: tuple[float, float, float, float]


# ConsiStory's consistory_run.py: DDIMScheduler.from_pretrained(sd_id, subfolder="scheduler") and
# pipe.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2).
METHOD_SAMPLING: dict[str, SamplingOverride] = {
    "consistory": SamplingOverride(scheduler="DDIMScheduler", freeu=(0.6, 0.4, 1.1, 1.2)),
}


def uses_anchors(method: str) -> bool:
    """Whether the method's frames render against anchors (every method but ``vanilla``)."""
    return method != "vanilla"


def method_sampling(method: str) -> SamplingOverride | None:
    """The sampler ``method`` renders with instead of the model's, or None (the model's own)."""
    return METHOD_SAMPLING.get(method)


def method_config(method: str) -> StorySyncConfig:
    """The fixed config of ``vanilla`` or a baseline (``storysync`` takes the story's own)."""
    if method == "vanilla":
        return StorySyncConfig.vanilla()
    if method not in BASELINES:
        raise ValueError(f"method {method!r} has no fixed config (methods: {', '.join(METHODS)})")
    return StorySyncConfig.from_dict(BASELINES[method])
