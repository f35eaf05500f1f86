"""Regional Feature Harmonization, RFH (paper Eq. 9-11).

R is the self-attention output of a shared layer (heads merged, before the output projection):
per subject patch r of image i we find its best-matching subject patch in each reference image j
by a temperature softmax over cosine similarities (Eq. 9-10) and move R_i(r) towards it by gamma
(Eq. 11), only inside the subject mask and only where the match score passes Otsu's threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .otsu import otsu_split

# The most score elements (G x F x A x patches x Q) one chunk of harmonize_batch computes at once:
# 2**24 float32 values, 64 MiB, and about three times that in transient copies.
SCORE_CHUNK_ELEMENTS = 1 << 24


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


def harmonize_batch(
    features: torch.Tensor,
    active: torch.Tensor,
    references: torch.Tensor,
    reference_valid: torch.Tensor,
    gamma: float,
    tau: float,
    pairs: torch.Tensor | None = None,
    every_reference_used: bool = False,
) -> torch.Tensor:
    """Eq. 9-11 for a batch of images against a batch of reference sets, dense: every patch is
    matched and the mask decides with ``torch.where``, so nothing here makes the host wait for
    the device (no ``nonzero``, no boolean indexing) and one call does every image, reference
    and guidance branch.

    A patch r of image f is harmonized when ``active[f, r]``; it is compared with the valid
    patches of each reference set a that ``pairs[f, a]`` allows and that has at least one; a
    match counts when its score passes Otsu's threshold over image f's active patches for that
    reference (a constant score row: every match counts); the adaptation vectors of the counting
    references are averaged (Eq. 11). Equal to :func:`harmonize_regions` image by image.

    Args:
        features: (G, F, N, C) R of F images in G guidance branches.
        active: (F, N) boolean, the patches to harmonize (subject mask and RFH dropout).
        references: (G, A, Q, C) A reference sets per branch, padded to Q patches.
        reference_valid: (A, Q) boolean, False on padding (or on a reference's non-subject patch).
        gamma: harmonization coefficient.
        tau: temperature of Eq. 9.
        pairs: optional (F, A) boolean, which references each image uses (default: all).
        every_reference_used: the caller knows (on the host) that every reference set has a valid
            patch, so none is left out for being empty (fewer device ops).
    Returns:
        (G, F, N, C) harmonized features, in ``features``' dtype.
    """
    g, f, n, c = features.shape
    a, q = references.shape[1], references.shape[2]
    regions = features.float()
    refs = references.float().reshape(g, a * q, c)
    unit_refs = F.normalize(refs, dim=-1).transpose(1, 2)  # (G, C, A*Q)
    padding = ~reference_valid.view(1, 1, a, q)
    # Eq. 9-10 in chunks of patches, so the (G, F, rows, A, Q) scores stay within
    # SCORE_CHUNK_ELEMENTS whatever the image size (chosen from shapes: no device value decides).
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, g * f * a * q))
    scores, matches = [], []
    for start in range(0, n, rows):
        part = regions[:, :, start:start + rows]
        cosine = torch.bmm(F.normalize(part, dim=-1).reshape(g, -1, c), unit_refs).view(g, -1, a, q)
        compat = torch.softmax((cosine / tau).masked_fill(padding, -torch.inf), dim=-1)  # Eq. 9
        score, match = compat.max(dim=-1)  # Eq. 10: (G, F*rows, A)
        scores.append(score.view(g, f, -1, a))
        matches.append(match.view(g, f, -1, a))
    score = scores[0] if len(scores) == 1 else torch.cat(scores, dim=2)  # (G, F, N, A)
    match = matches[0] if len(matches) == 1 else torch.cat(matches, dim=2)
    within = active[None, :, :, None]  # (1, F, N, 1)
    if not every_reference_used or pairs is not None:
        used = reference_valid.any(dim=-1)[None, :]  # a reference with no patch is left out
        used = (used if pairs is None else used & pairs)[None, :, None, :]  # (1, F, 1, A)
        score = torch.where(used, score, 0.0)  # an empty reference's NaN row
        within = within & used
    # Otsu over each (branch, image, reference)'s active patches: rows of the last dim, as views.
    thr, constant = otsu_split(score.transpose(2, 3), within=within.transpose(2, 3))  # (G, F, A)
    # A constant score row carries no evidence to reject any match.
    gate = ((score > thr[:, :, None]) | constant[:, :, None]) & within  # (G, F, N, A)
    # Eq. 11: the matched reference patches of every set at once, (G, F, N, A, C).
    flat = (match + _set_offsets(a, q, match.device)).view(g, -1)
    matched = refs[_branch_index(g, refs.device), flat].view(g, f, n, a, c)
    gate = gate.to(regions.dtype)
    delta = (gate[..., None] * (matched - regions[:, :, :, None])).sum(dim=3)
    votes = gate.sum(dim=3, keepdim=True).clamp(min=1.0)
    moved = (regions + gamma * delta / votes).to(features.dtype)
    return torch.where(active[None, :, :, None], moved, features)


_RANGES: dict[tuple[int, int, str], torch.Tensor] = {}


def _set_offsets(a: int, q: int, device: torch.device) -> torch.Tensor:
    """(A,) the first flat slot of each of A reference sets of Q slots (made once per shape)."""
    key = (a, q, str(device))
    if key not in _RANGES:
        _RANGES[key] = torch.arange(0, a * q, q, device=device)
    return _RANGES[key]


def _branch_index(g: int, device: torch.device) -> torch.Tensor:
    """(G, 1) the branch of each row, for indexing (G, M, C) by (G, K) slots (made once)."""
    key = (g, 0, str(device))
    if key not in _RANGES:
        _RANGES[key] = torch.arange(g, device=device)[:, None]
    return _RANGES[key]


def harmonize_regions(
    features: torch.Tensor,
    mask: torch.Tensor,
    references: list[torch.Tensor],
    gamma: float,
    tau: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 11 for one image against one or more reference images (:func:`harmonize_batch` for
    one image, with the references padded).

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
    if not references:
        return features
    longest = max(max(r.shape[0] for r in references), 1)
    padded = features.new_zeros(len(references), longest, features.shape[-1])
    valid = torch.zeros(len(references), longest, dtype=torch.bool, device=features.device)
    for j, ref in enumerate(references):
        padded[j, : ref.shape[0]] = ref
        valid[j, : ref.shape[0]] = True
    return harmonize_batch(features[None, None], active[None], padded[None], valid, gamma, tau)[0, 0]
