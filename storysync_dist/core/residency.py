"""Where a frame worker keeps a story's anchor bundle (``--bundle-on device|host|auto``).

A frame's denoising step t reads only anchor step t (Eq. 13), so the device never needs the
whole bundle at once:

- ``device``: every step is copied to the compute device the first time a frame needs it and kept
  there for the story's later frames (no copy per frame; the device holds the whole bundle, about
  300 MB per step for SDXL at 1024 px, computed in docs/memory.md);
- ``host``: the steps stay in host memory (page-locked when the device is a GPU) and a window of
  two travels: when step t is taken, step t + 1 is copied on a side stream while step t renders,
  and the device copies of earlier steps are dropped. The device holds at most two steps;
- ``auto``: ``device`` when the whole bundle (estimated from the first step) fits in a quarter of
  the device's free memory, else ``host``. On a CPU both are the same memory, and ``auto`` is
  ``device``.

The copies are exact, so the pixels are the same for every placement.
"""

from __future__ import annotations

from typing import Any

import torch

from .anchors import AnchorBundle, AnchorStep

PLACEMENTS = ("device", "host", "auto")
# ``auto`` keeps the bundle on the device while it takes at most this share of the free memory:
# the rest is for the activations of the frame batch (and the vanilla branch), which grow with it.
AUTO_DEVICE_SHARE = 0.25


def _copy_step(step: AnchorStep, device: torch.device, *, non_blocking: bool = False) -> AnchorStep:
    """``step`` with every tensor on ``device`` (a copy even when the device is the CPU)."""
    return step.map_tensors(lambda t: t.to(device, non_blocking=non_blocking, copy=True))


def _pinned(step: AnchorStep) -> AnchorStep:
    """``step`` in page-locked host memory, so its copies to a GPU run asynchronously."""
    return step.map_tensors(lambda t: t.cpu().pin_memory())


def _tensors(step: AnchorStep) -> list[torch.Tensor]:
    return step.tensors()


def resolve_placement(placement: str, device: torch.device, step_bytes: int, num_steps: int) -> str:
    """``device`` or ``host`` for ``placement`` (``auto`` decides from free device memory)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"bundle placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    if placement != "auto":
        return placement
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if step_bytes * num_steps <= AUTO_DEVICE_SHARE * free else "host"


class PlacedBundle:
    """An :class:`AnchorBundle` read through a placement: ``step(t)`` is step t on ``device``.

    It has the bundle's ``meta``, ``num_anchors`` and ``nbytes``, so the engine uses it wherever
    it uses a bundle. One per story and worker: the ``device`` placement keeps its copies for the
    story's later frames. ``resident_steps`` is how many steps are on the device now and
    ``peak_resident_steps`` (``peak_resident_bytes``) the most there were at once.
    """

    def __init__(self, bundle: AnchorBundle, device: torch.device | str, placement: str = "auto") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"bundle placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
        self.bundle = bundle
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # how tensors name it
        self.requested = placement
        self.placement: str | None = None if placement == "auto" else placement
        self._on_device: dict[int, AnchorStep] = {}
        # Running totals of the resident steps, updated where a step arrives or leaves (``_keep``,
        # ``_drop``): a frame reads step t once per shared layer, and counting the bytes of every
        # resident step at each read cost more than the frame's budget for all of this.
        self._step_bytes: dict[int, int] = {}
        self._resident_bytes = 0
        self._window: int | None = None  # ``host``: the step whose window (t and t + 1) is in place
        self._host: dict[int, AnchorStep] = {}  # host steps (pinned on a GPU), for ``host``
        self._events: dict[int, Any] = {}  # step -> CUDA event of its side-stream copy
        self._stream: Any = None
        self.peak_resident_steps = 0
        self.peak_resident_bytes = 0

    # What the engine reads of a bundle.
    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def num_anchors(self) -> int:
        return self.bundle.num_anchors

    def nbytes(self) -> int:
        return self.bundle.nbytes()

    @property
    def resident_steps(self) -> int:
        return len(self._on_device)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def host_step(self, t: int) -> AnchorStep | None:
        """Anchor step t as the bundle holds it, in host memory: what the host reads without
        waiting for the device (the published positions a share-dropout draw is read at)."""
        return self.bundle.step(t)

    def step(self, t: int) -> AnchorStep | None:
        """Anchor step t on the device (None for a step that publishes nothing).

        Returns at once when step t is resident with no copy to wait for (and, with ``host``,
        its window already in place with step t + 1 queued): the frame's later layers at step t.
        """
        resident = self._on_device.get(t)
        if resident is not None and t not in self._events and (
            self.placement != "host" or (self._window == t and t + 1 in self._on_device)
        ):
            return resident
        if resident is None:
            host = self.bundle.step(t)
            if host is None:
                return None
            if self.placement is None:
                total = max(1, int(self.bundle.meta.get("steps", 1)))
                self.placement = resolve_placement(self.requested, self.device, host.nbytes(), total)
            self._keep(t, self._to_device(t, host))
        elif t in self._events:
            # The side-stream copy of this step was queued while step t - 1 rendered: the compute
            # stream waits for it on the device, the host does not.
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(t))
        if self.placement == "host":
            for old in [s for s in self._on_device if s not in (t, t + 1)]:
                self._drop(old)  # the device holds step t and (below) step t + 1
            self._prefetch(t + 1)  # retried by each read of step t until step t + 1 exists
            self._window = t
        self.peak_resident_steps = max(self.peak_resident_steps, len(self._on_device))
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes)
        return self._on_device[t]

    def _keep(self, t: int, step: AnchorStep) -> None:
        """Make ``step`` the resident step t, counting its bytes once."""
        self._drop(t)
        self._on_device[t] = step
        self._step_bytes[t] = step.nbytes()
        self._resident_bytes += self._step_bytes[t]

    def _drop(self, t: int) -> None:
        """Let the device copy of step t go (and its pending copy event)."""
        if self._on_device.pop(t, None) is not None:
            self._resident_bytes -= self._step_bytes.pop(t)
        self._events.pop(t, None)

    def _host_step(self, t: int, host: AnchorStep | None = None) -> AnchorStep | None:
        if t not in self._host:
            host = self.bundle.step(t) if host is None else host
            if host is None:
                return None
            self._host[t] = _pinned(host) if self.device.type == "cuda" else host
        return self._host[t]

    def _to_device(self, t: int, host: AnchorStep) -> AnchorStep:
        if self.placement == "host":
            # A copy even on a CPU, so the window is the same code (and bound) everywhere.
            return _copy_step(self._host_step(t, host) or host, self.device)
        if all(x.device == self.device for x in _tensors(host)):
            return host  # already there (a CPU render, or steps made on this device)
        return _copy_step(host, self.device)

    def _prefetch(self, t: int) -> None:
        """Queue step t's copy to the device while the current step renders (``host`` placement).
        Only a step the bundle already holds is taken: a streamed step still to come is fetched
        when a frame reaches it, so a prefetch never waits for the anchors."""
        if t in self._on_device or not self._available(t):
            return
        host = self._host_step(t)
        if host is None:
            return
        if self.device.type != "cuda":
            self._keep(t, _copy_step(host, self.device))
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        # No wait on the compute stream: the source is host memory nothing writes, and the copy
        # goes to new memory, so it may run while the current step's kernels do.
        with torch.cuda.stream(self._stream):
            copied = _copy_step(host, self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        for tensor in _tensors(copied):
            tensor.record_stream(compute)  # used on the compute stream: freed only after that use
        self._keep(t, copied)
        self._events[t] = event

    def _available(self, t: int) -> bool:
        has = getattr(self.bundle, "has_step", None)
        return has(t) if has is not None else t in self.bundle.steps
