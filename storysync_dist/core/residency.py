"""Where a frame worker keeps a story's anchor bundle (``--bundle-on device|host|auto``).

A frame's denoising step t reads only anchor step t (Eq. 13), so the device never needs the
whole bundle at once:

- ``device``: every step is copied to the compute device the first time a frame needs it and kept
  there for the story's later frames (no copy per frame; the device holds the whole bundle, about
  300 MB per step for SDXL at 1024 px, computed in docs/memory.md);
- ``host``: the steps stay in host memory and a window of two travels: when step t is taken,
  step t + 1 is copied on a side stream while step t renders, and the device copies of earlier
  steps are dropped. The device holds at most two steps. The copies leave from a ring of
  ``RING_SLOTS`` reusable staging buffers (page-locked when the device is a GPU,
  :class:`PinnedRing`): a background thread fetches the next steps (a streamed bundle's
  ``ray.get``) and copies them in, off the render thread, so page-locked memory stays at
  ``RING_SLOTS`` steps whatever the bundle, and is given back when the story ends (``close``);
- ``auto``: ``device`` when the whole bundle (estimated from the first step) fits in a quarter of
  the device's free memory, else ``host``. On a CPU both are the same memory, and ``auto`` is
  ``device``.

The copies are exact, so the pixels are the same for every placement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


# Staging buffers of the ``host`` placement: step t + 1 in flight to the device, step t + 2 being
# fetched, and one spare for the step a frame asks for out of order.
RING_SLOTS = 3


class PinnedRing:
    """At most ``size`` anchor steps staged in host memory (page-locked when ``pin``), in buffers
    reused from step to step, filled by one background thread.

    ``request(t)`` starts staging step t (the source's fetch, then a copy into a free buffer) and
    returns at once; ``get(t)`` waits for it (staging it on the calling thread when nothing was
    requested); ``release(t, event)`` hands the buffer back once ``event`` (the CUDA event after
    the device copy that reads it; None: already read) has completed. Off CUDA (``pin`` False)
    nothing is copied: a staged step is the source's own (``copy=True`` copies anyway). A buffer is reused only for
    tensors of the same shapes and dtypes, else allocated anew; ``held`` counts the staged and
    staging steps, never more than ``size`` (``peak_held``). ``close`` drops every buffer and, when
    pinned, returns torch's cached page-locked blocks (they are never returned otherwise).
    """

    def __init__(self, source: Callable[[int], AnchorStep | None], pin: bool, size: int = RING_SLOTS,
                 copy: bool | None = None) -> None:
        if size < 1:
            raise ValueError("a ring needs at least one slot")
        self._source = source
        self.pin = pin
        # Staging buffers only to get page-locked memory (default): off CUDA a staged step is the
        # source's own, as the device copy reads it just as well (``copy=True`` stages anyway).
        self.copy = pin if copy is None else copy
        self.size = size
        self._lock = threading.Lock()
        self._staged: dict[int, Future] = {}  # step -> its staging (result: staged step or None)
        self._free: list[tuple[AnchorStep, Any]] = []  # released buffers and the event they wait on
        self._pool: ThreadPoolExecutor | None = None
        self.peak_held = 0

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._staged)

    def request(self, t: int) -> bool:
        """Stage step t in the background; False (nothing started) when the ring is full."""
        with self._lock:
            if t in self._staged:
                return True
            if len(self._staged) >= self.size:
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchor-ring")
            self._staged[t] = self._pool.submit(self._stage, t)
            self.peak_held = max(self.peak_held, len(self._staged))
            return True

    def ready(self, t: int) -> bool:
        """Whether step t is staged (``get`` would not wait)."""
        with self._lock:
            found = self._staged.get(t)
        return found is not None and found.done()

    def get(self, t: int) -> AnchorStep | None:
        """Step t staged (None for a step that publishes nothing), waiting for its staging; when
        the ring is full of other steps, the oldest of them is dropped (staged ahead for a frame
        that went elsewhere: a later request stages it again)."""
        evicted: list[Future] = []
        with self._lock:
            found = self._staged.get(t)
            mine = found is None
            if mine:
                while len(self._staged) >= self.size:
                    evicted.append(self._staged.pop(next(iter(self._staged))))
                found = self._staged[t] = Future()
                self.peak_held = max(self.peak_held, len(self._staged))
        for other in evicted:
            self._recycle(other, None)
        if mine:
            try:
                found.set_result(self._stage(t))
            except BaseException as exc:
                found.set_exception(exc)
        return found.result()

    def release(self, t: int, event: Any = None) -> None:
        """Step t's buffer may be reused once ``event`` has completed (None: at once)."""
        with self._lock:
            found = self._staged.pop(t, None)
        if found is not None:
            self._recycle(found, event)

    def _recycle(self, staging: Future, event: Any) -> None:
        """Put a staging's buffer on the free list (once the staging is done)."""
        try:
            staged = staging.result()
        except BaseException:
            return  # it failed: the step's reader raises it, and there is no buffer
        if staged is not None and self.copy:
            with self._lock:
                self._free.append((staged, event))

    def close(self) -> None:
        """Drop every buffer (and, pinned, torch's cache of page-locked blocks)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._staged.clear()
            self._free.clear()
        if self.pin:
            torch.accelerator.empty_host_cache()

    def _stage(self, t: int) -> AnchorStep | None:
        step = self._source(t)
        if step is None or not self.copy:
            return step
        buffer = self._reusable([(tuple(x.shape), x.dtype) for x in step.tensors()])
        if buffer is None:
            return step.map_tensors(lambda x: torch.empty(x.shape, dtype=x.dtype, pin_memory=self.pin).copy_(x))
        slots = iter(buffer.tensors())  # map_tensors visits the tensors in tensors()'s order
        return step.map_tensors(lambda x: next(slots).copy_(x))

    def _reusable(self, layout: list[tuple[tuple[int, ...], torch.dtype]]) -> AnchorStep | None:
        """A released buffer with ``layout``, once the device has read it, or None."""
        with self._lock:
            match = next((k for k, (buffer, _) in enumerate(self._free)
                          if [(tuple(x.shape), x.dtype) for x in buffer.tensors()] == layout), None)
            if match is None:
                if len(self._free) > self.size:
                    del self._free[0]  # a layout that no longer comes: let it go
                return None
            buffer, event = self._free.pop(match)
        if event is not None:
            event.synchronize()  # this thread waits for the copy that read it, not the render
        return buffer


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
        self._ring: PinnedRing | None = None  # ``host``: the staging buffers of the steps that travel
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

    def holds(self, t: int) -> bool:
        """Whether step t is on the device now (or on its way there)."""
        return t in self._on_device

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

    @property
    def ring(self) -> PinnedRing:
        """The ``host`` placement's staging ring (made on first use)."""
        if self._ring is None:
            self._ring = PinnedRing(self.bundle.step, pin=self.device.type == "cuda")
        return self._ring

    def close(self) -> None:
        """The story is finished: let the device copies and the staging buffers go."""
        for t in list(self._on_device):
            self._drop(t)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _to_device(self, t: int, host: AnchorStep) -> AnchorStep:
        if self.placement == "host":
            # A copy even on a CPU, so the window is the same code (and bound) everywhere.
            staged = self.ring.get(t)
            try:
                return _copy_step(staged or host, self.device)  # waited for: the frame needs it now
            finally:
                self.ring.release(t)
        if all(x.device == self.device for x in _tensors(host)):
            return host  # already there (a CPU render, or steps made on this device)
        return _copy_step(host, self.device)

    def _prefetch(self, t: int) -> None:
        """Queue step t's copy to the device while the current step renders (``host`` placement).
        Only a step the bundle already holds is taken, and only once the ring has staged it (in the
        background: the fetch and the copy into page-locked memory never run on the render
        thread); until then each read of the current step asks again. A streamed step still to
        come is fetched when a frame reaches it, so a prefetch never waits for the anchors."""
        if t in self._on_device or not self._available(t):
            return
        ring = self.ring
        if not ring.ready(t):
            ring.request(t)
            return
        host = ring.get(t)
        if host is None:
            ring.release(t)
            return
        if self.device.type != "cuda":
            self._keep(t, _copy_step(host, self.device))
            ring.release(t)
        else:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            compute = torch.cuda.current_stream(self.device)
            # No wait on the compute stream: the source is a staged buffer nothing writes until
            # the event below, and the copy goes to new memory, so it may run while the current
            # step's kernels do.
            with torch.cuda.stream(self._stream):
                copied = _copy_step(host, self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            for tensor in _tensors(copied):
                tensor.record_stream(compute)  # used on the compute stream: freed only after that use
            self._keep(t, copied)
            self._events[t] = event
            ring.release(t, event)  # the buffer is reused once the copy has read it
        if self._available(t + 1):
            ring.request(t + 1)  # staged in the background while step t - 1 renders

    def _available(self, t: int) -> bool:
        has = getattr(self.bundle, "has_step", None)
        return has(t) if has is not None else t in self.bundle.steps
