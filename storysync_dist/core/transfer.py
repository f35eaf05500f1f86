"""Host-to-device copies that do not make the host wait for the device.

A copy from pageable host memory to a CUDA device blocks the host until the copy has run, and so
until the device has finished the work queued before it. From pinned memory with
``non_blocking=True`` the copy is queued like a kernel. torch's pinned allocator keeps the block
until the queued copy has used it, so the host tensor may be dropped at once.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (a host tensor) on ``device``: on CUDA, pinned first and copied ``non_blocking``.

    Args:
        tensor: any host tensor (small: dropout masks, gather indices).
        device: the compute device.
    Returns:
        the tensor on ``device`` (``tensor`` itself when it is already there).
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
