"""One shared self-attention layer's published state at one step (paper Eq. 13): the subject
tokens' flat index, their input hidden states and their RFH features. The bundle (``anchors``)
holds these per step and layer; its format checks (``bundle_format``) read them, so the class
sits below both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .transfer import to_device

__all__ = ["SharedLayerState"]


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

    def reference_slots(self, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each anchor's RFH references lie in ``features``, padded: computed from the index
        on the host (call it on a host copy), so frames gather them with one integer indexing
        instead of a boolean mask per anchor, which makes the host wait for the device.

        Returns:
            slots (A, Q) int64 into the M published tokens (0 on padding) and valid (A, Q)
            boolean, Q the most tokens any anchor published (at least 1); both on the CPU.
        """
        # Host arithmetic, in numpy: none of it is work for the device.
        owners = np.clip(self.index.cpu().numpy() // self.num_tokens, 0, max(num_anchors - 1, 0))
        counts = np.bincount(owners, minlength=num_anchors)[:num_anchors]
        longest = max(int(counts.max()) if counts.size else 0, 1)
        offsets = np.arange(longest)[None, :]
        valid = offsets < counts[:, None]
        # The index is sorted (anchor * N + position), so anchor a's tokens are one run.
        starts = np.cumsum(counts) - counts
        slots = np.where(valid, starts[:, None] + offsets, 0)
        return torch.from_numpy(slots.astype(np.int64)), torch.from_numpy(valid)

    def padded_references(self, num_anchors: int, host: SharedLayerState | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Every anchor's RFH reference set, padded: (G, A, Q, C) features and their (A, Q)
        validity on the features' device, and whether every anchor has a token. The slots come
        from ``host`` (this layer's host copy) when given, so the host never waits for the device."""
        slots, valid = (host or self).reference_slots(num_anchors)
        device = self.features.device
        every_used = bool(valid.numpy().any(axis=-1).all())  # host arithmetic
        return self.features[:, to_device(slots, device)], to_device(valid, device), every_used

    def to(self, device: torch.device | str) -> SharedLayerState:
        return SharedLayerState(
            self.index.to(device), self.hidden.to(device), self.features.to(device), self.num_tokens
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.hidden, self.features))
