"""A frame's identity: everything that determines its pixels, hashed into one fingerprint.

A frame is a pure function of (model, dtype, sampling settings, config, its own prompt, negative
prompt, seed and subject tokens, and, for StorySync, the anchors it was rendered against). A
``--scheduler`` and ``--lora`` adapters are part of the model: the scheduler's class name and each
LoRA's file SHA-256 and scale (not its path) are in the description, and only when set, so the
fingerprints of jobs that use neither are those they always were. The
fingerprint is the SHA-256 of that description as canonical JSON; the dataset stores it per row,
and a rerun keeps a row only when its fingerprint equals the one the story gives now. Where a frame
renders (which worker, which host, CPU or GPU of the same dtype) is deliberately not part of it:
those give the same pixels within float tolerance (tests/test_distributed.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FINGERPRINT_VERSION", "AnchorIdentity", "RenderIdentity", "fingerprints_of", "frame_fingerprint"]

# Bump when the renderer changes pixels for the same inputs, so old rows are redone.
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class AnchorIdentity:
    """One anchor as the frames see it: its prompt, seed and subject-token positions."""

    frame_id: str
    prompt: str
    seed: int
    token_positions: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.frame_id, "prompt": self.prompt, "seed": self.seed,
                "token_positions": [list(p) for p in self.token_positions]}


@dataclass(frozen=True)
class RenderIdentity:
    """What every frame of one job shares: model, precision, sampling settings, config, anchors."""

    model: str
    model_revision: str | None
    dtype: str
    method: str
    steps: int
    height: int
    width: int
    guidance_scale: float
    negative_prompt: str | None
    config: dict[str, Any]
    subjects: tuple[tuple[str, tuple[str, ...]], ...]  # (description, tokens) per subject
    anchors: tuple[AnchorIdentity, ...]
    # --scheduler (None: the model's own) and the LoRAs as (sha256, scale), in order.
    scheduler: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    # The text length where the family lets a story choose it (FLUX), None elsewhere (and then absent
    # from the description, so those fingerprints are what they were).
    max_sequence_length: int | None = None
    # FreeU's factors where the method brings its own sampler (``--method consistory`` on a UNet);
    # absent from the description when None, so other fingerprints are what they were.
    freeu: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "model_revision": self.model_revision, "dtype": self.dtype,
            "method": self.method, "steps": self.steps, "height": self.height, "width": self.width,
            "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
            "config": self.config,
            "subjects": [{"description": d, "tokens": list(t)} for d, t in self.subjects],
            "anchors": [a.to_dict() for a in self.anchors],
            **({"scheduler": self.scheduler} if self.scheduler is not None else {}),
            **({"loras": [{"sha256": sha, "scale": float(scale)} for sha, scale in self.loras]} if self.loras else {}),
            **({"max_sequence_length": self.max_sequence_length} if self.max_sequence_length is not None else {}),
            **({"freeu": [float(x) for x in self.freeu]} if self.freeu is not None else {}),
        }


def frame_fingerprint(
    identity: RenderIdentity,
    *,
    frame_id: str,
    prompt: str,
    seed: int,
    token_positions: list[list[int]],
    is_anchor: bool,
) -> str:
    """SHA-256 hex of the canonical JSON of one frame's identity."""
    return fingerprints_of(identity)(frame_id=frame_id, prompt=prompt, seed=seed, token_positions=token_positions,
                                     is_anchor=is_anchor)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprints_of(identity: RenderIdentity) -> Callable[..., str]:
    """:func:`frame_fingerprint` for many frames of one identity: the render part is serialized
    once. The text hashed is the canonical JSON (sorted keys, no spaces) of ``{"frame": ...,
    "render": ..., "version": ...}``, which is its three sorted parts joined, so it is the same
    text, byte for byte, as serializing the whole description per frame."""
    tail = f',"render":{_canonical(identity.to_dict())},"version":{_canonical(FINGERPRINT_VERSION)}}}'

    def fingerprint(*, frame_id: str, prompt: str, seed: int, token_positions: list[list[int]],
                    is_anchor: bool) -> str:
        frame = {"id": frame_id, "prompt": prompt, "seed": int(seed),
                 "token_positions": [list(p) for p in token_positions], "role": "anchor" if is_anchor else "frame"}
        return hashlib.sha256(f'{{"frame":{_canonical(frame)}{tail}'.encode()).hexdigest()

    return fingerprint
