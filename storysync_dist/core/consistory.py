"""ConsiStory's feature injection as NVlabs released it (Tewel et al. 2024, Sec. 3.3).

The release renders twice. Pass 1 (shared attention, query blending) yields, per image, the DIFT
features (the output of the UNet's first decoder block, ``up_blocks[0]``, on the conditional half,
at the timestep nearest 261) and the image's final subject masks. Between the passes each image's
subject patches are matched to their nearest subject patch in the reference images on those
features. Pass 2 renders the same latents again and, in the self-attention layers of the finest
attention resolution, in encoder and decoder, on the conditional half and for steps
``n // 10 .. n // 3``, moves each gated subject patch of the attention output (after the output
projection) towards its single nearest reference patch by ``alpha = 0.8``.

The gate is the image's own pass-1 subject mask and a nearest-neighbour distance under Otsu's
threshold of all the image's distances (the release's ``dist_thr='dynamic'``).

Each function here is one piece of that, on plain tensors; the engine composes them
(``docs/evaluation.md``, "Baselines", says where and why the composition differs from the release).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .otsu import otsu_threshold

__all__ = [
    "DIFT_TIMESTEP",
    "INJECT_ALPHA",
    "dift_step",
    "gaussian_smooth",
    "inject_nearest",
    "injection_gate",
    "injection_steps",
    "nearest_patches",
    "nearest_reference_patches",
]

# The release's DIFTLatentStore(steps=[261], up_ft_indices=[0]): the first decoder block's output
# at timestep 261 (step 36 of DDIM's 50 "leading" steps with steps_offset 1).
DIFT_TIMESTEP = 261
INJECT_ALPHA = 0.8  # inject_range_alpha=[(n_steps // 10, n_steps // 3, 0.8)]
# A non-subject reference patch is never a match: the release sets its distance to 2, above any
# cosine distance.
_NOT_SUBJECT = 2.0


def dift_step(timesteps: Sequence[int | float]) -> int:
    """The step whose timestep is nearest ``DIFT_TIMESTEP`` (the first of equals).

    The release keys its features by the exact timestep 261 and finds none (a crash) when the
    schedule skips it, which is every schedule but DDIM's 50 leading steps; the nearest step is
    the same step where 261 exists and a defined one elsewhere.

    Args:
        timesteps: the scheduler's timesteps in sampling order (high to low).
    Returns:
        an index into ``timesteps``.
    """
    if not timesteps:
        raise ValueError("no timesteps")
    return min(range(len(timesteps)), key=lambda i: abs(float(timesteps[i]) - DIFT_TIMESTEP))


def injection_steps(num_steps: int) -> range:
    """Steps at which pass 2 injects: ``n // 10 ..= n // 3`` (50 steps: 5..16)."""
    return range(num_steps // 10, num_steps // 3 + 1)


def gaussian_smooth(features: torch.Tensor, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Each channel convolved with a normalized Gaussian, zero padding (the release's
    ``gaussian_smooth(x, kernel_size=3, sigma=1)`` applied to every image's DIFT features).

    Args:
        features: (C, h, w).
    Returns:
        (C, h, w) in ``features.dtype``.
    """
    centre = (kernel_size - 1) / 2
    axis = torch.arange(kernel_size, dtype=torch.float64) - centre
    kernel = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(features.dtype).to(features.device)
    weight = kernel.expand(features.shape[0], 1, kernel_size, kernel_size)
    return F.conv2d(features[None], weight, padding=kernel_size // 2, groups=features.shape[0])[0]


def _patches(features: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) features resized bilinearly to (size, size): (size * size, C), row-major."""
    resized = F.interpolate(features[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized.permute(1, 2, 0).reshape(size * size, -1)


def nearest_patches(
    reference: torch.Tensor, reference_mask: torch.Tensor, target: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every target patch's nearest subject patch of one reference image (the release's
    ``gen_nn_map``): cosine distance of the features resized to ``size`` x ``size``.

    Args:
        reference: (C, h, w) the reference image's (smoothed) DIFT features.
        reference_mask: (size * size,) boolean subject mask of the reference at ``size``.
        target: (C, h', w') the target image's features.
        size: the side of the patch grid (a self-attention resolution).
    Returns:
        index (size * size,) into the reference's patches, distance (size * size,) float32
        (``_NOT_SUBJECT`` when the reference has no subject patch).
    """
    src = F.normalize(_patches(reference, size), dim=-1)
    tgt = F.normalize(_patches(target, size), dim=-1)
    distance = 1.0 - src @ tgt.T  # (reference patch, target patch)
    distance[~reference_mask.to(distance.device)] = _NOT_SUBJECT
    best, index = distance.min(dim=0)
    return index, best


def nearest_reference_patches(
    references: torch.Tensor, reference_masks: torch.Tensor, target: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every target patch's single nearest subject patch over all reference images (the
    release's ``anchor_nn_map`` then ``swap_strategy='min'``: the reference with the smallest
    distance, the first of equals).

    Args:
        references: (R, C, h, w) the reference images' features.
        reference_masks: (R, size * size) their subject masks at ``size``.
        target: (C, h, w) the target's features.
        size: the patch grid's side.
    Returns:
        reference (P,) which image, patch (P,) which of its patches, distance (P,), P = size².
    """
    pairs = [nearest_patches(references[r], reference_masks[r], target, size) for r in range(references.shape[0])]
    indices = torch.stack([index for index, _ in pairs])  # (R, P)
    distances = torch.stack([distance for _, distance in pairs])
    best, reference = distances.min(dim=0)
    patch = indices.gather(0, reference[None])[0]
    return reference, patch, best


def injection_gate(mask: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Which patches are injected: the image's own subject mask and a nearest-neighbour distance
    under Otsu's threshold of all its patches' distances (``dist_thr='dynamic'``).

    Args:
        mask: (P,) boolean subject mask of the target at this resolution (pass 1's final mask).
        distance: (P,) from ``nearest_reference_patches``.
    Returns:
        (P,) boolean.
    """
    return mask.to(distance.device) & (distance < otsu_threshold(distance.float()))


def inject_nearest(
    output: torch.Tensor,
    reference_outputs: torch.Tensor,
    reference: torch.Tensor,
    patch: torch.Tensor,
    gate: torch.Tensor,
    alpha: float = INJECT_ALPHA,
) -> torch.Tensor:
    """Move gated patches towards their nearest reference patch (``inject_anchors``):
    ``out[p] = alpha * ref_out[reference[p], patch[p]] + (1 - alpha) * out[p]`` where gate[p].

    Args:
        output: (P, C) the target's attention output (after the output projection).
        reference_outputs: (R, P, C) the references' outputs of the same layer and step.
        reference, patch, gate: (P,) from ``nearest_reference_patches`` and ``injection_gate``.
    Returns:
        (P, C) a new tensor.
    """
    matched = reference_outputs[reference.to(output.device), patch.to(output.device)].to(output.dtype)
    gate = gate.to(output.device)[:, None]
    return torch.where(gate, alpha * matched + (1 - alpha) * output, output)


def grid_side(num_tokens: int) -> int:
    """The side of a square patch grid of ``num_tokens`` patches."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} patches are not a square grid")
    return side


class FeatureInjection:
    """One render's ConsiStory injection state (``StorySyncState.injection``).

    Pass 1 records every image's DIFT features (``record_dift``) and, when it ends, its final mask
    map (``end_first_pass``). Pass 2 injects (``inject``) at the finest self-attention resolution
    (``note_self_attention`` learns it in pass 1) on the steps of ``injection_steps``: frames from
    the anchors' published outputs, matched on the anchors' published references; anchors from
    each other, in anchor order, each reading the outputs as updated so far (the release updates
    its output tensor in place, image by image).
    """

    def __init__(self, num_images: int, num_steps: int) -> None:
        self.num_images = num_images
        self.steps = set(injection_steps(num_steps))
        self.tokens = 0  # N of the finest self-attention layers
        self.dift: torch.Tensor | None = None  # (F, C, h, w) smoothed, float32
        self.masks: torch.Tensor | None = None  # (F, N) pass-1 final masks at ``tokens``
        self._plans: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def note_self_attention(self, num_tokens: int) -> None:
        self.tokens = max(self.tokens, num_tokens)

    def record_dift(self, features: torch.Tensor) -> None:
        """(F, C, h, w) first-decoder-block output of the conditional images at the DIFT step."""
        self.dift = torch.stack([gaussian_smooth(f.float()) for f in features])

    def end_first_pass(self, masks: torch.Tensor | None) -> None:
        """Pass 1's final (F, N) subject masks at the injection resolution (None: no mask map,
        nothing is injected)."""
        if self.dift is None:
            raise RuntimeError("feature injection: pass 1 recorded no DIFT features (the DIFT step never ran)")
        self.masks = masks

    def injects_at(self, step: int, num_tokens: int) -> bool:
        return step in self.steps and num_tokens == self.tokens and self.masks is not None

    def references(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What the anchors publish for the frames' matching (``AnchorStep.references``)."""
        assert self.dift is not None and self.masks is not None
        return {"dift": self.dift.to("cpu", dtype), "subject_masks": self.masks.cpu()}

    def _plan(self, references: dict[str, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image: (reference, patch, gate) at the injection resolution; ``references`` are the
        anchors' (frames), None for anchors matching each other (a reference index is an anchor)."""
        if self._plans is not None:
            return self._plans
        assert self.dift is not None and self.masks is not None
        side = grid_side(self.tokens)
        plans = []
        for i in range(self.num_images):
            if references is not None:
                ref_dift, ref_masks, which = references["dift"].float(), references["subject_masks"], None
            else:
                which = torch.tensor([j for j in range(self.num_images) if j != i], dtype=torch.long)
                ref_dift, ref_masks = self.dift[which], self.masks[which]
            if ref_dift.shape[0] == 0:
                plans.append((torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(self.tokens, dtype=torch.bool),))
                continue
            reference, patch, distance = nearest_reference_patches(
                ref_dift.to(self.dift.device), ref_masks.to(self.dift.device), self.dift[i], side)
            if which is not None:
                reference = which[reference]
            plans.append((reference, patch, injection_gate(self.masks[i], distance)))
        self._plans = plans
        return plans

    def inject(self, outputs: torch.Tensor, reference_outputs: torch.Tensor | None,
               references: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Pass 2's injection into one layer's conditional outputs.

        Args:
            outputs: (F, N, C) the images' attention outputs (after the output projection).
            reference_outputs: (A, N, C) the anchors' outputs of this layer and step (frames);
                None for the anchors themselves.
            references: the anchors' published ``references`` (frames); None for anchors.
        Returns:
            (F, N, C).
        """
        plans = self._plan(references)
        result = outputs.clone()
        for i, (reference, patch, gate) in enumerate(plans):
            if not bool(gate.any()):
                continue
            source = result if reference_outputs is None else reference_outputs  # anchors: in order
            result[i] = inject_nearest(result[i], source, reference, patch, gate)
        return result
