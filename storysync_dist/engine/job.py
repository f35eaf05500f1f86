"""One render job: plan the story, hand the work to an executor, write the dataset.

Planning checks everything a user can get wrong before anything is written, so a bad input
leaves no output behind. Frames already in the dataset with the same render config are skipped,
so a rerun of an interrupted job renders only what is missing. The executor renders: in this
process (:func:`local_executor`) or on Ray actors (``storysync_dist.distributed``); either way the
driver alone writes, one atomic part file per frame, as frames arrive.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.anchors import AnchorBundle
from ..core.config import StorySyncConfig
from ..errors import StorySyncUserError
from ..io.sink import FrameRecord, ParquetFrameSink, read_manifest, write_bytes, write_manifest
from ..io.storyboard import make_storyboard
from ..io.storyboard import png_bytes as storyboard_png
from ..models.info import load_model_info
from ..models.presets import load_pipeline
from ..models.unet import UNetAdapter
from ..spec import StorySpec, load_story, validate_for_model
from .renderer import (
    METHODS,
    BundleMismatchError,
    FrameJob,
    FrameOutput,
    RenderSettings,
    StoryRenderer,
    encode_frame,
)

log = logging.getLogger("storysync")

ANCHOR_DIR = "anchors"
STORYBOARD_DIR = "storyboards"


@dataclass
class RenderOptions:
    """Options of ``storysync render`` (and of ``storysync_dist.api.render_story``)."""

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
    stats: dict = field(default_factory=dict)


@dataclass
class JobPlan:
    """The work of one job, decided before anything renders.

    ``anchor_jobs`` are rendered together first when the frames need a bundle and none was given;
    ``anchor_writes`` says which of them go into the dataset; ``frame_jobs`` are rendered one by one
    against the bundle (or plainly, for ``--method vanilla``).
    """

    spec: StorySpec
    options: RenderOptions
    config: StorySyncConfig
    settings: RenderSettings
    config_json: str
    anchor_ids: list[str]
    anchor_jobs: list[FrameJob]
    anchor_writes: set[str]
    frame_jobs: list[FrameJob]
    bundle: AnchorBundle | None
    skipped: list[str]

    @property
    def total(self) -> int:
        return len(self.anchor_writes) + len(self.frame_jobs)


class JobContext:
    """What an executor calls back into: write a finished frame, report a step, save a bundle."""

    def __init__(self, plan: JobPlan, on_frame: Callable[[FrameOutput], None] | None) -> None:
        self.plan = plan
        self.sink = ParquetFrameSink(plan.options.out, storage_options=plan.options.storage_options)
        self.start = time.perf_counter()
        self.rendered: list[str] = []
        self.bundle_url: str | None = None
        self.first_frame_seconds: float | None = None
        self._on_frame = on_frame
        self.bar = tqdm(total=plan.total, unit="frame", disable=not plan.options.progress or None,
                        desc=plan.spec.id)

    def emit(self, output: FrameOutput) -> None:
        """Write one finished frame (one atomic part file) and report progress."""
        plan = self.plan
        self.sink.write([_record(plan, output)])
        self.rendered.append(output.job.frame_id)
        done = len(self.rendered)
        elapsed = time.perf_counter() - self.start
        if self.first_frame_seconds is None:
            self.first_frame_seconds = elapsed
        self.bar.update(1)
        self.bar.set_postfix(frame=output.job.frame_id, sec=f"{output.seconds:.2f}")
        log.info("frame %s done in %.2fs (%d/%d, ETA %.0fs)", output.job.frame_id, output.seconds, done,
                 plan.total, elapsed / done * (plan.total - done))
        if self._on_frame is not None:
            self._on_frame(output)

    def step(self, label: str, i: int) -> None:
        self.bar.set_postfix(frame=label, step=f"{i + 1}/{self.plan.settings.steps}")

    def save_bundle(self, bundle: AnchorBundle) -> None:
        """Save the anchor bundle next to the dataset when the job asked for it."""
        options = self.plan.options
        if options.save_anchors:
            relpath = f"{ANCHOR_DIR}/{self.plan.spec.id}.safetensors"
            self.bundle_url = write_bytes(options.out, relpath, bundle.to_bytes(),
                                          storage_options=options.storage_options)

    def close(self) -> None:
        self.bar.close()


Executor = Callable[[JobPlan, JobContext], dict]


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
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


def _record(plan: JobPlan, output: FrameOutput) -> FrameRecord:
    return FrameRecord(
        story_id=plan.spec.id,
        frame_id=output.job.frame_id,
        frame_index=output.job.index,
        prompt=output.job.prompt,
        seed=output.job.seed,
        image_png=output.image_png,
        width=output.width,
        height=output.height,
        model=plan.options.model,
        method=plan.options.method,
        config=plan.config_json,
        mask_png=output.mask_png,
        is_anchor=output.is_anchor,
        render_seconds=output.seconds,
    )


def _read_bundle(url: str, storage_options: dict | None) -> AnchorBundle:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise StorySyncUserError(f"--anchors {url}: no such file") from None
    try:
        return AnchorBundle.from_bytes(data)
    except ValueError as exc:
        raise StorySyncUserError(f"--anchors {url}: {exc}") from None


def prepare_job(story: str | StorySpec, options: RenderOptions, *, pipe: object | None = None) -> JobPlan:
    """Validate everything and decide the work; writes nothing."""
    if options.method not in METHODS:
        raise StorySyncUserError(f"--method {options.method!r}: choose one of {', '.join(METHODS)}")
    if options.workers < 0:
        raise StorySyncUserError(f"--workers {options.workers}: must be >= 0")
    spec = load_story(story) if isinstance(story, str) else story
    spec = spec.with_overrides(steps=options.steps, height=options.height, width=options.width, seed=options.seed)
    selected = spec.frames
    if options.only:
        selected = [spec.frame_by_id(frame_id) for frame_id in dict.fromkeys(options.only)]

    try:
        if pipe is not None:
            adapter = UNetAdapter(pipe)
            tokenizer, size_factor = adapter.tokenizer, adapter.size_factor
        else:
            info = load_model_info(options.model)
            tokenizer, size_factor = info.tokenizer, info.size_factor
    except (ValueError, TypeError) as exc:  # UnknownModelError, unsupported pipeline
        raise StorySyncUserError(f"--model: {exc}") from None
    token_positions = validate_for_model(spec, tokenizer, size_factor)

    storysync = options.method == "storysync"
    config = options.config if storysync else StorySyncConfig.vanilla()
    settings = RenderSettings(
        model=options.model, steps=spec.defaults.steps, height=spec.defaults.height,
        width=spec.defaults.width, guidance_scale=spec.defaults.guidance_scale,
    )
    bundle = _read_bundle(options.anchors, options.storage_options) if options.anchors and storysync else None
    if bundle is not None:
        try:
            StoryRenderer.check_bundle_meta(bundle, config, settings)
        except BundleMismatchError as exc:
            raise StorySyncUserError(f"--anchors {options.anchors}: {exc}") from None
    anchor_ids = list(bundle.meta["anchor_ids"]) if bundle is not None else (spec.anchors if storysync else [])

    config_json = frame_config_json(options, spec, config, anchor_ids)
    existing = ParquetFrameSink(options.out, storage_options=options.storage_options).existing(spec.id)
    for frame_id, info in existing.items():
        if info["config"] != config_json:
            raise StorySyncUserError(
                f"--out {options.out}: frame {frame_id!r} of story {spec.id!r} is already there, rendered "
                "with other settings; choose another --out"
            )
    jobs = plan_jobs(spec, token_positions)
    by_id = {job.frame_id: job for job in jobs}
    todo = [by_id[f.id] for f in selected if f.id not in existing]
    # Anchors are rendered together (they share among themselves) whenever frames need their
    # bundle; with --method vanilla or an imported bundle every frame renders on its own.
    renders_anchors = storysync and bundle is None
    anchor_writes = {job.frame_id for job in todo if job.frame_id in anchor_ids} if renders_anchors else set()
    frame_jobs = [job for job in todo if job.frame_id not in anchor_writes]
    anchor_jobs = [by_id[a] for a in anchor_ids] if renders_anchors and todo else []
    return JobPlan(
        spec=spec, options=options, config=config, settings=settings, config_json=config_json,
        anchor_ids=anchor_ids, anchor_jobs=anchor_jobs, anchor_writes=anchor_writes,
        frame_jobs=frame_jobs, bundle=bundle, skipped=[f.id for f in selected if f.id in existing],
    )


def local_executor(pipe: object | None = None) -> Executor:
    """Render in this process with one pipeline (loaded here unless one is given)."""

    def execute(plan: JobPlan, ctx: JobContext) -> dict:
        options = plan.options
        nonlocal pipe
        if pipe is None:
            device, dtype = device_and_dtype(options.device, options.dtype)
            pipe = load_pipeline(options.model, device=device, dtype=dtype)
        renderer = StoryRenderer(UNetAdapter(pipe), plan.config, plan.settings)
        bundle = plan.bundle
        if plan.anchor_jobs:
            anchor_frames, bundle = renderer.render_anchors(plan.anchor_jobs, lambda i: ctx.step("anchors", i))
            for frame in anchor_frames:
                if frame.job.frame_id in plan.anchor_writes:
                    ctx.emit(encode_frame(frame))
            ctx.save_bundle(bundle)
        for job in plan.frame_jobs:
            frame = renderer.render_frame(job, bundle, lambda i, label=job.frame_id: ctx.step(label, i))
            ctx.emit(encode_frame(frame))
        return {"workers": 0, "anchor_bytes": bundle.nbytes() if bundle is not None else 0}

    return execute


def run_job(plan: JobPlan, executor: Executor, on_frame: Callable[[FrameOutput], None] | None = None) -> JobResult:
    """Run a planned job with ``executor``, then write the storyboard and the manifest."""
    ctx = JobContext(plan, on_frame)
    try:
        stats = executor(plan, ctx) if plan.total else {}
    finally:
        ctx.close()
    stats = dict(stats or {})
    stats["first_frame_seconds"] = ctx.first_frame_seconds
    storyboard_url, manifest_url = _finish(ctx.sink, plan)
    return JobResult(
        out=plan.options.out, story_id=plan.spec.id, rendered=ctx.rendered, skipped=plan.skipped,
        storyboard=storyboard_url, manifest=manifest_url, seconds=time.perf_counter() - ctx.start,
        anchor_bundle=ctx.bundle_url, stats=stats,
    )


def _finish(sink: ParquetFrameSink, plan: JobPlan) -> tuple[str, str]:
    """Write storyboard.png and manifest.json from what the dataset holds now."""
    spec, options = plan.spec, plan.options
    table = sink.read_table(spec.id)
    rows = table.select(["frame_id", "frame_index", "prompt", "image", "mask"]).to_pylist()
    tiles = []
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        mask = Image.open(io.BytesIO(row["mask"])).convert("L") if row["mask"] else None
        tiles.append((f"{row['frame_id']}: {row['prompt']}", image, mask))
    previous = read_manifest(options.out, storage_options=options.storage_options) or {}
    stories = dict(previous.get("stories", {}))
    storyboard = ""
    if tiles:
        # One storyboard per story (a dataset may hold many); storyboard.png at the root is the
        # one of a single-story dataset, which is what `storysync render` makes.
        data = storyboard_png(make_storyboard(tiles))
        storyboard = write_bytes(options.out, f"{STORYBOARD_DIR}/{spec.id}.png", data,
                                 storage_options=options.storage_options)
        if set(stories) <= {spec.id}:
            storyboard = write_bytes(options.out, "storyboard.png", data, storage_options=options.storage_options)
    done = {row["frame_id"] for row in rows}
    stories[spec.id] = {
        "source": spec.source,
        "model": options.model,
        "method": options.method,
        "config": json.loads(plan.config_json),
        "anchors": plan.anchor_ids,
        "storyboard": f"{STORYBOARD_DIR}/{spec.id}.png" if tiles else None,
        "complete": len(done) == len(spec.frames),
        "frames": [
            {"id": f.id, "index": f.index, "prompt": f.prompt, "seed": f.seed, "done": f.id in done,
             "is_anchor": f.id in plan.anchor_ids}
            for f in spec.frames
        ],
    }
    manifest = write_manifest(options.out, {"format": "storysync-dataset/1", "stories": stories},
                              storage_options=options.storage_options)
    return storyboard, manifest
