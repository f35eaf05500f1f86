"""Every constant of the StorySync method in one dataclass, the paper's values as defaults.

The config is written into every frame's metadata (``config`` column, JSON), so a frame records
exactly how it was made. Values the paper leaves open are documented in ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StorySyncConfig:
    """Knobs of StorySync (section 3 of the paper).

    Switches (all on for ``--method storysync``; all off reproduces stock diffusers):
      share_attention: masked cross-image attention sharing, Eq. 5-8 (and Eq. 13 for anchors).
      harmonize: Regional Feature Harmonization (RFH), Eq. 9-11.
      layout_interpolation: Base Layout Interpolation (BLI), Eq. 12.
      use_masks: restrict sharing and RFH to subject masks, Eq. 2-4 (off = the "No Mask" ablation).
    """

    share_attention: bool = True
    harmonize: bool = True
    layout_interpolation: bool = True
    use_masks: bool = True

    # Eq. 11: harmonization coefficient gamma (paper: 0.3).
    rfh_gamma: float = 0.3
    # Eq. 9: temperature tau of the region-compatibility softmax (paper gives no value).
    rfh_tau: float = 0.1
    # Eq. 12: interpolation weight lambda towards the vanilla branch (paper: 0.7).
    bli_lambda: float = 0.7
    # Eq. 12: T, the number of leading steps with BLI, as a fraction of the steps (paper gives no value).
    bli_fraction: float = 0.3

    # Section 3.3 dropouts (rates not given in the paper); seeded per frame, step and layer.
    share_dropout: float = 0.3
    rfh_dropout: float = 0.2
    mask_dropout: float = 0.1

    # Which self-attention layers share and harmonize: prefixes of diffusers attention-processor
    # names. Default: the decoder ("up_blocks"), as ConsiStory and the DESIGN sizing assume.
    share_layers: tuple[str, ...] = ("up_blocks",)
    # Cross-attention layers whose maps make the subject mask (Eq. 3): prefixes; of these the
    # layers at the lowest spatial resolution are averaged (32x32 for SDXL at 1024 px).
    mask_layers: tuple[str, ...] = ("up_blocks",)
    # Apply sharing/RFH in the unconditional guidance branch too (masks always come from the
    # conditional branch).
    share_uncond: bool = True
    # No sharing or RFH before this step: masks at step t come from step t-1 (Eq. 2-4).
    first_share_step: int = 1
    # Precision of the anchor state that is stored and broadcast.
    anchor_dtype: str = "float16"

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rfh_gamma", "bli_lambda", "bli_fraction", "share_dropout", "rfh_dropout", "mask_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"config {name}={value} must be within [0, 1]")
        if self.rfh_tau <= 0:
            raise ValueError(f"config rfh_tau={self.rfh_tau} must be positive")
        if self.anchor_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"config anchor_dtype={self.anchor_dtype!r} must be float16, bfloat16 or float32")
        object.__setattr__(self, "share_layers", tuple(self.share_layers))
        object.__setattr__(self, "mask_layers", tuple(self.mask_layers))

    @classmethod
    def vanilla(cls) -> StorySyncConfig:
        """Every mechanism off: the pipeline renders exactly as stock diffusers."""
        return cls(share_attention=False, harmonize=False, layout_interpolation=False)

    @property
    def any_mechanism(self) -> bool:
        return self.share_attention or self.harmonize or self.layout_interpolation

    @property
    def needs_masks(self) -> bool:
        return self.use_masks and (self.share_attention or self.harmonize)

    def bli_steps(self, num_steps: int) -> int:
        """T of Eq. 12 for a run of ``num_steps`` denoising steps."""
        if not self.layout_interpolation:
            return 0
        return min(num_steps, round(self.bli_fraction * num_steps))

    def replace(self, **changes: Any) -> StorySyncConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["share_layers"] = list(self.share_layers)
        data["mask_layers"] = list(self.mask_layers)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StorySyncConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**data)
