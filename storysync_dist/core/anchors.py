"""Anchor state (paper Eq. 13): what the anchor frames publish after each denoising step.

Anchors attend to each other; every other frame attends only to the anchors' subject tokens and
harmonizes against their features. Per step and per shared self-attention layer we keep, for the
subject tokens only and in half precision:
  - ``index``: flat token index (anchor * N + position) of each subject token,
  - ``hidden``: the layer's input hidden states there, per guidance branch (workers apply their
    own ``to_k``/``to_v``: one tensor travels instead of two),
  - ``features``: the RFH features R there (attention output before the output projection).
A bundle of all steps can be saved to safetensors and reused by later jobs ("character bank").

A bundle file comes from the user (``--anchors FILE``), so :meth:`AnchorBundle.from_bytes` checks
everything it reads, cheapest first (size, header, metadata schema, tensor shapes from the header,
then the tensors themselves) and reports any problem as one :class:`BundleError` line. The checks,
limits and :class:`BundleError` live in :mod:`storysync_dist.core.bundle_format`; they are
re-exported here.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .bundle_format import (
    ANCHOR_DTYPES,
    BUNDLE_FORMAT,
    DEFAULT_MAX_BUNDLE_BYTES,
    LEGACY_BUNDLE_FORMATS,
    MAX_ANCHORS,
    MAX_HEADER_BYTES,
    MAX_LAYER_TOKENS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    BundleError,
    _check_entries,
    _check_layout,
    _check_meta,
    _check_values,
    _clip,
    _few,
    _parse_json_object,
    _read_entries,
    _read_header,
    _read_metadata,
    _show,
)
from .bundle_injection import check_finite as _check_finite
from .bundle_injection import check_injection_entries as _check_injection_entries
from .bundle_injection import check_injection_layouts as _check_injection_layouts
from .config import default_anchor_dtype
from .layer_state import SharedLayerState

__all__ = [
    "ANCHOR_DTYPES",
    "BUNDLE_FORMAT",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "LEGACY_BUNDLE_FORMATS",
    "MAX_ANCHORS",
    "MAX_HEADER_BYTES",
    "MAX_LAYER_TOKENS",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "AnchorBundle",
    "AnchorStep",
    "BundleError",
    "SharedLayerState",
    "StreamedBundle",
]


@dataclass
class AnchorStep:
    """Everything the anchors publish after denoising step ``step``.

    ``layers``: the shared self-attention layers (every method that shares). ``outputs`` and
    ``references`` only for ConsiStory's two-pass form (``core/consistory.py``): ``outputs`` maps an
    injection layer to the anchors' attention outputs there, (A, N, C) on the conditional branch,
    at the steps of pass 2 that inject; ``references`` holds what frames match against, once per
    bundle: ``dift`` (A, C, h, w), the anchors' pass-1 DIFT features (smoothed), and
    ``subject_masks`` (A, N) boolean, their pass-1 final masks at the injection resolution.
    """

    step: int
    layers: dict[str, SharedLayerState] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    references: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        extra = [*self.outputs.values(), *self.references.values()]
        return sum(layer.nbytes() for layer in self.layers.values()) + sum(t.numel() * t.element_size() for t in extra)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the step."""
        return [
            *(t for layer in self.layers.values() for t in (layer.index, layer.hidden, layer.features)),
            *self.outputs.values(), *self.references.values(),
        ]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AnchorStep:
        """A new step with ``fn`` applied to every tensor (a copy to a device, pinning)."""
        return AnchorStep(
            step=self.step,
            layers={
                name: SharedLayerState(fn(layer.index), fn(layer.hidden), fn(layer.features), layer.num_tokens)
                for name, layer in self.layers.items()
            },
            outputs={name: fn(t) for name, t in self.outputs.items()},
            references={name: fn(t) for name, t in self.references.items()},
        )

    def to_numpy(self) -> dict[str, Any]:
        """Plain numpy payload: readers on one node share it zero-copy through Ray's object store."""
        layers = {}
        for name, layer in self.layers.items():
            layers[name] = {
                "index": layer.index.cpu().numpy(),
                # numpy has no bfloat16: move its 16 bits as int16 and reinterpret on the way back.
                "hidden": _to_numpy16(layer.hidden),
                "features": _to_numpy16(layer.features),
                "dtype": str(layer.hidden.dtype).removeprefix("torch."),
                "num_tokens": layer.num_tokens,
            }
        return {
            "step": self.step, "layers": layers,
            "outputs": {name: _tagged(t) for name, t in self.outputs.items()},
            "references": {name: _tagged(t) for name, t in self.references.items()},
        }

    @classmethod
    def from_numpy(cls, payload: dict[str, Any], device: torch.device | str = "cpu") -> AnchorStep:
        """Inverse of :meth:`to_numpy`, moving the tensors to ``device`` once."""
        step = cls(step=int(payload["step"]))
        for name, layer in payload["layers"].items():
            dtype = getattr(torch, layer["dtype"])
            step.layers[name] = SharedLayerState(
                index=_from_numpy(layer["index"]).to(device),
                hidden=_from_numpy(layer["hidden"]).view(dtype).to(device),
                features=_from_numpy(layer["features"]).view(dtype).to(device),
                num_tokens=int(layer["num_tokens"]),
            )
        step.outputs = {name: _untagged(t, device) for name, t in payload.get("outputs", {}).items()}
        step.references = {name: _untagged(t, device) for name, t in payload.get("references", {}).items()}
        return step


def _tagged(tensor: torch.Tensor) -> dict[str, Any]:
    return {"data": _to_numpy16(tensor), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _untagged(tagged: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    return _from_numpy(tagged["data"]).view(getattr(torch, tagged["dtype"])).to(device)


def _to_numpy16(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; we never write to them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass
class AnchorBundle:
    """All anchor steps of one set of anchors, plus what they were rendered with."""

    meta: dict[str, Any]
    steps: dict[int, AnchorStep] = field(default_factory=dict)

    @property
    def num_anchors(self) -> int:
        return int(self.meta["num_anchors"])

    def step(self, t: int) -> AnchorStep | None:
        return self.steps.get(t)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.steps.values())

    @classmethod
    def from_payloads(cls, meta: dict[str, Any], payloads: Iterable[dict[str, Any] | None]) -> AnchorBundle:
        """A whole bundle from streamed :meth:`AnchorStep.to_numpy` payloads (None: a step that
        published nothing), e.g. to save the steps an anchor actor streamed."""
        bundle = cls(meta=meta)
        for payload in payloads:
            if payload is not None:
                anchor_step = AnchorStep.from_numpy(payload)
                bundle.steps[anchor_step.step] = anchor_step
        return bundle

    def to_bytes(self) -> bytes:
        """Serialize to safetensors (tensors) + JSON metadata; nothing is pickled."""
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, dict[str, int]] = {}
        for t, anchor_step in sorted(self.steps.items()):
            layout[str(t)] = {}
            for name, layer in anchor_step.layers.items():
                key = f"{t}|{name}"
                tensors[f"{key}|index"] = layer.index.contiguous().cpu()
                tensors[f"{key}|hidden"] = layer.hidden.contiguous().cpu()
                tensors[f"{key}|features"] = layer.features.contiguous().cpu()
                layout[str(t)][name] = layer.num_tokens
        # ConsiStory's two-pass form only (AnchorStep.outputs/references): two more layouts, written
        # only when a step holds them, so other bundles are as before.
        outputs = {str(t): {name: int(out.shape[1]) for name, out in s.outputs.items()}
                   for t, s in sorted(self.steps.items()) if s.outputs}
        references = {str(t): sorted(s.references) for t, s in sorted(self.steps.items()) if s.references}
        for t, anchor_step in self.steps.items():
            for name, out in anchor_step.outputs.items():
                tensors[f"{t}|{name}|output"] = out.contiguous().cpu()
            for name, ref in anchor_step.references.items():
                tensors[f"{t}|@{name}"] = ref.contiguous().cpu()
        metadata = {"format": BUNDLE_FORMAT, "meta": json.dumps(self.meta), "layout": json.dumps(layout)}
        if outputs:
            metadata["outputs"] = json.dumps(outputs)
        if references:
            metadata["references"] = json.dumps(references)
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> AnchorBundle:
        """Inverse of :meth:`to_bytes`, checking everything it reads.

        In order, cheapest first: the size (at most ``max_bytes``), the safetensors header (length,
        UTF-8 JSON object, ``__metadata__`` strings ``format``/``meta``/``layout``), the format, each
        tensor entry (dtype, shape, data offsets), the ``meta`` schema, the ``layout`` (step ->
        layer -> num_tokens), the tensor names, dtypes and shapes against the layout (index (M,)
        int64; hidden (G, M, C) and features (G, M, C_inner) in the config's ``anchor_dtype``), and
        only then the tensors: indices strictly increasing within [0, num_anchors * num_tokens),
        hidden and features finite.

        Raises:
            BundleError: (a ValueError) with a one-line message on anything that is not a valid
                bundle of :data:`BUNDLE_FORMAT`; no other exception escapes.
        """
        try:
            return cls._from_bytes(data, max_bytes)
        except BundleError:
            raise
        except (
            KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError,
            struct.error, SafetensorError, ValueError, RuntimeError,
        ) as exc:  # a safety net: every check above should have caught it first
            raise BundleError(f"malformed anchor bundle ({type(exc).__name__}: {_clip(str(exc))})") from None

    @classmethod
    def _from_bytes(cls, data: bytes, max_bytes: int) -> AnchorBundle:
        header, data_start = _read_header(data, max_bytes)
        metadata = _read_metadata(header)
        entries = _read_entries(header, len(data) - data_start)
        meta = _parse_json_object(metadata["meta"], "__metadata__ 'meta'")
        config = _check_meta(meta)
        num_anchors = meta["num_anchors"]
        steps = meta["steps"] * config.render_passes
        layout = _check_layout(_parse_json_object(metadata["layout"], "__metadata__ 'layout'"), steps)
        outputs, references = _check_injection_layouts(metadata, steps)
        # A config that leaves anchor_dtype to the model (None): the model's rule for the meta's dtype.
        anchor_dtype = config.anchor_dtype or default_anchor_dtype(meta["dtype"])
        injection = _check_injection_entries(entries, outputs, references, num_anchors, anchor_dtype)
        _check_entries({k: v for k, v in entries.items() if k not in injection}, layout, num_anchors, anchor_dtype)
        try:
            tensors = load_safetensors(data if isinstance(data, bytes) else bytes(data))
        except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
            raise BundleError(f"cannot read the tensors: {_clip(str(exc))}") from None
        bundle = cls(meta=meta)
        for t, layers in layout.items():
            anchor_step = AnchorStep(step=t)
            for name, num_tokens in layers.items():
                key = f"{t}|{name}"
                layer = SharedLayerState(
                    index=tensors[f"{key}|index"],
                    hidden=tensors[f"{key}|hidden"],
                    features=tensors[f"{key}|features"],
                    num_tokens=num_tokens,
                )
                _check_values(layer, f"step {t} layer {_show(name)}", num_anchors)
                anchor_step.layers[name] = layer
            bundle.steps[t] = anchor_step
        for t, names in outputs.items():
            anchor_step = bundle.steps.setdefault(t, AnchorStep(step=t))
            for name in names:
                anchor_step.outputs[name] = _check_finite(tensors[f"{t}|{name}|output"], f"step {t} output {_show(name)}")
        for t, names in references.items():
            anchor_step = bundle.steps.setdefault(t, AnchorStep(step=t))
            for name in names:
                anchor_step.references[name] = _check_finite(tensors[f"{t}|@{name}"], f"step {t} reference {name}")
        return bundle

    def check_coverage(self, steps: Iterable[int]) -> None:
        """Refuse a bundle that cannot serve a render sharing at ``steps``.

        Raises BundleError when the bundle holds no steps at all, lacks one of ``steps``, or its
        steps do not all hold the same shared layers.
        """
        if not self.steps:
            raise BundleError("holds no anchor steps: it would render every frame without sharing")
        expected = list(dict.fromkeys(int(t) for t in steps))
        missing = [t for t in expected if t not in self.steps]
        if missing:
            raise BundleError(
                f"holds no anchor state for step(s) {_few(missing)}: {len(missing)} of the "
                f"{len(expected)} steps this render shares"
            )
        # Steps of ConsiStory's pass 2 may hold only injection outputs: the shared layers must be
        # the same at every step that holds any.
        ordered = sorted(t for t, s in self.steps.items() if s.layers or not (s.outputs or s.references))
        if not ordered:
            return
        first = ordered[0]
        names = set(self.steps[first].layers)
        if not names:
            raise BundleError(f"step {first} holds no shared layers")
        for t in ordered[1:]:
            other = set(self.steps[t].layers)
            if other != names:
                parts = []
                if names - other:
                    parts.append(f"lacks layer(s) {_few(sorted(names - other))}")
                if other - names:
                    parts.append(f"has extra layer(s) {_few(sorted(other - names))}")
                raise BundleError(f"step {t} does not hold the layers of step {first}: it {' and '.join(parts)}")


class StreamedBundle(AnchorBundle):
    """An anchor bundle whose steps are fetched on first use (step t when a frame reaches step t)
    and then kept in host memory for every later frame: one pull per worker, not per frame (where
    the frames read them from is ``core.residency.PlacedBundle``'s business).

    ``fetch(t)`` returns :meth:`AnchorStep.to_numpy` payloads (or None for steps that publish
    nothing), blocking until step t exists; ``available(t)`` says whether it exists already, so a
    prefetch never waits. ``pulled_bytes`` counts what was fetched.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        fetch: Callable[[int], dict[str, Any] | None],
        available: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__(meta=meta)
        self._fetch = fetch
        self._available = available
        self._missing: set[int] = set()
        self.pulled_bytes = 0

    def has_step(self, t: int) -> bool:
        """Whether step t can be read without waiting for the anchors."""
        if t in self.steps or t in self._missing:
            return True
        return self._available(t) if self._available is not None else False

    def step(self, t: int) -> AnchorStep | None:
        if t in self.steps:
            return self.steps[t]
        if t in self._missing:
            return None
        payload = self._fetch(t)
        if payload is None:
            self._missing.add(t)
            return None
        anchor_step = AnchorStep.from_numpy(payload)
        self.pulled_bytes += anchor_step.nbytes()
        self.steps[t] = anchor_step
        return anchor_step
