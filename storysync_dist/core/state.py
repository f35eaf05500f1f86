"""Per-render state that every attention processor of one pipeline reads and writes.

A render is one UNet batch of F images (the anchors together, or one or more frames), laid out
as ``for guidance in [uncond, cond]: for branch in [vanilla, consistent]: for image in F`` so each
(guidance, branch) pair is one contiguous slice. The vanilla branch exists only for the first T
steps (BLI, Eq. 12).

Subject masks (Eq. 2-4) are made from the subject maps that cross-attention layers record during
a step. With ``mask_source="current"`` (the paper: "only from the current generation timestep")
the masks of step t are fixed when the first shared self-attention of step t runs, from the maps
recorded so far in step t (in a UNet: the encoder and the mid block), at the lowest resolution
among them. With ``mask_source="previous"`` they are made from every map of step t-1; with
``mask_source="window"`` (ConsiStory's release) from the per-subject maps of the last
``mask_window`` steps up to t-1, averaged, each subject thresholded on its own and the masks united.

With ``bli_latents="consistent"`` the vanilla branch is in the batch only at the steps that blend
(``bli_schedule``), on the consistent branch's latents. The share dropout is drawn per querying
image and layer, or (``share_dropout_scope="resolution"``) once per anchor, step and resolution.
"""

from __future__ import annotations

import itertools
import zlib
from collections import deque

import torch

from .anchors import AnchorBundle, AnchorStep, SharedLayerState
from .config import StorySyncConfig, default_anchor_dtype
from .consistory import FeatureInjection
from .dropout import KIND_MASK, KIND_RFH, KIND_SHARE, keep_mask, resolution_keep
from .harmonize import harmonize_batch
from .masks import aggregate_subject_maps, subject_mask, subject_token_weights, token_grid
from .publish import HostCopies, SubjectIndex
from .storydiffusion import anchor_sample, frame_sample
from .transfer import to_device

ROLE_ANCHORS = "anchors"
ROLE_FRAMES = "frames"
UNCOND, COND = "uncond", "cond"
VANILLA, CONSISTENT = "vanilla", "consistent"


def joined_rows(rows: list[slice]) -> slice | None:
    """Batch row slices as one slice, when each starts where the one before stops; else None."""
    if not rows or any(b.start != a.stop for a, b in itertools.pairwise(rows)):
        return None
    return slice(rows[0].start, rows[-1].stop)


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
        self.bli_schedule = config.bli_schedule(num_steps)  # {step: lambda} of the steps that blend
        self.guidance = guidance
        self.text_len = text_len  # the padded text length the attention layers see
        self.bundle = bundle
        self.device = torch.device(device)
        self.step = 0  # the step within the current pass
        # ConsiStory's two-pass form (feature_injection): pass 1 then pass 2 of the same latents;
        # the anchors publish pass p's step t as bundle step p * num_steps + t (``bundle_step``).
        self.passes = config.render_passes
        self.pass_index = 0
        self.injection = FeatureInjection(self.num_images, num_steps) if config.feature_injection else None
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
        # Anchors: the subject-token index of this step's masks, and the bundle's host copies
        # (core/publish.py; waited for once per step, ``take_published``).
        self._subject_index = SubjectIndex(self.num_images, latent_hw)
        self._copies = HostCopies()
        # mask_source "window": the per-subject maps (F, n, S), averaged over layers, of the last
        # mask_window steps.
        self._window: deque[torch.Tensor] = deque(maxlen=config.mask_window)
        self.shared_layer: str | None = None  # the shared layer running now (StoryDiffusion's skip draw)

    @property
    def bundle_step(self) -> int:
        """The bundle's key of the current step: ``pass_index * num_steps + step``."""
        return self.pass_index * self.num_steps + self.step

    def begin_second_pass(self) -> None:
        """Start ConsiStory's pass 2: keep pass 1's DIFT features and final masks (at the
        injection resolution) and start the step count and the masks again."""
        if self.injection is None or self.pass_index != 0:
            raise RuntimeError("a second pass needs feature_injection and a finished first pass")
        tokens = self.injection.tokens
        final = None
        if self._last_map is not None and tokens:
            aggregated, hw = self._last_map
            final = subject_mask(aggregated, hw, token_grid(tokens, self.latent_hw))
        self.injection.end_first_pass(final)
        self.pass_index = 1
        self.step = 0
        self._maps, self._mask_cache, self._anchor_cache = {}, {}, {}
        self._subject_index.clear()
        self._window.clear()  # mask_source "window": pass 2 records its maps afresh, as the release
        self._mask_map = self._mask_hw = self._last_map = None
        self._mask_fixed = False

    # ---- batch layout -------------------------------------------------------------------
    @property
    def has_vanilla(self) -> bool:
        """BLI runs the vanilla branch in the same batch for the first T steps; with
        ``bli_latents: consistent`` only at the steps that blend (its rows then run on the
        consistent latents, ``models.denoise.BranchLatents``)."""
        if self.config.bli_latents == "consistent":
            return self.step in self.bli_schedule
        return self.step < self.bli_steps

    def bli_weight(self, shares: bool) -> float | None:
        """BLI's lambda (Eq. 12) for a self-attention layer at this step, or None where it does
        not blend: outside ``bli_schedule``, or a layer that does not share with ``bli_layers:
        shared``."""
        lam = self.bli_schedule.get(self.step)
        if lam is None or (self.config.bli_layers == "shared" and not shares):
            return None
        return lam

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

    def _aggregate(self, per_subject: bool = False) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Eq. 3-4 over the maps recorded so far this step, at their lowest resolution: (F, n), or
        with ``per_subject`` the (F, n, S) layer average before the sum over subjects."""
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
        hw = token_grid(self.mask_tokens, self.latent_hw)
        if per_subject:
            return torch.stack([maps for _, maps in recorded]).mean(dim=0), hw
        return aggregate_subject_maps([maps for _, maps in recorded]), hw

    def enter_shared_layer(self, name: str) -> None:
        """Called by every shared self-attention layer before it runs: with current masks, the
        first one of a step fixes the step's masks from the maps recorded before it."""
        self.shared_layer = name
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

    def masks(self, num_tokens: int, layer: str | None = None) -> torch.Tensor:
        """(F, N) boolean subject masks at a self-attention resolution, after mask dropout.

        With StoryDiffusion's sampling (anchor role) they are what the anchors attend to of each
        other at this layer call, ``layer`` (default: the shared layer entered last), so not cached.
        """
        if self.config.token_sampling != "mask" and self.role == ROLE_ANCHORS:
            name = layer if layer is not None else self.shared_layer
            if name is None:
                raise ValueError("StoryDiffusion draws per layer call: name the layer (or enter_shared_layer first)")
            return anchor_sample(self.seeds, self.step, num_tokens, layer_id(name),
                                 self.config.token_sampling).to(self.device)
        cached = self._mask_cache.get(num_tokens)
        if cached is not None:
            return cached
        if not self.config.use_masks:
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
        if self.config.token_sampling != "mask":
            # StoryDiffusion: publish what its frames attend to at this layer call, which at its
            # early steps can be more than the anchors attend to (core/storydiffusion.py).
            masks = frame_sample(self.seeds, self.step, num_tokens, layer_id(name), self.config.token_sampling)
            host_index = masks.reshape(-1).cpu().nonzero(as_tuple=True)[0]  # drawn on the host
            index = to_device(host_index, hidden.device)
        else:
            host_index, index = self._subject_index.get(  # guesses only where this state makes the masks
                num_tokens, masks, self.masks, guess=self._mask_map is not None or not self.config.use_masks)
        g = hidden.shape[0]
        layer = SharedLayerState(
            index=host_index.clone(),  # each layer's own (a bundle file stores tensors apart)
            hidden=self._copies.to_host(hidden.reshape(g, -1, hidden.shape[-1]).index_select(1, index).to(dtype)),
            features=self._copies.to_host(features.reshape(g, -1, features.shape[-1]).index_select(1, index).to(dtype)),
            num_tokens=num_tokens,
        )
        self._published_step().layers[name] = layer

    def take_published(self, t: int, keep: bool = True) -> AnchorStep | None:
        """Bundle step ``t`` as published (anchor role), once its host copies are done: the one
        wait for the device per step. With ``keep=False`` the state forgets it (a Ray anchor
        actor streams each step to the driver and keeps none)."""
        self._copies.wait()
        return self.published.get(t) if keep else self.published.pop(t, None)

    def _published_step(self) -> AnchorStep:
        t = self.bundle_step
        return self.published.setdefault(t, AnchorStep(step=t))

    def anchor_layer(self, name: str) -> SharedLayerState | None:
        """The anchors' state of one shared layer at the current step (frame role), on device."""
        if name not in self._anchor_cache:
            anchor_step = self.bundle.step(self.bundle_step) if self.bundle is not None else None
            layer = anchor_step.layers.get(name) if anchor_step is not None else None
            self._anchor_cache[name] = layer.to(self.device) if layer is not None else None
        return self._anchor_cache[name]

    # ---- share dropout (section 3.3) -------------------------------------------------------
    def anchor_share_keeps(self, layer: int, num_tokens: int) -> list[torch.Tensor]:
        """The anchors' share-dropout keep masks at one shared layer (anchor role): one (A, N)
        CPU mask over every anchor's tokens per querying anchor.

        ``share_dropout_scope: layer``: drawn per querying image's seed, step and ``layer``;
        ``resolution``: one draw per anchor, step and N (``core.dropout.resolution_keep``), the
        same for every querying image and every layer of that resolution.
        """
        cfg = self.config
        if cfg.share_dropout_scope == "resolution":
            return [self._resolution_keep(num_tokens)] * self.num_images
        return [keep_mask((self.num_images, num_tokens), cfg.share_dropout, seed, self.step, layer, KIND_SHARE)
                for seed in self.seeds]

    def frame_share_keeps(self, name: str, layer: int, anchor: SharedLayerState) -> list[torch.Tensor]:
        """The frames' share-dropout keep masks over the anchors' published tokens of one shared
        layer (frame role): one (M,) CPU mask per frame. With ``share_dropout_scope: resolution``
        it is the anchors' own draw, read at the published positions (host copies, so no wait for
        the device)."""
        cfg = self.config
        if cfg.share_dropout_scope == "resolution":
            assert self.bundle is not None
            host = getattr(self.bundle, "host_step", self.bundle.step)(self.bundle_step)
            index = host.layers[name].index.cpu() if host is not None else anchor.index.cpu()
            keep = self._resolution_keep(anchor.num_tokens).reshape(-1)[index]
            return [keep] * self.num_images
        return [keep_mask(anchor.index.shape[0], cfg.share_dropout, seed, self.step, layer, KIND_SHARE)
                for seed in self.seeds]

    def _resolution_keep(self, num_tokens: int) -> torch.Tensor:
        assert self.role == ROLE_ANCHORS or self.bundle is not None
        seeds = self.seeds if self.role == ROLE_ANCHORS else self.bundle.meta["anchor_seeds"]
        return resolution_keep(seeds, self.step, num_tokens, self.config.share_dropout)  # cached

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
        # (G, F, N, C): the consistent images of every shared guidance branch, harmonized at once.
        together = joined_rows(shared_rows)
        if together is not None:  # no vanilla rows between the branches: a view
            images = features[together].view(len(shared_rows), -1, *features.shape[1:])
        else:
            images = torch.stack([features[rows] for rows in shared_rows])
        if self.role == ROLE_ANCHORS:
            # Each anchor against the other anchors' subject patches (a simultaneous update).
            references, valid, every_used = images, masks, False
            pairs = ~torch.eye(self.num_images, dtype=torch.bool, device=masks.device)
        else:
            found = self._anchor_references(name)
            if found is None:
                return features
            references, valid, every_used = found
            references, pairs = references.to(features.dtype), None
        keep = torch.stack([keep_mask(masks.shape[1], cfg.rfh_dropout, seed, self.step, layer_id(name), KIND_RFH)
                            for seed in self.seeds])
        active = masks & to_device(keep, masks.device)
        harmonized = harmonize_batch(images, active, references, valid, cfg.rfh_gamma, cfg.rfh_tau, pairs, every_used)
        if together == slice(0, features.shape[0]):  # every row of the batch is a shared one
            return harmonized.view(features.shape)
        out = features.clone()
        if together is not None:
            out[together] = harmonized.flatten(0, 1)
        else:
            for branch, rows in enumerate(shared_rows):
                out[rows] = harmonized[branch]
        return out

    def _anchor_references(self, name: str) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """The anchors' RFH references of one shared layer (frame role): (G, A, Q, C) features,
        padded, and their (A, Q) validity, on the device, and whether every anchor has a token
        (known on the host); gathered with slots computed on the host
        (``SharedLayerState.reference_slots``), so the host never waits for the device."""
        anchor = self.anchor_layer(name)
        if anchor is None or self.bundle is None or anchor.index.numel() == 0:
            return None
        host = getattr(self.bundle, "host_step", self.bundle.step)(self.bundle_step)
        return anchor.padded_references(self.bundle.num_anchors, host.layers.get(name) if host is not None else None)

    # ---- ConsiStory's feature injection (core/consistory.py) -----------------------------
    def injects(self, num_tokens: int) -> bool:
        """Whether a self-attention layer of ``num_tokens`` patches injects at this step."""
        inj = self.injection
        return inj is not None and self.pass_index == 1 and inj.injects_at(self.step, num_tokens)

    def inject(self, name: str, outputs: torch.Tensor) -> torch.Tensor:
        """Pass 2's injection into one layer's (B, N, C) attention outputs, on the consistent
        images of the conditional branch; the anchors publish their result for the frames.

        The anchors' first injection step also publishes the references frames match against."""
        assert self.injection is not None
        rows = self.rows(COND, CONSISTENT)
        if self.role == ROLE_ANCHORS:
            injected = self.injection.inject(outputs[rows], None, None)
            published = self._published_step()
            dtype = getattr(torch, self.config.anchor_dtype or default_anchor_dtype(str(outputs.dtype)))
            published.outputs[name] = injected.to("cpu", dtype)
            if self.step == min(self.injection.steps) and not published.references:
                published.references = self.injection.references(dtype)
        else:
            anchor_step = self.bundle.step(self.bundle_step) if self.bundle is not None else None
            first = self.bundle.step(self.num_steps + min(self.injection.steps)) if self.bundle is not None else None
            if anchor_step is None or name not in anchor_step.outputs or first is None or not first.references:
                return outputs  # the anchors published nothing to inject here
            references = {k: v.to(outputs.device) for k, v in first.references.items()}
            injected = self.injection.inject(outputs[rows], anchor_step.outputs[name].to(outputs.device), references)
        result = outputs.clone()
        result[rows] = injected.to(outputs.dtype)
        return result

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
            window = self.config.mask_source == "window"
            aggregated = self._aggregate(per_subject=window)
            if aggregated is not None and window:
                # ConsiStory's release: the mean over layers and the last mask_window steps, per
                # subject (subject_mask thresholds each subject on its own and unites them).
                self._window.append(aggregated[0])
                aggregated = (torch.stack(list(self._window)).mean(dim=0), aggregated[1])
            if aggregated is not None:
                self._mask_map, self._mask_hw = aggregated  # the next step's masks
                self._last_map = aggregated
        self._mask_fixed = False
        self._maps = {}
        self._mask_cache = {}
        self._anchor_cache = {}
        self._subject_index.clear()
        self.step += 1
