"""How the anchors' published tensors leave the device without stalling the render (issue 23).

- :class:`SubjectIndex`: the flat subject-token index of the anchors' masks, found once per step
  for every resolution at once (one host copy per step; the first step, which does not know yet
  which resolutions the shared layers have, copies every resolution the latent tiles into);
- :class:`HostCopies`: device tensors copied into page-locked host memory on a side CUDA stream,
  waited for once per step (``wait``) before the step leaves the process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .masks import latent_token_counts
from .transfer import to_device


class SubjectIndex:
    """The flat subject-token index (anchor * N + position) of the anchors' (A, N) masks at each
    resolution N of a step, on the host and on the device."""

    def __init__(self, num_images: int, latent_hw: tuple[int, int] | None = None) -> None:
        self.num_images = num_images
        self._found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sizes: list[int] = []  # the N of every shared layer that published so far
        # The N a shared layer may have (every resolution the latent tiles into), until a step has
        # learned which ones the shared layers have.
        self._guesses = latent_token_counts(latent_hw) if latent_hw is not None else []
        self._learned = False

    def get(self, num_tokens: int, masks: torch.Tensor, masks_at: Callable[[int], torch.Tensor],
            guess: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(host index, device index) of ``masks`` (A, N); ``masks_at(n)`` gives this step's masks
        at another resolution n, so every resolution published so far (at the first step: every
        guess, unless ``guess`` is False: ``masks_at`` cannot make masks at other resolutions) is
        found with one copy."""
        if num_tokens not in self._sizes:
            self._sizes.append(num_tokens)
        found = self._found.get(num_tokens)
        if found is None:
            others = self._sizes if self._learned or not guess else [*self._sizes, *self._guesses]
            sizes = list(dict.fromkeys([num_tokens, *others]))
            flat = torch.cat([masks.reshape(-1), *(masks_at(n).reshape(-1) for n in sizes[1:])]).cpu()
            for n, part in zip(sizes, flat.split([self.num_images * n for n in sizes]), strict=True):
                host = part.nonzero(as_tuple=True)[0]
                self._found[n] = (host, to_device(host, masks.device))
            found = self._found[num_tokens]
        return found

    def clear(self) -> None:
        """A new step: new masks (and, after a step that published, the resolutions are known)."""
        self._found = {}
        self._learned = self._learned or bool(self._sizes)


class HostCopies:
    """Host copies of device tensors for the anchor bundle: on CUDA, queued on a side stream into
    page-locked memory, so the render goes on; ``wait`` waits for them (once per step)."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._pending = False

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s host copy (complete after the next ``wait`` on CUDA)."""
        cuda = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        if not cuda:
            host.copy_(tensor, non_blocking=True)  # a plain copy off CUDA (the same call, for bench/op_census.py)
            return host
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the values are computed
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self._stream)  # the device block stays until the copy has read it
        self._pending = True
        return host

    def wait(self) -> None:
        """Every copy queued so far is done."""
        if self._pending and self._stream is not None:
            self._stream.synchronize()
            self._pending = False
