"""Masked cross-image attention sharing (paper Eq. 5-8) and its anchor form (Eq. 13).

Eq. 7 writes the shared attention of image i as a softmax over the keys of all images with the
log of a propagation mask Gamma_i (Eq. 5) added: image i sees all of its own tokens and only the
subject tokens of the others. Adding log 0 = -inf to a score removes that key, so we gather the
admitted keys instead: keys = [own tokens | subject tokens of the other images], and
``scaled_dot_product_attention`` runs on that set. Only padding between images of different
subject sizes needs an additive -inf bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def propagation_mask(masks: torch.Tensor, i: int) -> torch.Tensor:
    """Eq. 5: Gamma_i, the keys of the stacked batch that image i may attend to.

    Args:
        masks: (A, N) boolean subject masks M_j.
        i: the querying image.
    Returns:
        (A*N,) boolean: all of image i's tokens, and M_j for every other image j.
    """
    gamma = masks.clone()
    gamma[i] = True
    return gamma.reshape(-1)


def cross_image_tokens(
    tokens: torch.Tensor, masks: torch.Tensor, i: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The subject tokens of every image but ``i``, concatenated in image order.

    Args:
        tokens: (A, N, C) per-image tokens (hidden states, keys or values).
        masks: (A, N) boolean subject masks.
        i: the image whose view this is (its own tokens are excluded).
        keep: optional (A, N) boolean dropout mask for image i's view.
    Returns:
        (M, C) with M = sum over j != i of |M_j & keep_j|.
    """
    admitted = masks if keep is None else masks & keep
    others = [tokens[j][admitted[j]] for j in range(tokens.shape[0]) if j != i]
    if not others:
        return tokens.new_zeros(0, tokens.shape[-1])
    return torch.cat(others, dim=0)


def pad_token_sets(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sets of different lengths.

    Args:
        sets: B tensors of shape (M_b, C).
    Returns:
        padded (B, M_max, C) and valid (B, M_max) boolean.
    """
    longest = max((s.shape[0] for s in sets), default=0)
    channels = sets[0].shape[-1]
    padded = sets[0].new_zeros(len(sets), longest, channels)
    valid = torch.zeros(len(sets), longest, dtype=torch.bool, device=sets[0].device)
    for b, s in enumerate(sets):
        padded[b, : s.shape[0]] = s
        valid[b, : s.shape[0]] = True
    return padded, valid


def gather_shared_tokens(
    keys: torch.Tensor, values: torch.Tensor, keeps: list[torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[int]]:
    """Eq. 13 for a batch of frames: the anchor tokens each frame keeps after its share dropout,
    gathered and padded in one indexing, without a host-device synchronisation.

    The keep masks are drawn on the CPU (``core.dropout``), so the indices and every length are
    known on the host; boolean indexing on the device would wait for the device once per frame.

    Args:
        keys, values: (M, C) the anchors' shared keys and values (on the device).
        keeps: B (M,) boolean CPU keep masks, one per frame.
    Returns:
        keys and values (B, M_max, C), the (B, M_max) validity of each slot (None when no slot is
        padding), and the B lengths; three Nones (and the lengths) when no frame keeps a token.
    """
    rows = [keep.cpu().nonzero(as_tuple=True)[0] for keep in keeps]
    lengths = [int(r.numel()) for r in rows]
    longest = max(lengths, default=0)
    if longest == 0:
        return None, None, None, lengths
    index = torch.zeros(len(rows), longest, dtype=torch.long)
    valid = torch.zeros(len(rows), longest, dtype=torch.bool)
    for b, r in enumerate(rows):
        index[b, : r.numel()] = r
        valid[b, : r.numel()] = True
    index = index.to(keys.device, non_blocking=True)
    gathered_k, gathered_v = keys[index], values[index]
    if all(n == longest for n in lengths):
        return gathered_k, gathered_v, None, lengths
    return gathered_k, gathered_v, valid.to(keys.device, non_blocking=True), lengths


def shared_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    shared_key: torch.Tensor | None = None,
    shared_value: torch.Tensor | None = None,
    shared_valid: torch.Tensor | None = None,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """Eq. 7-8 on a gathered key set: attention over own tokens plus shared subject tokens.

    Args:
        query, key, value: (B, H, N, d) the images' own projections.
        shared_key, shared_value: (B, H, M, d) the admitted tokens of other images, or None.
        shared_valid: (B, M) boolean, False on padding; None when every shared token is valid.
        lengths: optional B host-side counts of each row's valid slots (valid slots come first,
            as ``pad_token_sets`` lays them out): then no device value decides the path, so the
            host never waits for the device here.
    Returns:
        (B, H, N, d) attention output h_i.

    With no shared key at all (None, zero width, or every slot padding) this is exactly stock
    attention over the own tokens. A row of a mixed batch whose slots are all padding sees only
    -inf bias on them, so it too attends to its own tokens only.
    """
    if shared_key is None or shared_key.shape[2] == 0:
        return F.scaled_dot_product_attention(query, key, value)
    if shared_value is None:
        raise ValueError("shared_attention: shared_key given without shared_value")
    if shared_valid is not None:
        if lengths is not None:
            any_valid, all_valid = any(lengths), all(n == shared_key.shape[2] for n in lengths)
        else:  # two host-device synchronisations
            any_valid, all_valid = bool(shared_valid.any()), bool(shared_valid.all())
        if not any_valid:
            return F.scaled_dot_product_attention(query, key, value)
        if all_valid:
            shared_valid = None
    keys = torch.cat([key, shared_key], dim=2)
    values = torch.cat([value, shared_value], dim=2)
    bias = None
    if shared_valid is not None:
        # log(Gamma): 0 where admitted, -inf on padding; own tokens are always admitted.
        own = torch.ones(query.shape[0], key.shape[2], dtype=torch.bool, device=query.device)
        admitted = torch.cat([own, shared_valid], dim=1)
        bias = torch.zeros(admitted.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~admitted, float("-inf"))[:, None, None, :]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)
