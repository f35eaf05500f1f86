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
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import ray
import torch

from ..core.anchors import AnchorStep, StreamedBundle
from ..core.config import StorySyncConfig
from ..core.residency import PlacedBundle
from ..engine.renderer import FrameJob, FrameOutput, RenderSettings, StoryRenderer, encode_frame
from ..errors import StorySyncUserError
from ..models.customize import apply_model_setup
from ..models.family import Adapter
from ..models.presets import load_pipeline
from ..models.registry import adapter_for
from ..resident import peak_resident_bytes


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
    published_bytes = [0]

    def publish(t: int, anchor_step: AnchorStep | None) -> None:
        if anchor_step is not None:
            published_bytes[0] += anchor_step.nbytes()
        items.put(("step", anchor_step.to_numpy() if anchor_step is not None else None))

    def run() -> None:
        try:
            # The steps go to the driver as they are published; this process keeps none of them.
            frames, bundle = renderer.render_anchors(jobs, on_publish=publish, keep_steps=False)
            tail = {"frames": [encode_frame(f) for f in frames], "meta": bundle.meta, "nbytes": published_bytes[0]}
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

    def __init__(self, model: str, device: str, requested: str | None, dtype: str, offload: str = "none",
                 bundle_on: str = "auto") -> None:
        # Only the arguments: the pipeline loads in ready() (see the module docstring).
        self._args = (model, device, requested, dtype, offload)
        self.bundle_on = bundle_on
        self.adapter: Adapter | None = None
        self.pipe: Any = None
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
            model, device, requested, dtype, offload = self._args
            device = choose_device(device, requested, _placement()["gpu_ids"], socket.gethostname())
            pipe = load_pipeline(model, device=device, dtype=getattr(torch, dtype), offload=offload)
            self.pipe = pipe
            self.adapter = adapter_for(pipe)
            self.device = str(self.adapter.device)
        return self.adapter

    def renderer(self, config: dict, settings: dict) -> StoryRenderer:
        """The renderer for one story's config and settings (cheap: the pipeline is shared)."""
        key = json.dumps([config, settings], sort_keys=True)
        if key != self._renderer_key or self._renderer is None:
            adapter = self._load()
            story = RenderSettings(**settings)
            # The story's --scheduler and --lora: the LoRA files are read here, by the path the driver
            # resolved, and must hash to what it planned with (models.customize).
            apply_model_setup(self.pipe, story.scheduler, story.loras, story.freeu)
            self._renderer = StoryRenderer(adapter, StorySyncConfig.from_dict(config), story)
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


class _AnchorStream:
    """One story's anchor steps as this worker knows them: the ObjectRefs published so far (the
    driver pushes each new one) and the bundle built from them, kept for every later frame."""

    def __init__(self, meta: dict, device: str, placement: str, cond: threading.Condition) -> None:
        self.refs: dict[int, Any] = {}
        self.final = False  # every step is in refs: a step missing from them publishes nothing
        self.cond = cond
        self.wait_seconds = 0.0  # time frames spent blocked on steps not yet published
        self.streamed = StreamedBundle(meta, self._fetch, self._published)
        self.bundle = PlacedBundle(self.streamed, device, placement)  # what the frames read

    def _published(self, t: int) -> bool:
        return t in self.refs or self.final

    def add(self, start: int, refs: list[Any], final: bool = False) -> None:
        for t, ref in enumerate(refs, start):
            self.refs.setdefault(t, ref)
        self.final = self.final or final

    def _fetch(self, t: int) -> dict | None:
        # A frame's step t needs only anchor step t: block until the driver has pushed it.
        if t not in self.refs and not self.final:
            began = time.perf_counter()
            with self.cond:
                self.cond.wait_for(lambda: t in self.refs or self.final)
            self.wait_seconds += time.perf_counter() - began
        return ray.get(self.refs[t]) if t in self.refs else None


class FrameWorker(_PipelineHolder):
    """One pipeline on one device: renders a story's anchors (``render_anchors``) or one of its
    frames (``render``), one call at a time.

    A frame may start before its story's anchors are done: it carries the anchor step refs
    published so far, the driver pushes each later one (``add_steps``, in the ``control``
    concurrency group, so it lands while a frame renders), and the frame's denoising step t waits
    only for anchor step t. The steps of each story whose frames this worker still has stay in
    its host memory (pulled once per worker, not per frame) until the driver says the story is
    finished (``forget``); ``bundle_on`` says whether they are also kept on the device or travel
    there two at a time (``core.residency``).
    """

    CONCURRENCY_GROUPS: ClassVar[dict[str, int]] = {"control": 1}

    def __init__(self, model: str, device: str, requested: str | None, dtype: str, offload: str = "none",
                 bundle_on: str = "auto") -> None:
        super().__init__(model, device, requested, dtype, offload, bundle_on)
        self._cond = threading.Condition()
        self._streams: dict[str, _AnchorStream] = {}
        self._pulled_before = 0  # bytes pulled for stories already forgotten
        self._wait_before = 0.0
        self._peak_steps = 0
        self._placements: set[str] = set()
        self.frames = 0
        self.busy_seconds = 0.0  # time spent in render/render_anchors calls

    def _stream(self, key: str, meta: dict) -> _AnchorStream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _AnchorStream(meta, self.device, self.bundle_on, self._cond)
        return stream

    @ray.method(concurrency_group="control")
    def add_steps(self, key: str, meta: dict, start: int, refs: list[Any]) -> None:
        """Anchor steps ``start, start + 1, ...`` of story ``key`` were published (refs in a list,
        so Ray hands over the refs, not the payloads)."""
        with self._cond:
            self._stream(key, meta).add(start, refs)
            self._cond.notify_all()

    @ray.method(concurrency_group="control")
    def end_steps(self, key: str, meta: dict) -> None:
        """Every anchor step of story ``key`` has been pushed."""
        with self._cond:
            self._stream(key, meta).final = True
            self._cond.notify_all()

    @ray.method(concurrency_group="control")
    def forget(self, key: str) -> None:
        """The story is finished: drop its resident anchor steps."""
        with self._cond:
            stream = self._streams.pop(key, None)
            if stream is not None:
                stream.bundle.close()  # its device copies and staging buffers go now
                self._pulled_before += stream.streamed.pulled_bytes
                self._peak_steps = max(self._peak_steps, stream.bundle.peak_resident_steps)
                if stream.bundle.placement is not None:
                    self._placements.add(stream.bundle.placement)
                self._wait_before += stream.wait_seconds

    def render(
        self, jobs: list[FrameJob], config: dict, settings: dict,
        key: str | None, meta: dict | None, step_refs: list[Any] | None, final: bool = True,
    ) -> list[FrameOutput]:
        """Render a batch of a story's frames (one denoiser batch); ``step_refs[t]`` is the
        ObjectRef of anchor step t, for the steps published when the batch was handed out; unless
        ``final``, the rest arrive through ``add_steps`` and ``end_steps``."""
        began = time.perf_counter()
        try:
            renderer = self.renderer(config, settings)  # loads the pipeline if ready() has not
            bundle = None
            if key is not None:
                with self._cond:
                    stream = self._stream(key, meta or {})
                    stream.add(0, list(step_refs or []), final)
                    self._cond.notify_all()
                bundle = stream.bundle
            outputs = [encode_frame(frame) for frame in renderer.render_frames(jobs, bundle)]
            self.frames += len(outputs)
            return outputs
        finally:
            self.busy_seconds += time.perf_counter() - began

    def render_anchors(self, jobs: list[FrameJob], config: dict, settings: dict) -> Iterator[Any]:
        """See ``_PipelineHolder.render_anchors``; counted in ``busy_seconds``."""
        began = time.perf_counter()
        try:
            for payload in stream_anchor_payloads(self.renderer(config, settings), jobs):  # noqa: UP028 - Ray drives generators with send()
                yield payload
        finally:
            self.busy_seconds += time.perf_counter() - began

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        """Frames rendered, seconds busy and blocked on anchor steps, anchor bytes pulled, and the
        process's peak resident memory. In the ``control`` group: the driver asks while the worker
        renders, and must not wait for the frame to finish."""
        with self._cond:
            streams = list(self._streams.values())
        return {
            "frames": self.frames,
            "busy_seconds": self.busy_seconds,
            "wait_seconds": self._wait_before + sum(s.wait_seconds for s in streams),
            "pulled_bytes": self._pulled_before + sum(s.streamed.pulled_bytes for s in streams),
            # The most anchor steps of one story this worker held on its device at once.
            "peak_resident_steps": max([self._peak_steps, *(s.bundle.peak_resident_steps for s in streams)]),
            # Where this worker's stories' bundles were read from (auto resolves per story).
            "bundle_on": sorted(self._placements | {s.bundle.placement for s in streams if s.bundle.placement}),
            "resident_stories": len(streams),
            "peak_rss_bytes": peak_resident_bytes(),
            **_describe(self.device),
        }
