"""Masked cross-image attention sharing (paper Eq. 5-8) and its anchor form (Eq. 13).

Eq. 7 writes the shared attention of image i as a softmax over the keys of all images with the
log of a propagation mask Gamma_i (Eq. 5) added: image i sees all of its own tokens and only the
subject tokens of the others. Adding log 0 = -inf to a score removes that key, so we gather the
admitted keys instead: keys = [own tokens | subject tokens of the other images], and
``scaled_dot_product_attention`` runs on that set. Only padding between images of different
subject sizes needs an additive -inf bias.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .transfer import to_device


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
    worked out on the host (numpy) and copied to the device once; boolean indexing on the device
    would wait for the device once per frame.

    Args:
        keys, values: (..., M, C) the anchors' shared keys and values (on the device), with any
            leading dims (the guidance branches: every branch keeps the same tokens).
        keeps: B (M,) boolean CPU keep masks, one per frame.
    Returns:
        keys and values (..., B, M_max, C), the (B, M_max) validity of each slot (None when no
        slot is padding), and the B lengths; three Nones (and the lengths) when no frame keeps a
        token.
    """
    rows = [np.flatnonzero(keep.cpu().numpy()) for keep in keeps]
    lengths = [int(r.size) for r in rows]
    longest = max(lengths, default=0)
    if longest == 0:
        return None, None, None, lengths
    index = np.zeros((len(rows), longest), dtype=np.int64)
    valid = np.zeros((len(rows), longest), dtype=bool)
    for b, r in enumerate(rows):
        index[b, : r.size] = r
        valid[b, : r.size] = True
    flat = to_device(torch.from_numpy(index.reshape(-1)), keys.device)
    shape = (*keys.shape[:-2], len(rows), longest, keys.shape[-1])
    gathered_k = keys.index_select(-2, flat).view(shape)
    gathered_v = values.index_select(-2, flat).view(shape)
    if all(n == longest for n in lengths):
        return gathered_k, gathered_v, None, lengths
    return gathered_k, gathered_v, to_device(torch.from_numpy(valid), keys.device), lengths


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


def every_anchor_token(tokens: torch.Tensor) -> torch.Tensor:
    """Every anchor's tokens as one key set, for each querying anchor (a broadcast view).

    Args:
        tokens: (A, H, N, d) the anchors' keys or values.
    Returns:
        (A, H, A*N, d): row i holds anchor 0's N tokens, then anchor 1's, and so on.
    """
    a, h, n, d = tokens.shape
    return tokens.transpose(0, 1).reshape(1, h, a * n, d).expand(a, h, a * n, d)


def anchor_admitted(masks: torch.Tensor, keeps: torch.Tensor) -> torch.Tensor:
    """Eq. 5 for anchors over ``every_anchor_token``'s key set: which of the other anchors'
    tokens each anchor may attend to (their subject tokens its share dropout keeps; never its own,
    which it attends to as its own keys).

    Args:
        masks: (A, N) boolean subject masks.
        keeps: (A, A, N) boolean share-dropout keep masks, one (A, N) per querying anchor.
    Returns:
        (A, A*N) boolean.
    """
    a = masks.shape[0]
    others = ~torch.eye(a, dtype=torch.bool, device=masks.device)[:, :, None]
    return (masks[None] & keeps & others).reshape(a, -1)


def masked_shared_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    shared_key: torch.Tensor,
    shared_value: torch.Tensor,
    admitted: torch.Tensor,
) -> torch.Tensor:
    """Eq. 7-8 as written: one softmax over the own keys and a shared key set, with log Gamma
    (0 where admitted, -inf elsewhere) added to the shared keys' scores. Dense: no device value
    is read on the host, so it never waits for the device; own keys are always admitted, so no
    row is empty.

    Args:
        query, key, value: (B, H, N, d) the images' own projections (key/value may be longer
            than the query, FLUX's joint text and image tokens).
        shared_key, shared_value: (B, H, M, d) the candidate shared tokens.
        admitted: (B, M) boolean Gamma over them.
    Returns:
        (B, H, N, d) attention output.
    """
    keys = torch.cat([key, shared_key], dim=2)
    values = torch.cat([value, shared_value], dim=2)
    bias = torch.zeros(admitted.shape[0], key.shape[2] + admitted.shape[1], dtype=query.dtype, device=query.device)
    bias[:, key.shape[2]:].masked_fill_(~admitted, float("-inf"))
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias[:, None, None, :])

