"""Counting what one frame asks of torch (``bench/hotpath_benchmark.py``): every aten op, and the
ops that would make the host wait for a CUDA device, on any machine, including a CPU-only one.

:class:`Census` is a :class:`TorchDispatchMode` (every aten op the frame dispatches, after
``torch.no_grad``'s decompositions) plus a :class:`TorchFunctionMode` (the Python-level moves of
tensors between host and device, which a CPU run does not dispatch: ``.cpu()`` of a CPU tensor
is no op at all).

Which ops would synchronise on CUDA (``SYNC_OPS`` and :func:`sync_kind`): ``nonzero``, ``item``
(``_local_scalar_dense``, so also ``int()``/``float()``/``bool()`` of a tensor), indexing with a
boolean mask (``index``/``index_put_``, which call nonzero), ``masked_select``, ``equal``,
``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``, ``histc`` with
``min == max`` (it asks for the range), and device-to-host copies (``d2h_copy``, ``tolist``);
a ``copy_`` into a host tensor with ``non_blocking=True`` is counted apart (``queued_copies``):
on CUDA it is queued, not waited for, when the host tensor is pinned, as the project's are.

On a CPU every tensor is a host tensor, so the census tells "device" tensors by where they come
from (the proxy, measured honestly as such): a tensor is on the device when it is a parameter or
buffer of the pipeline's models, the output of an aten op with a device input, the result of a
``.to(...)`` or a factory call (``torch.zeros(..., device=d)``) whose device is spelled as a
``torch.device`` object (how the engine and diffusers name the compute device), or of ``.to(t)``
with a device tensor ``t``. A host copy is ``.cpu()``, ``.to("cpu")`` (the device spelled as the
string, how the code names the host), ``.tolist()``/``.numpy()`` of a device tensor, or a
``copy_`` from a device tensor into a host one. Where such a move returns the same tensor (a
no-op on a CPU), the census hands back an alias sharing its storage, so the host and device
"copies" stay apart as they would on a GPU; values, and so pixels, are untouched. The sync
counts are those with a device input; ``all_tensors`` counts them whatever the input. The device
ops (``device_ops``) are those with a device input, plus each factory call or copy that makes a
device tensor: what a GPU would launch; the other ops are host work.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

SYNC_OPS = {
    "nonzero": "nonzero", "_local_scalar_dense": "item", "is_nonzero": "item", "masked_select": "masked_select",
    "equal": "equal", "allclose": "equal", "_unique": "unique", "_unique2": "unique",
    "unique_consecutive": "unique", "unique_dim": "unique", "bincount": "bincount",
}
_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")
_COPY_INTO = ("copy_", "_copy_from")
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "randn", "rand", "randint",
              "tensor", "as_tensor", "eye", "empty_strided", "randperm"}
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def sync_kind(name: str, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """The kind of host wait an aten op (by its overload packet's name) makes on CUDA, or None."""
    if name in SYNC_OPS:
        return SYNC_OPS[name]
    if name in _INDEX_OPS and len(args) > 1:
        indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "bool_index"
    if name == "repeat_interleave" and args and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        if len(args) == 1 or isinstance(args[1], torch.Tensor):
            return "repeat_interleave"
    if name == "histc":
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        if lo == hi:
            return "histc"
    return None


def _site() -> str:
    """The innermost caller outside torch and this file: where a sync is asked for."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith((_HERE, _TORCH)):
            for root in ("site-packages" + os.sep, os.sep + "storysync_dist" + os.sep):
                if root in path:
                    path = path.split(root, 1)[1] if root.startswith("site") else "storysync_dist/" + path.split(root, 1)[1]
                    break
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class Census:
    """Counts, for one frame, every aten op and every op that would wait for the device.

    ``modules``: the pipeline's models (their parameters and buffers are the device tensors it
    starts from); ``layers``: name -> attention module, so each sync is told by layer; the step
    advances with :meth:`on_step` (the renderer's ``on_step``) and ``denoiser``'s first call ends
    the ``before_steps`` phase.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], layers: dict[str, torch.nn.Module],
                 denoiser: torch.nn.Module) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.ops_by_phase: collections.Counter[str] = collections.Counter()
        self.sync: collections.Counter[str] = collections.Counter()
        self.sync_all: collections.Counter[str] = collections.Counter()
        self.sync_by_layer: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.sync_by_phase: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.sync_sites: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.layer_calls: collections.Counter[str] = collections.Counter()
        self.queued_copies: collections.Counter[str] = collections.Counter()  # non_blocking D2H copies
        # Ops that a GPU would run (a device tensor in, or one made on or moved to the device): the
        # kernels and transfers; the rest is host work (dropout draws, index arithmetic on the CPU).
        self.device_ops = 0
        self.device_ops_by_phase: collections.Counter[str] = collections.Counter()
        self.steps_done = 0
        self._started = False
        self._in_steps = False
        self._layer: list[str] = []
        self._quiet = False
        self._device = WeakIdKeyDictionary()
        for module in modules.values():
            for tensor in [*module.parameters(), *module.buffers()]:
                self._device[tensor] = True
        self._modules = modules
        self._layers = layers
        self._denoiser = denoiser
        self._hooks: list[Any] = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def phase(self) -> str:
        if not self._started:
            return "before_steps"
        return f"step {self.steps_done}" if self._in_steps else "after_steps"

    def on_step(self, i: int) -> None:
        self.steps_done = i + 1
        self._in_steps = False  # until the denoiser runs again

    # ---- what is on the device -------------------------------------------------------------
    def on_device(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self._device

    def _mark(self, tensors: Any, device: bool) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                if device:
                    self._device[t] = True
                elif t in self._device:
                    del self._device[t]

    def _alias(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor object over the same storage (not counted)."""
        self._quiet = True
        try:
            return tensor.detach()
        finally:
            self._quiet = False

    def _count_device_op(self) -> None:
        self.device_ops += 1
        self.device_ops_by_phase[self.phase()] += 1

    def _count_sync(self, kind: str, device: bool) -> None:
        self.sync_all[kind] += 1
        if device:
            self.sync[kind] += 1
            self.sync_by_phase[self.phase()][kind] += 1
            self.sync_by_layer[self._layer[-1] if self._layer else "(no attention layer)"][kind] += 1
            self.sync_sites[_site()][kind] += 1

    # ---- the modes ---------------------------------------------------------------------------
    @contextmanager
    def counting(self) -> Iterator[Census]:
        def started(*_: Any) -> None:
            self._started = True
            self._in_steps = True

        self._hooks.append(self._denoiser.register_forward_pre_hook(started))
        for name, module in self._layers.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._enter(n)))
            self._hooks.append(module.register_forward_hook(lambda *_: self._leave()))
        try:
            with _Functions(self), _Dispatch(self):
                yield self
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()

    def _enter(self, name: str) -> None:
        self._layer.append(name)
        self.layer_calls[name] += 1

    def _leave(self) -> None:  # a forward hook that returns nothing keeps the module's output
        self._layer.pop()


class _Dispatch(TorchDispatchMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        c = self.census
        out = func(*args, **kwargs)
        if c._quiet:
            return out
        name = func.overloadpacket.__name__
        c.ops[name] += 1
        c.ops_by_phase[c.phase()] += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = any(t in c._device for t in inputs)
        kind = sync_kind(name, args, kwargs)
        if name in _COPY_INTO and len(args) > 1:
            if c.on_device(args[1]) or c.on_device(args[0]):
                c._count_device_op()
            if c.on_device(args[1]) and not c.on_device(args[0]):
                # Into a host tensor (the destination stays on the host). A non_blocking one is
                # queued, not waited for: the project's code makes those only into pinned memory.
                queued = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
                if queued:
                    c.queued_copies["d2h_queued"] += 1
                else:
                    c._count_sync("d2h_copy", True)
            return out
        if kind:
            c._count_sync(kind, device)
        if device:
            c._count_device_op()
            c._mark(out, True)
        return out


class _Functions(TorchFunctionMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        c = self.census
        name = getattr(func, "__name__", "")
        intent = None
        if name in ("cpu", "to", "tolist", "numpy") and args and isinstance(args[0], torch.Tensor) \
                and func is getattr(torch.Tensor, name, None):
            intent = "host" if name != "to" else _to_intent(c, args[1:], kwargs)
        elif name in _FACTORIES and func is getattr(torch, name, None):
            intent = "device" if isinstance(kwargs.get("device"), torch.device) else None
        out = func(*args, **kwargs)
        if intent is None or c._quiet:
            return out
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if intent == "host":
            if source is not None and c.on_device(source):
                c._count_sync("tolist" if name == "tolist" else "d2h_copy", True)
            if isinstance(out, torch.Tensor):
                out = c._alias(out) if out is source else out
                c._mark(out, False)
        elif isinstance(out, torch.Tensor):
            if source is None or not c.on_device(source):
                c._count_device_op()  # a factory on the device, or a copy to it: one kernel or transfer
            out = c._alias(out) if out is source else out
            c._mark(out, True)
        return out


def _to_intent(census: Census, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """"host", "device" or None (no move) for ``Tensor.to(*args, **kwargs)``."""
    device = kwargs.get("device")
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return "device" if census.on_device(arg) else "host"
        if isinstance(arg, (str, torch.device)):
            device = arg
    if device is None:
        return None
    if isinstance(device, str):
        return "host" if torch.device(device).type == "cpu" else "device"
    return "device"
