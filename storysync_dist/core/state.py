"""Per-render state that every attention processor of one pipeline reads and writes.

A render is one UNet batch of F images (the anchors together, or one or more frames), laid out
as ``for guidance in [uncond, cond]: for branch in [vanilla, consistent]: for image in F`` so each
(guidance, branch) pair is one contiguous slice. The vanilla branch exists only for the first T
steps (BLI, Eq. 12).

Subject masks (Eq. 2-4) are made from the subject maps that cross-attention layers record during
a step. With ``mask_source="current"`` (the paper: "only from the current generation timestep")
the masks of step t are fixed when the first shared self-attention of step t runs, from the maps
recorded so far in step t (in a UNet: the encoder and the mid block), at the lowest resolution
among them. With ``mask_source="previous"`` they are made from every map of step t-1.
"""

from __future__ import annotations

import zlib

import torch

from .anchors import AnchorBundle, AnchorStep, SharedLayerState
from .config import StorySyncConfig, default_anchor_dtype
from .dropout import KIND_MASK, KIND_RFH, keep_mask
from .harmonize import harmonize_regions
from .masks import aggregate_subject_maps, subject_mask, subject_token_weights, token_grid
from .storydiffusion import story_sample

ROLE_ANCHORS = "anchors"
ROLE_FRAMES = "frames"
UNCOND, COND = "uncond", "cond"
VANILLA, CONSISTENT = "vanilla", "consistent"


def layer_id(name: str) -> int:
    """A stable integer for a processor name (seeds the per-layer dropouts)."""
    return zlib.crc32(name.encode())


class MaskSourceError(ValueError):
    """``mask_source="current"`` but no mask layer ran before the first shared layer of a step."""


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
        self.text_len = text_len  # the padded text length the attention layers see
        self.bundle = bundle
        self.device = torch.device(device)
        self.step = 0
        self.published: dict[int, AnchorStep] = {}
        self.collect_maps = config.needs_masks
        self.token_weights = (
            subject_token_weights(token_positions, text_len, self.device) if self.collect_maps else None
        )
        self.current_masks = config.mask_source == "current"
        self.mask_tokens: int | None = None  # N of the layers whose maps make the mask
        # Names of the layers whose maps made the masks of the current step (for inspection).
        self.mask_sources: list[str] = []
        self._maps: dict[int, list[tuple[str, torch.Tensor]]] = {}
        # The (F, n) aggregated map the masks of this step are made from, and its (h, w) grid.
        self._mask_map: torch.Tensor | None = None
        self._mask_hw: tuple[int, int] | None = None
        self._mask_fixed = False  # current masks: fixed at this step's first shared layer
        self._last_map: tuple[torch.Tensor, tuple[int, int]] | None = None  # for final_masks
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
        if not self.collect_maps or (self.current_masks and self._mask_fixed):
            return False  # current masks: maps after this step's first shared layer are not used
        return self.mask_tokens is None or num_tokens == self.mask_tokens

    def record_map(self, num_tokens: int, maps: torch.Tensor, layer: str = "") -> None:
        """Store one layer's (F, N, S) subject map for this step."""
        self._maps.setdefault(num_tokens, []).append((layer, maps))

    def set_subject_map(self, aggregated: torch.Tensor, hw: tuple[int, int]) -> None:
        """Use an (F, h*w) aggregated map for this step's masks (tests and inspection)."""
        self._mask_map, self._mask_hw = aggregated, hw
        self._mask_fixed = True
        self._mask_cache = {}

    def _aggregate(self) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Eq. 3-4 over the maps recorded so far this step, at their lowest resolution."""
        if not self._maps:
            return None
        if self.mask_tokens is None:
            # Eq. 3 averages the layers of one resolution: the lowest one, where the maps are
            # most semantic (32x32 for SDXL at 1024 px). Fixed at the first step, so every step
            # averages the same layers.
            self.mask_tokens = min(self._maps)
        recorded = self._maps.get(self.mask_tokens)
        if not recorded:
            return None
        self.mask_sources = [layer for layer, _ in recorded]
        return aggregate_subject_maps([maps for _, maps in recorded]), token_grid(self.mask_tokens, self.latent_hw)

    def enter_shared_layer(self, name: str) -> None:
        """Called by every shared self-attention layer before it runs: with current masks, the
        first one of a step fixes the step's masks from the maps recorded before it."""
        if not (self.current_masks and self.collect_maps) or self._mask_fixed:
            return
        self._mask_fixed = True
        aggregated = self._aggregate()
        if aggregated is None:
            if self.step >= self.config.first_shared_step():
                raise MaskSourceError(
                    f"mask_source 'current': no cross-attention of mask_layers {list(self.config.mask_layers)} "
                    f"ran before the first shared self-attention {name!r} at step {self.step}; list earlier "
                    "layers in mask_layers, share later layers, or set mask_source: previous"
                )
            return
        self._mask_map, self._mask_hw = aggregated
        self._mask_cache = {}

    @property
    def sharing_ready(self) -> bool:
        """Whether sharing and RFH run at this step: from ``config.first_shared_step()``, once
        this step's masks exist (none at step 0 with ``mask_source="previous"``)."""
        if self.step < self.config.first_shared_step():
            return False
        return not self.config.use_masks or self._mask_map is not None

    def masks(self, num_tokens: int) -> torch.Tensor:
        """(F, N) boolean subject masks at a self-attention resolution, after mask dropout."""
        cached = self._mask_cache.get(num_tokens)
        if cached is not None:
            return cached
        if self.config.token_sampling == "storydiffusion" and self.role == ROLE_ANCHORS:
            # StoryDiffusion's RandSample (core/storydiffusion.py): the anchors share one sample of
            # each other's tokens and record only it, so every frame attends to the same sample.
            mask = story_sample(self.seeds, self.step, num_tokens).to(self.device)
        elif not self.config.use_masks:
            mask = torch.ones(self.num_images, num_tokens, dtype=torch.bool, device=self.device)
        else:
            assert self._mask_map is not None and self._mask_hw is not None
            dst_hw = token_grid(num_tokens, self.latent_hw)
            mask = subject_mask(self._mask_map, self._mask_hw, dst_hw)
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
        """(F, h, w) boolean masks from the last step's mask map (no dropout), for the dataset."""
        if self._last_map is None:
            return None
        aggregated, hw = self._last_map
        return subject_mask(aggregated, hw, hw).reshape(-1, *hw)

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
        # None (a state built outside a job or renderer): the model's rule, from the model's own dtype.
        dtype = getattr(torch, self.config.anchor_dtype or default_anchor_dtype(str(hidden.dtype)))
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

    # ---- Regional Feature Harmonization (Eq. 9-11) ----------------------------------------
    def harmonize(
        self, name: str, features: torch.Tensor, shared_rows: list[slice], masks: torch.Tensor
    ) -> torch.Tensor:
        """RFH of one shared layer's features for every consistent image of the shared branches.

        Args:
            name: the layer's processor name (its anchor state, and the seed of its RFH dropout).
            features: (B, N, C) the layer's features R, the whole batch.
            shared_rows: the batch rows of the consistent images, one slice per shared guidance branch.
            masks: (F, N) the images' subject masks at this layer.
        Returns:
            (B, N, C) features with the consistent images' subject patches harmonized: anchors
            against the other anchors (a simultaneous update), frames against the anchors.
        """
        cfg = self.config
        if not cfg.harmonizes_at(self.step, self.num_steps):
            return features  # outside the [rfh_start, rfh_end) window
        layer = layer_id(name)
        harmonized = features.clone()
        for branch, rows in enumerate(shared_rows):
            image_features = features[rows]
            if self.role == ROLE_ANCHORS:
                refs_all = [image_features[j][masks[j]] for j in range(self.num_images)]
            else:
                anchor = self.anchor_layer(name)
                if anchor is None or self.bundle is None:
                    continue
                refs_all = [f.to(features.dtype) for f in anchor.per_anchor_features(branch, self.bundle.num_anchors)]
            for i, seed in enumerate(self.seeds):
                refs = [r for j, r in enumerate(refs_all) if self.role != ROLE_ANCHORS or j != i]
                keep = keep_mask(masks.shape[1], cfg.rfh_dropout, seed, self.step, layer, KIND_RFH)
                harmonized[rows.start + i] = harmonize_regions(
                    image_features[i], masks[i], refs, cfg.rfh_gamma, cfg.rfh_tau, keep.to(masks.device)
                )
        return harmonized

    # ---- step bookkeeping ---------------------------------------------------------------
    def end_step(self) -> None:
        """Close the step: keep its mask map (and, with previous masks, make the next step's
        masks from its maps), then advance."""
        if self.current_masks:
            if self.collect_maps and not self._mask_fixed:
                # No shared layer ran (none matches share_layers): the step's maps still give the
                # dataset its mask.
                aggregated = self._aggregate()
                if aggregated is not None:
                    self._mask_map, self._mask_hw = aggregated
            if self._mask_map is not None and self._mask_hw is not None:
                self._last_map = (self._mask_map, self._mask_hw)
            self._mask_map = self._mask_hw = None
        else:
            aggregated = self._aggregate()
            if aggregated is not None:
                self._mask_map, self._mask_hw = aggregated  # the next step's masks
                self._last_map = aggregated
        self._mask_fixed = False
        self._maps = {}
        self._mask_cache = {}
        self._anchor_cache = {}
        self.step += 1
