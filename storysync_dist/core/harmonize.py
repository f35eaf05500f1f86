"""Regional Feature Harmonization, RFH (paper Eq. 9-11).

R is the self-attention output of a shared layer (heads merged, before the output projection):
per subject patch r of image i we find its best-matching subject patch in each reference image j
by a temperature softmax over cosine similarities (Eq. 9-10) and move R_i(r) towards it by gamma
(Eq. 11), only inside the subject mask and only where the match score passes Otsu's threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .otsu import otsu_threshold


def region_compatibility(
    regions: torch.Tensor, reference: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9-10: best match in ``reference`` for every region, and its compatibility score.

    Args:
        regions: (P, C) features R_i(r) of the subject patches of image i.
        reference: (Q, C) features R_j(omega) of the subject patches Omega_j of image j.
        tau: softmax temperature.
    Returns:
        match (P,) index into ``reference`` (C_i(r, I_j)), score (P,) = max_omega H_ij(r, omega).
    """
    cosine = F.normalize(regions.float(), dim=-1) @ F.normalize(reference.float(), dim=-1).T
    compat = torch.softmax(cosine / tau, dim=-1)  # Eq. 9
    score, match = compat.max(dim=-1)  # Eq. 10
    return match, score


def harmonize_regions(
    features: torch.Tensor,
    mask: torch.Tensor,
    references: list[torch.Tensor],
    gamma: float,
    tau: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 11 for one image against one or more reference images.

    With several references, the adaptation vectors of the references whose match passes the
    Otsu gate are averaged.

    Args:
        features: (N, C) R_i of image i.
        mask: (N,) boolean subject mask M_i.
        references: J tensors (Q_j, C), the subject-patch features of the other images.
        gamma: harmonization coefficient.
        tau: temperature of Eq. 9.
        keep: optional (N,) boolean RFH dropout (False = leave this patch alone).
    Returns:
        (N, C) harmonized features R_hat_i.
    """
    active = mask if keep is None else mask & keep
    rows = active.nonzero(as_tuple=True)[0]
    references = [ref for ref in references if ref.shape[0] > 0]
    if rows.numel() == 0 or not references:
        return features
    regions = features[rows]
    delta = torch.zeros(regions.shape, dtype=torch.float32, device=features.device)
    votes = torch.zeros(rows.numel(), 1, dtype=torch.float32, device=features.device)
    for reference in references:
        match, score = region_compatibility(regions, reference, tau)
        thr = otsu_threshold(score)
        # A constant score row carries no evidence to reject any match.
        passed = (score > thr) | (score.amax() == score.amin())
        gate = passed.float()[:, None]
        delta += gate * (reference[match].float() - regions.float())
        votes += gate
    delta = delta / votes.clamp(min=1.0)
    out = features.clone()
    out[rows] = (regions.float() + gamma * delta).to(features.dtype)
    return out
