"""Subject masks from cross-attention (paper Eq. 2-4).

The maps come from the conditional guidance branch; which layers' maps make the masks of a step
(the current step's encoder and mid block, or the previous step) is the state's business
(``core/state.py``, ``StorySyncConfig.mask_source``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .otsu import otsu_foreground


def subject_token_weights(
    token_positions: list[list[list[int]]], seq_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """Averaging weights over each subject's token positions.

    Args:
        token_positions: per image, per subject, the positions of that subject's tokens in the
            padded text sequence.
        seq_len: L, the text sequence length.
    Returns:
        (B, L, S) weights; column s of image b averages the positions of subject s.
    """
    num_images = len(token_positions)
    num_subjects = max((len(p) for p in token_positions), default=0)
    weights = torch.zeros(num_images, seq_len, num_subjects, device=device)
    for b, subjects in enumerate(token_positions):
        for s, positions in enumerate(subjects):
            if positions:
                weights[b, positions, s] = 1.0 / len(positions)
    return weights


def subject_attention(
    query: torch.Tensor, key: torch.Tensor, token_weights: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 2: the cross-attention probabilities of the subject tokens, averaged over heads.

    Args:
        query: (B, H, N, d) image-patch queries of one cross-attention layer.
        key: (B, H, L, d) text keys.
        token_weights: (B, L', S) from :func:`subject_token_weights`, L' >= L (a text cut to its
            first L tokens, as Kandinsky 3 cuts it, keeps the first L rows).
        bias: the layer's additive attention mask over the text, (B, L) or (B, 1, L) (padding
            tokens at -10000 or -inf), or None.
    Returns:
        (B, N, S) attention map of each subject over the N patches.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale  # (B, H, N, L)
    if bias is not None:
        scores = scores + bias.float().reshape(bias.shape[0], 1, 1, -1)
    probs = torch.softmax(scores, dim=-1)
    return probs.mean(dim=1) @ token_weights[:, : key.shape[2]].to(probs.dtype)


def aggregate_subject_maps(layer_maps: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 3-4: average the maps over layers, then sum over subjects.

    Args:
        layer_maps: L tensors of shape (B, N, S), all at one resolution.
    Returns:
        (B, N) aggregated subject map.
    """
    mean_over_layers = torch.stack(layer_maps, dim=0).mean(dim=0)  # Eq. 3
    return mean_over_layers.sum(dim=-1)  # Eq. 4


def latent_token_counts(latent_hw: tuple[int, int], levels: int = 6) -> list[int]:
    """The token counts N of the resolutions a latent of ``latent_hw`` tiles into by halving, finest
    first: the resolutions a self-attention layer can have (each a valid ``token_grid``)."""
    lat_h, lat_w = latent_hw
    counts = []
    for k in range(levels):
        if lat_h % 2**k or lat_w % 2**k:
            break
        counts.append((lat_h >> k) * (lat_w >> k))
    return counts


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``num_tokens`` patches in a UNet whose latent is ``latent_hw``."""
    lat_h, lat_w = latent_hw
    factor = math.sqrt(lat_h * lat_w / num_tokens)
    h, w = round(lat_h / factor), round(lat_w / factor)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not tile a latent of {lat_h}x{lat_w}")
    return h, w


def subject_mask(aggregated: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resize an aggregated map to a self-attention resolution and threshold it with Otsu.

    Args:
        aggregated: (B, h_src*w_src) map from :func:`aggregate_subject_maps`; or (B, h_src*w_src,
            S) per-subject maps (``mask_source: window``), which :func:`subject_mask_union`
            thresholds subject by subject.
        src_hw: its grid (h_src, w_src).
        dst_hw: the target grid (h, w).
    Returns:
        (B, h*w) boolean subject mask M_i.
    """
    if aggregated.ndim == 3:
        return subject_mask_union(aggregated, src_hw, dst_hw)
    maps = aggregated.float().reshape(-1, 1, *src_hw)
    if tuple(src_hw) != tuple(dst_hw):
        maps = F.interpolate(maps, size=dst_hw, mode="bilinear", align_corners=False)
    return otsu_foreground(maps.flatten(1))


def subject_mask_union(maps: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Each subject's map resized to a self-attention resolution and thresholded with Otsu on its
    own, then the subjects' masks united (ConsiStory's release, ``mask_source: window``).

    Args:
        maps: (B, h_src*w_src, S) per-subject maps (averaged over layers and steps, not summed).
        src_hw: their grid (h_src, w_src).
        dst_hw: the target grid (h, w).
    Returns:
        (B, h*w) boolean: a patch is in the mask when it is in any subject's Otsu foreground. A
        subject column of zeros (an image with fewer subjects) is a constant map: no foreground.
    """
    batch, _, subjects = maps.shape
    if subjects == 0:
        return torch.zeros(batch, dst_hw[0] * dst_hw[1], dtype=torch.bool, device=maps.device)
    grid = maps.float().permute(0, 2, 1).reshape(batch * subjects, 1, *src_hw)
    if tuple(src_hw) != tuple(dst_hw):
        grid = F.interpolate(grid, size=dst_hw, mode="bilinear", align_corners=False)
    foreground = otsu_foreground(grid.flatten(1))  # (B*S, h*w)
    return foreground.reshape(batch, subjects, -1).any(dim=1)
