"""Thin Ray actor wrappers, one pipeline on one device each; every remote call takes and returns
plain data (frame jobs, numpy payloads, PNG bytes).

These are plain classes; the executor wraps them with ``ray.remote`` and its resource options.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import socket
import threading
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


def _describe(device: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": device,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "threads": torch.get_num_threads(),
    }


def stream_anchor_payloads(renderer: StoryRenderer, jobs: list[FrameJob]) -> Iterator[Any]:
    """Render the anchors; yield each step's payload (numpy dict or None) as soon as the step is
    published, then the tail: the anchor frames, the bundle's metadata and its size.

    The denoising loop runs in a helper thread and hands the payloads over through a queue, so
    the caller (a Ray generator method) streams them while the later steps are still rendering.
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def publish(t: int, anchor_step: AnchorStep | None) -> None:
        items.put(("step", anchor_step.to_numpy() if anchor_step is not None else None))

    def run() -> None:
        try:
            frames, bundle = renderer.render_anchors(jobs, on_publish=publish)
            tail = {"frames": [encode_frame(f) for f in frames], "meta": bundle.meta, "nbytes": bundle.nbytes()}
            items.put(("tail", tail))
        except BaseException as exc:  # re-raised in the caller's thread, where Ray reports it
            items.put(("error", exc))

    thread = threading.Thread(target=run, name="anchor-render", daemon=True)
    thread.start()
    while True:
        kind, value = items.get()
        if kind == "error":
            raise value
        yield value
        if kind == "tail":
            break
    thread.join()


class _PipelineHolder:
    """One pipeline on one device, with the StorySync processors installed once.

    A story's sampling settings and config arrive with each call (plain dicts), so one actor can
    serve every story of a dataset without loading its pipeline again.
    """

    def __init__(self, model: str, device: str | None, dtype: str | None) -> None:
        device = _device(device)
        name = dtype or ("float16" if device.startswith("cuda") else "float32")
        self.adapter = UNetAdapter(load_pipeline(model, device=device, dtype=getattr(torch, name)))
        self.device = str(self.adapter.pipe.device)
        self._renderer_key: str | None = None
        self._renderer: StoryRenderer | None = None

    def ready(self) -> dict[str, Any]:
        return _describe(self.device)

    def renderer(self, config: dict, settings: dict) -> StoryRenderer:
        """The renderer for one story's config and settings (cheap: the pipeline is shared)."""
        key = json.dumps([config, settings], sort_keys=True)
        if key != self._renderer_key or self._renderer is None:
            self._renderer = StoryRenderer(self.adapter, StorySyncConfig.from_dict(config), RenderSettings(**settings))
            self._renderer_key = key
        return self._renderer


class AnchorActor(_PipelineHolder):
    """Renders the anchor frames with full StorySync among themselves and streams their state."""

    def render(self, jobs: list[FrameJob], config: dict, settings: dict) -> Iterator[Any]:
        """Yield one payload per denoising step (``AnchorStep.to_numpy()`` or None), then the
        anchor frames and the bundle's metadata.

        The method is a Ray generator: each yielded object is owned by the caller (the driver),
        so the steps outlive this actor.
        """
        for payload in stream_anchor_payloads(self.renderer(config, settings), jobs):  # noqa: UP028 - Ray drives generators with send(), which `yield from` rejects
            yield payload


class FrameWorker(_PipelineHolder):
    """Renders non-anchor frames one at a time against a streamed anchor bundle.

    The bundle of a story is pulled step by step on the first frame that reaches each step and
    stays resident on the worker's device for every later frame of that story; a new story's
    bundle replaces it. In a pooled executor (many stories, see ``RayExecutor``) a worker also
    renders the anchors of each story (``render_anchors``, the same stream as ``AnchorActor``).
    """

    def __init__(self, model: str, device: str | None, dtype: str | None) -> None:
        super().__init__(model, device, dtype)
        self._bundle_key: str | None = None
        self._bundle: StreamedBundle | None = None
        self._pulled_before = 0  # bytes pulled for earlier stories' bundles
        self.frames = 0

    def render_anchors(self, jobs: list[FrameJob], config: dict, settings: dict) -> Iterator[Any]:
        """``AnchorActor.render`` on this worker's pipeline."""
        for payload in stream_anchor_payloads(self.renderer(config, settings), jobs):  # noqa: UP028 - see AnchorActor.render
            yield payload

    def render(
        self, job: FrameJob, config: dict, settings: dict,
        bundle_key: str | None, meta: dict | None, step_refs: list[Any] | None,
    ) -> FrameOutput:
        """Render one frame; ``step_refs[t]`` is the ObjectRef of anchor step t (or None)."""
        bundle = None
        if bundle_key is not None:
            if bundle_key != self._bundle_key or self._bundle is None:
                if self._bundle is not None:  # only one story's anchors stay resident
                    self._pulled_before += self._bundle.pulled_bytes
                refs = list(step_refs or [])

                def fetch(t: int) -> dict | None:
                    return ray.get(refs[t]) if t < len(refs) and refs[t] is not None else None

                self._bundle = StreamedBundle(meta or {}, fetch, self.device)
                self._bundle_key = bundle_key
            bundle = self._bundle
        output = encode_frame(self.renderer(config, settings).render_frame(job, bundle))
        self.frames += 1
        return output

    def stats(self) -> dict[str, Any]:
        """Frames rendered, anchor bytes pulled, and the process's peak resident memory."""
        pulled = self._pulled_before + (self._bundle.pulled_bytes if self._bundle is not None else 0)
        return {
            "frames": self.frames,
            "pulled_bytes": pulled,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **_describe(self.device),
        }
