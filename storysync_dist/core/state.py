"""Per-render state that every attention processor of one pipeline reads and writes.

A render is one UNet batch of F images (the anchors together, or one or more frames), laid out
as ``for guidance in [uncond, cond]: for branch in [vanilla, consistent]: for image in F`` so each
(guidance, branch) pair is one contiguous slice. The vanilla branch exists only for the first T
steps (BLI, Eq. 12). Masks at step t come from the cross-attention maps of step t-1 (Eq. 2-4).
"""

from __future__ import annotations

import zlib

import torch

from .anchors import AnchorBundle, AnchorStep, SharedLayerState
from .config import StorySyncConfig
from .dropout import KIND_MASK, keep_mask
from .masks import aggregate_subject_maps, subject_mask, subject_token_weights, token_grid

ROLE_ANCHORS = "anchors"
ROLE_FRAMES = "frames"
UNCOND, COND = "uncond", "cond"
VANILLA, CONSISTENT = "vanilla", "consistent"


def layer_id(name: str) -> int:
    """A stable integer for a processor name (seeds the per-layer dropouts)."""
    return zlib.crc32(name.encode())


class StorySyncState:
    """Shared state of one render. See the module docstring for the batch layout."""

    def __init__(
        self,
        config: StorySyncConfig,
        *,
        role: str,
        seeds: list[int],
        token_positions: list[list[list[int]]],
        latent_hw: tuple[int, int],
        num_steps: int,
        guidance: bool,
        text_len: int = 77,
        bundle: AnchorBundle | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if role not in (ROLE_ANCHORS, ROLE_FRAMES):
            raise ValueError(f"unknown role {role!r}")
        if role == ROLE_FRAMES and (config.share_attention or config.harmonize) and bundle is None:
            raise ValueError("frames that share or harmonize need an anchor bundle")
        self.config = config
        self.role = role
        self.seeds = list(seeds)
        self.num_images = len(seeds)
        self.latent_hw = latent_hw
        self.num_steps = num_steps
        self.bli_steps = config.bli_steps(num_steps)
        self.guidance = guidance
        self.bundle = bundle
        self.device = torch.device(device)
        self.step = 0
        self.published: dict[int, AnchorStep] = {}
        self.collect_maps = config.needs_masks
        self.token_weights = (
            subject_token_weights(token_positions, text_len, self.device) if self.collect_maps else None
        )
        self.mask_tokens: int | None = None  # N of the layers whose maps make the mask
        self._maps: dict[int, list[torch.Tensor]] = {}
        self._prev_map: torch.Tensor | None = None  # (F, n) aggregated map of the previous step
        self._prev_hw: tuple[int, int] | None = None
        self._mask_cache: dict[int, torch.Tensor] = {}
        self._anchor_cache: dict[str, SharedLayerState | None] = {}

    # ---- batch layout -------------------------------------------------------------------
    @property
    def has_vanilla(self) -> bool:
        """BLI runs the vanilla branch in the same batch for the first T steps."""
        return self.step < self.bli_steps

    @property
    def branches(self) -> tuple[str, ...]:
        return (VANILLA, CONSISTENT) if self.has_vanilla else (CONSISTENT,)

    @property
    def guidance_branches(self) -> tuple[str, ...]:
        return (UNCOND, COND) if self.guidance else (COND,)

    @property
    def shared_guidance(self) -> tuple[str, ...]:
        """Guidance branches in which sharing and RFH apply (and which the anchors publish)."""
        return self.guidance_branches if self.config.share_uncond else (COND,)

    @property
    def batch_size(self) -> int:
        return len(self.guidance_branches) * len(self.branches) * self.num_images

    def rows(self, guidance: str, branch: str) -> slice:
        """The batch rows of one (guidance, branch) pair, one per image."""
        g = self.guidance_branches.index(guidance)
        b = self.branches.index(branch)
        start = (g * len(self.branches) + b) * self.num_images
        return slice(start, start + self.num_images)

    # ---- subject masks (Eq. 2-4) --------------------------------------------------------
    def wants_maps(self, num_tokens: int) -> bool:
        """Whether a cross-attention layer with ``num_tokens`` patches should record its map."""
        return self.collect_maps and (self.mask_tokens is None or num_tokens == self.mask_tokens)

    def record_map(self, num_tokens: int, maps: torch.Tensor) -> None:
        """Store one layer's (F, N, S) subject map for this step."""
        self._maps.setdefault(num_tokens, []).append(maps)

    def set_subject_map(self, aggregated: torch.Tensor, hw: tuple[int, int]) -> None:
        """Use an (F, h*w) aggregated map as the previous step's (tests and inspection)."""
        self._prev_map, self._prev_hw = aggregated, hw
        self._mask_cache = {}

    @property
    def sharing_ready(self) -> bool:
        """Sharing and RFH need masks from an earlier step (none at step 0)."""
        if self.step < self.config.first_share_step:
            return False
        return not self.config.use_masks or self._prev_map is not None

    def masks(self, num_tokens: int) -> torch.Tensor:
        """(F, N) boolean subject masks at a self-attention resolution, after mask dropout."""
        cached = self._mask_cache.get(num_tokens)
        if cached is not None:
            return cached
        if not self.config.use_masks:
            mask = torch.ones(self.num_images, num_tokens, dtype=torch.bool, device=self.device)
        else:
            assert self._prev_map is not None and self._prev_hw is not None
            dst_hw = token_grid(num_tokens, self.latent_hw)
            mask = subject_mask(self._prev_map, self._prev_hw, dst_hw)
            if self.config.mask_dropout > 0:
                keep = torch.stack(
                    [
                        keep_mask(num_tokens, self.config.mask_dropout, seed, self.step, num_tokens, KIND_MASK)
                        for seed in self.seeds
                    ]
                ).to(mask.device)
                mask = mask & keep
        self._mask_cache[num_tokens] = mask
        return mask

    def final_masks(self) -> torch.Tensor | None:
        """(F, h, w) boolean masks from the last step's maps (no dropout), for the dataset."""
        if self._prev_map is None or self._prev_hw is None:
            return None
        return subject_mask(self._prev_map, self._prev_hw, self._prev_hw).reshape(-1, *self._prev_hw)

    # ---- anchors (Eq. 13) ---------------------------------------------------------------
    def record_anchor_layer(
        self, name: str, num_tokens: int, hidden: torch.Tensor, features: torch.Tensor, masks: torch.Tensor
    ) -> None:
        """Publish the subject tokens of one shared layer (anchor role).

        Args:
            hidden: (G, A, N, C) input hidden states of the consistent branch, G = shared guidance.
            features: (G, A, N, C_inner) RFH features before harmonization.
            masks: (A, N) the anchors' subject masks used at this step.
        """
        dtype = getattr(torch, self.config.anchor_dtype)
        index = masks.reshape(-1).nonzero(as_tuple=True)[0]
        g = hidden.shape[0]
        layer = SharedLayerState(
            index=index.cpu(),
            hidden=hidden.reshape(g, -1, hidden.shape[-1])[:, index].to("cpu", dtype),
            features=features.reshape(g, -1, features.shape[-1])[:, index].to("cpu", dtype),
            num_tokens=num_tokens,
        )
        self.published.setdefault(self.step, AnchorStep(step=self.step)).layers[name] = layer

    def anchor_layer(self, name: str) -> SharedLayerState | None:
        """The anchors' state of one shared layer at the current step (frame role), on device."""
        if name not in self._anchor_cache:
            anchor_step = self.bundle.step(self.step) if self.bundle is not None else None
            layer = anchor_step.layers.get(name) if anchor_step is not None else None
            self._anchor_cache[name] = layer.to(self.device) if layer is not None else None
        return self._anchor_cache[name]

    # ---- step bookkeeping ---------------------------------------------------------------
    def end_step(self) -> None:
        """Turn this step's maps into the next step's masks and advance the step."""
        if self._maps:
            if self.mask_tokens is None:
                # Eq. 3 averages the layers of one resolution: the lowest one, where the maps
                # are most semantic (32x32 for SDXL at 1024 px).
                self.mask_tokens = min(self._maps)
            maps = self._maps.get(self.mask_tokens)
            if maps:
                self._prev_map = aggregate_subject_maps(maps)
                self._prev_hw = token_grid(self.mask_tokens, self.latent_hw)
        self._maps = {}
        self._mask_cache = {}
        self._anchor_cache = {}
        self.step += 1
