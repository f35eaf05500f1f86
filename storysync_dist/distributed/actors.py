"""Thin Ray actor wrappers, one pipeline on one device each; every remote call takes and returns
plain data (frame jobs, numpy payloads, PNG bytes, dicts).

These are plain classes; the executor wraps them with ``ray.remote`` and its resource options.
Their constructors only record their arguments: an exception raised in an actor's ``__init__``
reaches the driver as text (Ray 2.60 puts the creation task's traceback into an ``ActorDiedError``
string and keeps no exception object), while one raised by a method arrives as itself
(``RayTaskError.cause``). So the pipeline loads in ``ready()``, and a bad ``--model`` or
``--device`` on a worker node comes back to the driver as the ``StorySyncUserError`` or
``UnknownModelError`` it is.
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
from ..errors import StorySyncUserError
from ..models.family import Adapter
from ..models.presets import load_pipeline
from ..models.registry import adapter_for


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a build without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: "
            f"torch.cuda.is_available() is False with CUDA_VISIBLE_DEVICES={visible!r}")


def choose_device(device: str, requested: str | None, gpu_ids: list[str], host: str) -> str:
    """The torch device an actor renders on: ``device`` as the executor resolved it (``"cuda"``,
    ``"cpu"`` or the explicit ``--device``), checked against this process.

    ``"cuda"`` is the GPU Ray assigned (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here). When
    torch cannot use CUDA, that is an error naming this host and its Ray GPU ids, never a quiet
    render on the CPU: ``requested`` (the user's ``--device``, None when the executor chose CUDA
    because the cluster has GPUs) decides how the message reads.
    """
    if not device.startswith("cuda") or torch.cuda.is_available():
        return device
    gpus = ", ".join(gpu_ids) if gpu_ids else "none"
    if requested is None:
        raise StorySyncUserError(
            f"host {host}: this actor holds Ray GPU {gpus}, but torch there cannot use CUDA "
            f"({_no_cuda_reason()}); install a CUDA build of torch on the GPU nodes, or pass --device cpu "
            "to render on their CPUs"
        )
    raise StorySyncUserError(
        f"--device {requested}: torch on host {host} cannot use CUDA ({_no_cuda_reason()}; Ray GPU ids: "
        f"{gpus}); pass --device cpu, or fix torch on that node"
    )


def _placement() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def _describe(device: str) -> dict[str, Any]:
    return {**_placement(), "device": device, "threads": torch.get_num_threads()}


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

    def __init__(self, model: str, device: str, requested: str | None, dtype: str) -> None:
        # Only the arguments: the pipeline loads in ready() (see the module docstring).
        self._args = (model, device, requested, dtype)
        self.adapter: Adapter | None = None
        self.device = device
        self._renderer_key: str | None = None
        self._renderer: StoryRenderer | None = None

    def placed(self) -> dict[str, Any]:
        """Answers as soon as Ray has placed the actor (before the pipeline loads): host, pid, GPU ids."""
        return _placement()

    def ready(self) -> dict[str, Any]:
        """Load the pipeline (once) and describe the actor: host, pid, device, GPU ids, threads."""
        self._load()
        return _describe(self.device)

    def _load(self) -> Adapter:
        if self.adapter is None:
            model, device, requested, dtype = self._args
            device = choose_device(device, requested, _placement()["gpu_ids"], socket.gethostname())
            self.adapter = adapter_for(load_pipeline(model, device=device, dtype=getattr(torch, dtype)))
            self.device = str(self.adapter.device)
        return self.adapter

    def renderer(self, config: dict, settings: dict) -> StoryRenderer:
        """The renderer for one story's config and settings (cheap: the pipeline is shared)."""
        key = json.dumps([config, settings], sort_keys=True)
        if key != self._renderer_key or self._renderer is None:
            self._renderer = StoryRenderer(self._load(), StorySyncConfig.from_dict(config), RenderSettings(**settings))
            self._renderer_key = key
        return self._renderer

    def render_anchors(self, jobs: list[FrameJob], config: dict, settings: dict) -> Iterator[Any]:
        """Yield one payload per denoising step (``AnchorStep.to_numpy()`` or None), then the
        anchor frames and the bundle's metadata.

        The method is a Ray generator: each yielded object is owned by the caller (the driver),
        so the steps outlive this actor.
        """
        for payload in stream_anchor_payloads(self.renderer(config, settings), jobs):  # noqa: UP028 - Ray drives generators with send(), which `yield from` rejects
            yield payload


class AnchorActor(_PipelineHolder):
    """Renders the anchor frames with full StorySync among themselves and streams their state
    (``render_anchors``); released as soon as the anchors are done."""


class FrameWorker(_PipelineHolder):
    """Renders non-anchor frames one at a time against a streamed anchor bundle.

    The bundle of a story is pulled step by step on the first frame that reaches each step and
    stays resident on the worker's device for every later frame of that story; a new story's
    bundle replaces it. A worker also renders a story's anchors (``render_anchors``, the same
    stream as ``AnchorActor``) in a pooled executor (many stories, see ``RayExecutor``) and when the
    anchor actor died.
    """

    def __init__(self, model: str, device: str, requested: str | None, dtype: str) -> None:
        super().__init__(model, device, requested, dtype)
        self._bundle_key: str | None = None
        self._bundle: StreamedBundle | None = None
        self._pulled_before = 0  # bytes pulled for earlier stories' bundles
        self.frames = 0

    def render(
        self, job: FrameJob, config: dict, settings: dict,
        bundle_key: str | None, meta: dict | None, step_refs: list[Any] | None,
    ) -> FrameOutput:
        """Render one frame; ``step_refs[t]`` is the ObjectRef of anchor step t (or None)."""
        renderer = self.renderer(config, settings)  # loads the pipeline if ready() has not
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
        output = encode_frame(renderer.render_frame(job, bundle))
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
