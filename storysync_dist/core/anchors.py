"""Anchor state (paper Eq. 13): what the anchor frames publish after each denoising step.

Anchors attend to each other; every other frame attends only to the anchors' subject tokens and
harmonizes against their features. Per step and per shared self-attention layer we keep, for the
subject tokens only and in half precision:
  - ``index``: flat token index (anchor * N + position) of each subject token,
  - ``hidden``: the layer's input hidden states there, per guidance branch (workers apply their
    own ``to_k``/``to_v``: one tensor travels instead of two),
  - ``features``: the RFH features R there (attention output before the output projection).
A bundle of all steps can be saved to safetensors and reused by later jobs ("character bank").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

BUNDLE_FORMAT = "storysync-anchor-bundle/1"


@dataclass
class SharedLayerState:
    """One shared layer at one step.

    Shapes: index (M,) int64; hidden (G, M, C); features (G, M, C_inner); G guidance branches in
    the order [uncond, cond] (or [cond] alone); ``num_tokens`` is N, the layer's patch count.
    """

    index: torch.Tensor
    hidden: torch.Tensor
    features: torch.Tensor
    num_tokens: int

    def owners(self) -> torch.Tensor:
        """(M,) the anchor each token belongs to."""
        return torch.div(self.index, self.num_tokens, rounding_mode="floor")

    def per_anchor_features(self, branch: int, num_anchors: int) -> list[torch.Tensor]:
        """The RFH reference set of each anchor for guidance branch ``branch``: A tensors (M_a, C)."""
        owners = self.owners()
        return [self.features[branch][owners == a] for a in range(num_anchors)]

    def to(self, device: torch.device | str) -> SharedLayerState:
        return SharedLayerState(
            self.index.to(device), self.hidden.to(device), self.features.to(device), self.num_tokens
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.hidden, self.features))


@dataclass
class AnchorStep:
    """Everything the anchors publish after denoising step ``step``."""

    step: int
    layers: dict[str, SharedLayerState] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())


@dataclass
class AnchorBundle:
    """All anchor steps of one set of anchors, plus what they were rendered with."""

    meta: dict[str, Any]
    steps: dict[int, AnchorStep] = field(default_factory=dict)

    @property
    def num_anchors(self) -> int:
        return int(self.meta["num_anchors"])

    def step(self, t: int) -> AnchorStep | None:
        return self.steps.get(t)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.steps.values())

    def to_bytes(self) -> bytes:
        """Serialize to safetensors (tensors) + JSON metadata; nothing is pickled."""
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, dict[str, int]] = {}
        for t, anchor_step in sorted(self.steps.items()):
            layout[str(t)] = {}
            for name, layer in anchor_step.layers.items():
                key = f"{t}|{name}"
                tensors[f"{key}|index"] = layer.index.contiguous().cpu()
                tensors[f"{key}|hidden"] = layer.hidden.contiguous().cpu()
                tensors[f"{key}|features"] = layer.features.contiguous().cpu()
                layout[str(t)][name] = layer.num_tokens
        metadata = {"format": BUNDLE_FORMAT, "meta": json.dumps(self.meta), "layout": json.dumps(layout)}
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> AnchorBundle:
        """Inverse of :meth:`to_bytes`; raises ValueError on anything that is not a bundle."""
        try:
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            metadata = header.get("__metadata__", {})
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a safetensors file: {exc}") from None
        if metadata.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"not a StorySync anchor bundle (format {metadata.get('format')!r})")
        tensors = load_safetensors(data)
        bundle = cls(meta=json.loads(metadata["meta"]))
        for t_str, layers in json.loads(metadata["layout"]).items():
            anchor_step = AnchorStep(step=int(t_str))
            for name, num_tokens in layers.items():
                key = f"{t_str}|{name}"
                anchor_step.layers[name] = SharedLayerState(
                    index=tensors[f"{key}|index"],
                    hidden=tensors[f"{key}|hidden"],
                    features=tensors[f"{key}|features"],
                    num_tokens=int(num_tokens),
                )
            bundle.steps[anchor_step.step] = anchor_step
        return bundle
