"""One render job in one process: plan the story, render anchors and frames, write the dataset.

Everything a user can get wrong is checked before anything is written, so a bad input leaves no
output behind. Frames already in the dataset with the same render config are skipped, so a rerun
of an interrupted job renders only what is missing.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.anchors import AnchorBundle
from ..core.config import StorySyncConfig
from ..errors import StorySyncUserError
from ..io.sink import FrameRecord, ParquetFrameSink, read_manifest, write_bytes, write_manifest
from ..io.storyboard import make_storyboard, png_bytes
from ..models.presets import load_pipeline
from ..models.unet import UNetAdapter
from ..spec import StorySpec, load_story, validate_for_model
from .renderer import METHODS, BundleMismatchError, FrameJob, RenderedFrame, RenderSettings, StoryRenderer

log = logging.getLogger("storysync")

ANCHOR_DIR = "anchors"


@dataclass
class RenderOptions:
    """Options of ``storysync render`` (and of :func:`render_story`)."""

    model: str
    out: str
    method: str = "storysync"
    only: list[str] | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    anchors: str | None = None
    save_anchors: bool = False
    config: StorySyncConfig = field(default_factory=StorySyncConfig)
    progress: bool = True
    storage_options: dict | None = None
    # 0 renders in this process without Ray; N >= 1 uses N Ray FrameWorker actors.
    workers: int = 0
    # Ray cluster address; None uses RAY_ADDRESS, or starts an embedded local Ray.
    address: str | None = None


@dataclass
class JobResult:
    """What a job did: where the output went and which frames it rendered or skipped."""

    out: str
    story_id: str
    rendered: list[str]
    skipped: list[str]
    storyboard: str
    manifest: str
    seconds: float
    anchor_bundle: str | None = None


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StorySyncUserError(f"--device {device}: CUDA is not available on this machine")
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    if name not in ("float16", "bfloat16", "float32"):
        raise StorySyncUserError(f"--dtype {name!r}: choose float16, bfloat16 or float32")
    return device, getattr(torch, name)


def frame_config_json(options: RenderOptions, spec: StorySpec, config: StorySyncConfig, anchors: list[str]) -> str:
    """The ``config`` column: everything besides prompt and seed that determines a frame's pixels."""
    d = spec.defaults
    return json.dumps(
        {
            "method": options.method,
            "model": options.model,
            "steps": d.steps,
            "height": d.height,
            "width": d.width,
            "guidance_scale": d.guidance_scale,
            "negative_prompt": d.negative_prompt,
            "anchors": anchors,
            "storysync": config.to_dict(),
        },
        sort_keys=True,
    )


def plan_jobs(spec: StorySpec, token_positions: list[list[list[int]]]) -> list[FrameJob]:
    """One :class:`FrameJob` per frame of the story, in frame order."""
    return [
        FrameJob(
            frame_id=frame.id,
            index=frame.index,
            prompt=frame.prompt,
            negative_prompt=spec.defaults.negative_prompt,
            seed=frame.seed,
            token_positions=token_positions[frame.index],
        )
        for frame in spec.frames
    ]


def _mask_png(mask: np.ndarray | None) -> bytes | None:
    if mask is None:
        return None
    return png_bytes(Image.fromarray((mask * 255).astype(np.uint8), mode="L"))


def _record(spec: StorySpec, options: RenderOptions, config_json: str, frame: RenderedFrame) -> FrameRecord:
    return FrameRecord(
        story_id=spec.id,
        frame_id=frame.job.frame_id,
        frame_index=frame.job.index,
        prompt=frame.job.prompt,
        seed=frame.job.seed,
        image_png=png_bytes(frame.image),
        width=frame.image.width,
        height=frame.image.height,
        model=options.model,
        method=options.method,
        config=config_json,
        mask_png=_mask_png(frame.mask),
        is_anchor=frame.is_anchor,
        render_seconds=frame.seconds,
    )


def _read_bundle(url: str, storage_options: dict | None) -> AnchorBundle:
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise StorySyncUserError(f"--anchors {url}: no such file") from None
    try:
        return AnchorBundle.from_bytes(data)
    except ValueError as exc:
        raise StorySyncUserError(f"--anchors {url}: {exc}") from None


def render_story(
    story: str | StorySpec, options: RenderOptions, *, pipe: object | None = None,
    on_frame: Callable[[RenderedFrame], None] | None = None,
) -> JobResult:
    """Render a story (a path or a loaded spec) into the dataset at ``options.out``.

    ``pipe`` may be a pipeline already loaded (notebooks reuse one across jobs).
    """
    start = time.perf_counter()
    if options.method not in METHODS:
        raise StorySyncUserError(f"--method {options.method!r}: choose one of {', '.join(METHODS)}")
    spec = load_story(story) if isinstance(story, str) else story
    spec = spec.with_overrides(steps=options.steps, height=options.height, width=options.width, seed=options.seed)
    selected = spec.frames
    if options.only:
        selected = [spec.frame_by_id(frame_id) for frame_id in dict.fromkeys(options.only)]

    device, dtype = _device_and_dtype(options.device, options.dtype)
    if pipe is None:
        try:
            pipe = load_pipeline(options.model, device=device, dtype=dtype)
        except ValueError as exc:  # UnknownModelError and friends
            raise StorySyncUserError(f"--model: {exc}") from None
    try:
        adapter = UNetAdapter(pipe)
    except TypeError as exc:
        raise StorySyncUserError(f"--model {options.model}: {exc}") from None
    token_positions = validate_for_model(spec, adapter.tokenizer, adapter.size_factor)

    storysync = options.method == "storysync"
    config = options.config if storysync else StorySyncConfig.vanilla()
    bundle = _read_bundle(options.anchors, options.storage_options) if options.anchors and storysync else None
    anchor_ids = list(bundle.meta["anchor_ids"]) if bundle is not None else (spec.anchors if storysync else [])
    settings = RenderSettings(
        model=options.model, steps=spec.defaults.steps, height=spec.defaults.height,
        width=spec.defaults.width, guidance_scale=spec.defaults.guidance_scale,
    )
    renderer = StoryRenderer(adapter, config, settings)
    if bundle is not None:
        try:
            renderer.check_bundle(bundle)
        except BundleMismatchError as exc:
            raise StorySyncUserError(f"--anchors {options.anchors}: {exc}") from None

    config_json = frame_config_json(options, spec, config, anchor_ids)
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options)
    existing = sink.existing(spec.id)
    for frame_id, info in existing.items():
        if info["config"] != config_json:
            raise StorySyncUserError(
                f"--out {options.out}: frame {frame_id!r} of story {spec.id!r} is already there, rendered "
                "with other settings; choose another --out"
            )
    jobs = plan_jobs(spec, token_positions)
    by_id = {job.frame_id: job for job in jobs}
    todo = [by_id[f.id] for f in selected if f.id not in existing]
    skipped = [f.id for f in selected if f.id in existing]

    rendered: list[str] = []
    bar = tqdm(total=len(todo), unit="frame", disable=not options.progress or None, desc=spec.id)

    def write(frame: RenderedFrame) -> None:
        sink.write([_record(spec, options, config_json, frame)])
        rendered.append(frame.job.frame_id)
        bar.update(1)
        done = len(rendered)
        eta = (time.perf_counter() - start) / done * (len(todo) - done)
        bar.set_postfix(frame=frame.job.frame_id, sec=f"{frame.seconds:.2f}")
        log.info("frame %s done in %.2fs (%d/%d, ETA %.0fs)", frame.job.frame_id, frame.seconds, done, len(todo), eta)
        if on_frame is not None:
            on_frame(frame)

    def step_hook(label: str) -> Callable[[int], None]:
        def hook(i: int) -> None:
            bar.set_postfix(frame=label, step=f"{i + 1}/{settings.steps}")

        return hook

    bundle_url = None
    anchor_set = set(anchor_ids)
    todo_frames = [job for job in todo if job.frame_id not in anchor_set or not storysync or bundle is not None]
    todo_anchors = [job for job in todo if job not in todo_frames]
    try:
        if storysync and bundle is None and (todo_frames or todo_anchors):
            anchor_jobs = [by_id[a] for a in anchor_ids]
            anchor_frames, bundle = renderer.render_anchors(anchor_jobs, step_hook("anchors"))
            for frame in anchor_frames:
                if frame.job in todo_anchors:
                    write(frame)
            if options.save_anchors:
                bundle_url = f"{options.out.rstrip('/')}/{ANCHOR_DIR}/{spec.id}.safetensors"
                write_bytes(options.out, f"{ANCHOR_DIR}/{spec.id}.safetensors", bundle.to_bytes(),
                            storage_options=options.storage_options)
        for job in todo_frames:
            write(renderer.render_frame(job, bundle, step_hook(job.frame_id)))
    finally:
        bar.close()

    storyboard_url, manifest_url = _finish(sink, spec, options, config_json, anchor_ids)
    return JobResult(
        out=options.out, story_id=spec.id, rendered=rendered, skipped=skipped,
        storyboard=storyboard_url, manifest=manifest_url, seconds=time.perf_counter() - start,
        anchor_bundle=bundle_url,
    )


def _finish(
    sink: ParquetFrameSink, spec: StorySpec, options: RenderOptions, config_json: str, anchor_ids: list[str]
) -> tuple[str, str]:
    """Write storyboard.png and manifest.json from what the dataset holds now."""
    table = sink.read_table(spec.id)
    rows = table.select(["frame_id", "frame_index", "prompt", "image", "mask"]).to_pylist()
    tiles = []
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        mask = Image.open(io.BytesIO(row["mask"])).convert("L") if row["mask"] else None
        tiles.append((f"{row['frame_id']}: {row['prompt']}", image, mask))
    storyboard = ""
    if tiles:
        storyboard = write_bytes(
            options.out, "storyboard.png", png_bytes(make_storyboard(tiles)), storage_options=options.storage_options
        )
    done = {row["frame_id"] for row in rows}
    previous = read_manifest(options.out, storage_options=options.storage_options) or {}
    stories = dict(previous.get("stories", {}))
    stories[spec.id] = {
        "source": spec.source,
        "model": options.model,
        "method": options.method,
        "config": json.loads(config_json),
        "anchors": anchor_ids,
        "complete": len(done) == len(spec.frames),
        "frames": [
            {"id": f.id, "index": f.index, "prompt": f.prompt, "seed": f.seed, "done": f.id in done,
             "is_anchor": f.id in anchor_ids}
            for f in spec.frames
        ],
    }
    manifest = write_manifest(options.out, {"format": "storysync-dataset/1", "stories": stories},
                              storage_options=options.storage_options)
    return storyboard, manifest
