"""Thin Ray actor wrappers, one pipeline on one device each; every remote call takes and returns
plain data (frame jobs, numpy payloads, PNG bytes).

These are plain classes; the executor wraps them with ``ray.remote`` and its resource options.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

import ray
import torch

from ..core.anchors import AnchorStep, StreamedBundle
from ..core.config import StorySyncConfig
from ..engine.renderer import FrameJob, FrameOutput, RenderSettings, StoryRenderer, encode_frame
from ..models.presets import load_pipeline
from ..models.unet import UNetAdapter


def _device(requested: str | None) -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so "cuda" is that GPU.
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _renderer(model: str, device: str | None, dtype: str | None, config: dict, settings: dict) -> StoryRenderer:
    device = _device(device)
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    pipe = load_pipeline(model, device=device, dtype=getattr(torch, name))
    return StoryRenderer(UNetAdapter(pipe), StorySyncConfig.from_dict(config), RenderSettings(**settings))


def _describe(device: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": device,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "threads": torch.get_num_threads(),
    }


class AnchorActor:
    """Renders the anchor frames with full StorySync among themselves and streams their state."""

    def __init__(self, model: str, device: str | None, dtype: str | None, config: dict, settings: dict) -> None:
        self.renderer = _renderer(model, device, dtype, config, settings)

    def ready(self) -> dict[str, Any]:
        return _describe(str(self.renderer.adapter.pipe.device))

    def render(self, jobs: list[FrameJob]) -> Iterator[Any]:
        """Yield one payload per denoising step (``AnchorStep.to_numpy()`` or None), then the
        anchor frames and the bundle's metadata.

        The method is a Ray generator: each yielded object is owned by the caller (the driver),
        so the steps outlive this actor.
        """
        payloads: list[dict | None] = []

        def publish(t: int, anchor_step: AnchorStep | None) -> None:
            payloads.append(anchor_step.to_numpy() if anchor_step is not None else None)

        frames, bundle = self.renderer.render_anchors(jobs, on_publish=publish)
        for payload in payloads:  # noqa: UP028 - Ray drives generators with send(), which `yield from` a list rejects
            yield payload
        yield {"frames": [encode_frame(f) for f in frames], "meta": bundle.meta, "nbytes": bundle.nbytes()}


class FrameWorker:
    """Renders non-anchor frames one at a time against a streamed anchor bundle.

    The bundle of a story is pulled step by step on the first frame that reaches each step and
    stays resident on the worker's device for every later frame of that story.
    """

    def __init__(self, model: str, device: str | None, dtype: str | None, config: dict, settings: dict) -> None:
        self.renderer = _renderer(model, device, dtype, config, settings)
        self.device = str(self.renderer.adapter.pipe.device)
        self._bundles: dict[str, StreamedBundle] = {}
        self.frames = 0

    def ready(self) -> dict[str, Any]:
        return _describe(self.device)

    def render(
        self, job: FrameJob, bundle_key: str | None, meta: dict | None, step_refs: list[Any] | None
    ) -> FrameOutput:
        """Render one frame; ``step_refs[t]`` is the ObjectRef of anchor step t (or None)."""
        bundle = None
        if bundle_key is not None:
            bundle = self._bundles.get(bundle_key)
            if bundle is None:
                refs = list(step_refs or [])

                def fetch(t: int) -> dict | None:
                    return ray.get(refs[t]) if t < len(refs) and refs[t] is not None else None

                bundle = self._bundles[bundle_key] = StreamedBundle(meta or {}, fetch, self.device)
        output = encode_frame(self.renderer.render_frame(job, bundle))
        self.frames += 1
        return output

    def stats(self) -> dict[str, Any]:
        """Frames rendered, anchor bytes pulled, and the process's peak resident memory."""
        return {
            "frames": self.frames,
            "pulled_bytes": sum(b.pulled_bytes for b in self._bundles.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **_describe(self.device),
        }
