"""One render job: plan the story against the dataset, hand the work to an executor, write.

Planning checks everything a user can get wrong before anything is written, so a bad input leaves
no output behind. Each frame's identity (``identity.frame_fingerprint``: model, precision,
sampling settings, config, its prompt, seed and subject tokens, and the anchors) is compared with
the fingerprints stored in the dataset, which decides the work:

- a selected frame whose current fingerprint is stored is skipped;
- a selected frame stored with another fingerprint is rendered again and replaces its old row;
- a frame stored in the dataset whose id is no longer in the story is removed;
- a frame left out by ``--only`` whose stored row is out of date is left alone and reported as
  stale in the manifest (it is redone by the next run that selects it).

A job holds a lease on its story for as long as it writes (``io.lease``), so two jobs never write
the same story at once: the second is refused with a one-line error. The executor renders: in this
process (:func:`local_executor`) or on Ray actors (``storysync_dist.distributed``); either way the
driver alone writes, one atomic part file per frame, as frames arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..core.anchors import AnchorBundle
from ..core.config import StorySyncConfig
from ..errors import StorySyncUserError
from ..io.lease import Lease, LeaseHeldError
from ..io.sink import FrameRecord, ParquetFrameSink, write_bytes
from ..models.info import load_model_info
from ..models.presets import load_pipeline
from ..models.revision import model_revision
from ..models.unet import UNetAdapter
from ..spec import StorySpec, load_story, validate_for_model
from .bundles import check_bundle_for_job, read_bundle, read_bundle_meta
from .devices import default_dtype, device_and_dtype
from .identity import AnchorIdentity, RenderIdentity, frame_fingerprint
from .outputs import now_iso, update_manifest, write_storyboards
from .renderer import METHODS, FrameJob, FrameOutput, RenderSettings, StoryRenderer, encode_frame

__all__ = [
    "JobContext", "JobPlan", "JobResult", "RenderOptions", "device_and_dtype", "local_executor",
    "prepare_job", "run_job",
]

log = logging.getLogger("storysync")

ANCHOR_DIR = "anchors"


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
    # Ray resources each actor (the anchor actor and every FrameWorker) requests, like Ray Train's
    # ``resources_per_worker``; None follows --device (one GPU for cuda, one CPU for cpu).
    resources_per_worker: dict[str, float] | None = None
    # Seconds to wait for the actors' resources before failing with what the job waits for.
    start_timeout: float = 600.0
    # Plan only: report what would be rendered, replaced and removed, and write nothing.
    dry_run: bool = False


@dataclass
class JobResult:
    """What a job did (or, for a dry run, would do) to the story's frames in the dataset."""

    out: str
    story_id: str
    rendered: list[str]
    skipped: list[str]
    storyboard: str
    manifest: str
    seconds: float
    anchor_bundle: str | None = None
    stats: dict = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class JobPlan:
    """The work of one job, decided before anything renders.

    ``anchor_jobs`` are rendered together first when the frames need their bundle, anchor frames
    must be (re)written, or ``--save-anchors`` needs a bundle; ``anchor_writes`` says which of them
    go into the dataset; ``frame_jobs`` are rendered one by one against the bundle (or plainly, for
    ``--method vanilla``). ``fingerprints`` holds the current identity of every frame of the story.
    """

    spec: StorySpec
    options: RenderOptions
    config: StorySyncConfig
    settings: RenderSettings
    config_json: str
    identity: RenderIdentity
    fingerprints: dict[str, str]
    jobs: dict[str, FrameJob]
    anchor_ids: list[str]
    anchor_jobs: list[FrameJob]
    anchor_writes: set[str]
    frame_jobs: list[FrameJob]
    bundle: AnchorBundle | None
    skipped: list[str]
    replace: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    # Rows of frames whose current render is stored but which also have older rows (a crash
    # between a replacement's commit and the removal of the old row): removed by the job.
    leftovers: list[str] = field(default_factory=list)
    save_bundle: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Frames this job writes."""
        return len(self.anchor_writes) + len(self.frame_jobs)

    @property
    def has_work(self) -> bool:
        return bool(self.total or self.anchor_jobs or self.remove or self.leftovers or self.save_bundle)

    def summary(self) -> list[str]:
        """What the job does to the dataset, one line per kind of change (for ``--dry-run``)."""
        def ids(items: list[str]) -> str:
            shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
            return f" ({shown})" if items else ""

        new = [f.id for f in self.spec.frames if f.id in self._writes and f.id not in self.replace]
        lines = [
            f"render:  {len(new)}{ids(new)}",
            f"replace: {len(self.replace)}{ids(self.replace)}  (stored with other inputs: rendered again)",
            f"remove:  {len(self.remove)}{ids(self.remove)}  (no longer in the story)",
            f"skip:    {len(self.skipped)} already present",
        ]
        if self.stale:
            lines.append(f"stale:   {len(self.stale)}{ids(self.stale)}  (out of date, not selected by --only)")
        if self.anchor_jobs and not self.anchor_writes:
            lines.append(f"anchors: render {len(self.anchor_jobs)} for their bundle (not written as frames)")
        if self.damaged:
            lines.append(f"damaged: {len(self.damaged)} part file(s) to set aside: {'; '.join(self.damaged)}")
        return lines

    @property
    def _writes(self) -> set[str]:
        return set(self.anchor_writes) | {job.frame_id for job in self.frame_jobs}


class JobContext:
    """What an executor calls back into: write a finished frame, report a step, save a bundle."""

    def __init__(self, plan: JobPlan, sink: ParquetFrameSink,
                 on_frame: Callable[[FrameOutput], None] | None) -> None:
        self.plan = plan
        self.sink = sink
        self.start = time.perf_counter()
        self.rendered: list[str] = []
        self.bundle_url: str | None = None
        self.first_frame_seconds: float | None = None
        self._on_frame = on_frame
        self.bar = tqdm(total=plan.total, unit="frame", disable=not plan.options.progress or None,
                        desc=plan.spec.id)

    def emit(self, output: FrameOutput) -> None:
        """Write one finished frame (one atomic part file, replacing any older row of it)."""
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
                 plan.total, elapsed / done * max(0, plan.total - done))
        if self._on_frame is not None:
            self._on_frame(output)

    def step(self, label: str, i: int) -> None:
        self.bar.set_postfix(frame=label, step=f"{i + 1}/{self.plan.settings.steps}")

    def save_bundle(self, bundle: AnchorBundle) -> None:
        """Save the anchor bundle next to the dataset when the job asked for it."""
        options = self.plan.options
        if self.plan.save_bundle:
            self.bundle_url = write_bytes(options.out, bundle_relpath(self.plan.spec.id), bundle.to_bytes(),
                                          storage_options=options.storage_options)

    def close(self) -> None:
        self.bar.close()


Executor = Callable[[JobPlan, JobContext], dict]


def bundle_relpath(story_id: str) -> str:
    return f"{ANCHOR_DIR}/{story_id}.safetensors"


def frame_config_json(options: RenderOptions, settings: RenderSettings, config: StorySyncConfig,
                      anchors: list[str]) -> str:
    """The ``config`` column: how the frames were rendered, besides their prompt and seed."""
    return json.dumps(
        {
            "method": options.method,
            "model": settings.model,
            "model_revision": settings.model_revision,
            "dtype": settings.dtype,
            "steps": settings.steps,
            "height": settings.height,
            "width": settings.width,
            "guidance_scale": settings.guidance_scale,
            "negative_prompt": settings.negative_prompt,
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
        fingerprint=plan.fingerprints[output.job.frame_id],
    )


def _dtype_name(options: RenderOptions, pipe: object | None, device: str | None) -> str:
    """The dtype frames render in (part of their identity), checking an in-process device."""
    if pipe is not None:
        return str(pipe.dtype).removeprefix("torch.")
    if device is None:
        if options.workers > 0:
            if options.dtype is not None:
                return options.dtype
            raise ValueError("prepare_job(device=...) is needed with workers >= 1 and no --dtype: "
                             "pass the executor's device (RayExecutor.device)")
        device, dtype = device_and_dtype(options.device, options.dtype)  # refuses a missing device
        return str(dtype).removeprefix("torch.")
    return options.dtype or default_dtype(device)


def prepare_job(
    story: str | StorySpec,
    options: RenderOptions,
    *,
    pipe: object | None = None,
    device: str | None = None,
) -> JobPlan:
    """Validate everything and decide the work against the dataset; writes nothing.

    ``device`` is where the frames will render (for workers, ``RayExecutor.device``): it decides
    the default dtype, which is part of every frame's identity.
    """
    if options.method not in METHODS:
        raise StorySyncUserError(f"--method {options.method!r}: choose one of {', '.join(METHODS)}")
    if options.workers < 0:
        raise StorySyncUserError(f"--workers {options.workers}: must be >= 0")
    spec = load_story(story) if isinstance(story, str) else story
    spec = spec.with_overrides(steps=options.steps, height=options.height, width=options.width, seed=options.seed)
    if options.only:
        for frame_id in options.only:
            spec.frame_by_id(frame_id)  # a one-line error for an unknown id

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
    d = spec.defaults
    settings = RenderSettings(
        model=options.model, steps=d.steps, height=d.height, width=d.width, guidance_scale=d.guidance_scale,
        dtype=_dtype_name(options, pipe, device), model_revision=model_revision(options.model),
        negative_prompt=d.negative_prompt,
    )
    jobs = {job.frame_id: job for job in plan_jobs(spec, token_positions)}

    bundle = None
    if options.anchors and storysync:
        bundle = read_bundle(options.anchors, options.storage_options)
        check_bundle_for_job(bundle, options.anchors, config=config, settings=settings, spec=spec, jobs=jobs)
    if bundle is not None:
        meta = bundle.meta
        anchors = tuple(
            AnchorIdentity(a, p, s, tuple(tuple(x) for x in t))
            for a, p, s, t in zip(meta["anchor_ids"], meta["anchor_prompts"], meta["anchor_seeds"],
                                  meta["anchor_token_positions"])
        )
    elif storysync:
        anchors = tuple(
            AnchorIdentity(a, jobs[a].prompt, jobs[a].seed, tuple(tuple(p) for p in jobs[a].token_positions))
            for a in spec.anchors
        )
    else:
        anchors = ()
    anchor_ids = [a.frame_id for a in anchors]
    identity = RenderIdentity(
        model=settings.model, model_revision=settings.model_revision, dtype=settings.dtype,
        method=options.method, steps=settings.steps, height=settings.height, width=settings.width,
        guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt,
        config=config.to_dict(),
        subjects=tuple((s.description, tuple(s.tokens)) for s in spec.subjects),
        anchors=anchors,
    )
    fingerprints = {
        job.frame_id: frame_fingerprint(identity, frame_id=job.frame_id, prompt=job.prompt, seed=job.seed,
                                        token_positions=job.token_positions,
                                        is_anchor=job.frame_id in anchor_ids)
        for job in jobs.values()
    }
    plan = JobPlan(
        spec=spec, options=options, config=config, settings=settings,
        config_json=frame_config_json(options, settings, config, anchor_ids), identity=identity,
        fingerprints=fingerprints, jobs=jobs, anchor_ids=anchor_ids, anchor_jobs=[], anchor_writes=set(),
        frame_jobs=[], bundle=bundle, skipped=[],
    )
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    return _plan_work(plan, sink)


def _plan_work(plan: JobPlan, sink: ParquetFrameSink) -> JobPlan:
    """Compare the story with what the dataset holds and fill in the work (see the module doc)."""
    spec, options = plan.spec, plan.options
    try:
        stored = sink.existing(spec.id)
    except OSError as exc:
        raise StorySyncUserError(f"--out {options.out}: cannot read the dataset there ({_one_line(exc)})") from None
    selected = [spec.frame_by_id(i) for i in dict.fromkeys(options.only)] if options.only else spec.frames
    selected_ids = {frame.id for frame in selected}
    current = plan.fingerprints
    todo, skipped, replace, stale, leftovers = [], [], [], [], []
    for frame in spec.frames:
        rows = stored.get(frame.id, [])
        fresh = any(row.fingerprint == current[frame.id] for row in rows)
        if fresh and len(rows) > 1:
            leftovers.append(frame.id)
        if frame.id not in selected_ids:
            if rows and not fresh:
                stale.append(frame.id)
        elif fresh:
            skipped.append(frame.id)
        else:
            todo.append(frame.id)
            if rows:
                replace.append(frame.id)
    remove = sorted(frame_id for frame_id in stored if frame_id not in plan.jobs)

    storysync = options.method == "storysync"
    anchor_writes = {i for i in todo if i in plan.anchor_ids} if storysync else set()
    frame_jobs = [plan.jobs[i] for i in todo if i not in anchor_writes]
    anchors_in_story = [a for a in plan.anchor_ids if a in plan.jobs]
    save_bundle = False
    notes: list[str] = []
    if options.save_anchors and storysync:
        saved = read_bundle_meta(_join(options.out, bundle_relpath(spec.id)), options.storage_options)
        if plan.bundle is not None or saved is None or not _same_bundle(saved, plan):
            save_bundle = True
        else:
            notes.append(f"--save-anchors: {bundle_relpath(spec.id)} already holds these anchors; kept")
    needs_bundle = storysync and bool(frame_jobs) and plan.bundle is None
    # Anchors render (together, as one batch) to write anchor frames, to give the frames their
    # bundle, or for --save-anchors on a finished dataset; only anchors that are frames of this
    # story can be rendered (an imported bank from another story is used as it is).
    render_anchors = storysync and bool(anchor_writes or needs_bundle or (save_bundle and plan.bundle is None))
    render_anchors = render_anchors and len(anchors_in_story) == len(plan.anchor_ids)
    plan.anchor_jobs = [plan.jobs[a] for a in plan.anchor_ids] if render_anchors else []
    plan.anchor_writes = anchor_writes
    plan.frame_jobs = frame_jobs
    plan.skipped, plan.replace, plan.remove, plan.stale = skipped, replace, remove, stale
    plan.leftovers, plan.save_bundle, plan.notes = leftovers, save_bundle, notes
    plan.damaged = list(sink.damaged)
    return plan


def _same_bundle(saved_meta: dict, plan: JobPlan) -> bool:
    from .renderer import bundle_meta

    expected = bundle_meta(plan.config, plan.settings, [plan.jobs[a] for a in plan.anchor_ids])
    return all(saved_meta.get(key) == value for key, value in expected.items())


def _join(root: str, relpath: str) -> str:
    return root.rstrip("/") + "/" + relpath


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def local_executor(pipe: object | None = None) -> Executor:
    """Render in this process with one pipeline (loaded here unless one is given)."""

    def execute(plan: JobPlan, ctx: JobContext) -> dict:
        options = plan.options
        nonlocal pipe
        if pipe is None:
            device, dtype = device_and_dtype(options.device, options.dtype)
            pipe = load_pipeline(options.model, device=device, dtype=dtype)
        device = str(pipe.device)
        log.info("rendering in this process on %s (%s)", device, plan.settings.dtype)
        stats: dict = {"workers": 0, "devices": [{
            "role": "local", "index": 0, "host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "gpu_ids": [], "threads": torch.get_num_threads()}]}
        renderer = StoryRenderer(UNetAdapter(pipe), plan.config, plan.settings)
        bundle = plan.bundle
        if plan.anchor_jobs:
            anchor_frames, bundle = renderer.render_anchors(plan.anchor_jobs, lambda i: ctx.step("anchors", i))
            for frame in anchor_frames:
                if frame.job.frame_id in plan.anchor_writes:
                    ctx.emit(encode_frame(frame))
        if plan.save_bundle and bundle is not None:
            ctx.save_bundle(bundle)
        for job in plan.frame_jobs:
            frame = renderer.render_frame(job, bundle, lambda i, label=job.frame_id: ctx.step(label, i))
            ctx.emit(encode_frame(frame))
        stats["anchor_bytes"] = bundle.nbytes() if bundle is not None else 0
        return stats

    return execute


def _lease_story(plan: JobPlan) -> Lease:
    options, spec = plan.options, plan.spec
    lease = Lease(options.out, f"story-{spec.id}", storage_options=options.storage_options,
                  purpose=f"job rendering story {spec.id!r}")
    try:
        return lease.acquire()
    except LeaseHeldError as exc:
        raise StorySyncUserError(
            f"--out {options.out}: story {spec.id!r} is being written by another job ({exc}); wait for it "
            "to finish, or rerun once its lease has expired"
        ) from None
    except (OSError, ValueError) as exc:  # no such bucket, no permission, a file where a folder goes
        raise StorySyncUserError(f"--out {options.out}: cannot write there ({_one_line(exc)})") from None


def _out_exists(options: RenderOptions) -> bool | None:
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    try:
        return sink.fs.exists(sink._fs_root)
    except Exception:
        return None


def run_job(plan: JobPlan, executor: Executor, on_frame: Callable[[FrameOutput], None] | None = None) -> JobResult:
    """Run a planned job with ``executor``: lease the story, re-plan against the dataset as it is
    now, render, remove what the story no longer has, then write the storyboard and the manifest."""
    options = plan.options
    start = time.perf_counter()
    existed = _out_exists(options)
    lease = _lease_story(plan)
    try:
        sink = ParquetFrameSink(options.out, storage_options=options.storage_options)
        plan = _plan_work(plan, sink)  # what changed between planning and taking the lease
        ctx = JobContext(plan, sink, on_frame)
        try:
            stats = executor(plan, ctx) if (plan.total or plan.anchor_jobs or plan.save_bundle) else {}
        finally:
            ctx.close()
        if plan.save_bundle and plan.bundle is not None and not plan.anchor_jobs:
            ctx.save_bundle(plan.bundle)  # an imported bundle, saved next to the dataset as asked
        removed = sink.remove_frames(plan.spec.id, set(plan.remove)) if plan.remove else []
        if plan.leftovers:
            sink.remove_stale_rows(plan.spec.id, {i: plan.fingerprints[i] for i in plan.leftovers})
        stats = dict(stats or {})
        stats["first_frame_seconds"] = ctx.first_frame_seconds
        changed = bool(ctx.rendered or removed or plan.leftovers or sink.damaged)
        storyboard, manifest = _finish(sink, plan, stats, changed=changed, removed=removed)
    except BaseException:
        lease.release()
        if existed is False:
            _remove_if_empty(options)
        raise
    lease.release()
    return JobResult(
        out=options.out, story_id=plan.spec.id, rendered=ctx.rendered, skipped=plan.skipped,
        storyboard=storyboard, manifest=manifest, seconds=time.perf_counter() - start,
        anchor_bundle=ctx.bundle_url, stats=stats, replaced=[i for i in plan.replace if i in ctx.rendered],
        removed=removed, stale=plan.stale, damaged=list(sink.damaged), notes=plan.notes,
    )


def _remove_if_empty(options: RenderOptions) -> None:
    """A job that failed before writing anything leaves no empty output folder behind (local)."""
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    root = sink._fs_root
    if sink.url(root) != root:
        return
    for folder in (os.path.join(root, "_locks"), os.path.join(root, "data"), root):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _finish(sink: ParquetFrameSink, plan: JobPlan, stats: dict, *, changed: bool,
            removed: list[str]) -> tuple[str, str]:
    """Write the storyboard sheets and this story's manifest entry from what the dataset holds."""
    spec, options = plan.spec, plan.options
    stored = sink.existing(spec.id)
    done = {f.id for f in spec.frames if any(r.fingerprint == plan.fingerprints[f.id] for r in stored.get(f.id, []))}
    root_url = sink.url(sink._fs_root)
    board: dict[str, str] = {}

    def entry_for(previous: dict | None, stories: dict) -> dict:
        previous = previous or {}
        sheets = list(previous.get("storyboards") or [])
        before = {f.get("id"): (f.get("fingerprint"), f.get("done")) for f in previous.get("frames", [])}
        now = {f.id: (plan.fingerprints[f.id], f.id in done) for f in spec.frames}
        if changed or not sheets or before != now:
            try:
                sheets = write_storyboards(sink, plan, sheets)
            except Exception as exc:  # the manifest matters more than the picture
                log.warning("storyboard of %s not written: %s", spec.id, _one_line(exc))
                sheets = []
        if sheets and set(stories) <= {spec.id}:
            # storyboard.png at the root is the first sheet of a single-story dataset.
            first = sink.fs.cat_file(f"{sink._fs_root}/{sheets[0]}")
            board["url"] = write_bytes(options.out, "storyboard.png", first, storage_options=options.storage_options)
        elif sheets:
            board["url"] = _join(root_url, sheets[0])
        return {
            "source": spec.source,
            "model": options.model,
            "model_revision": plan.settings.model_revision,
            "dtype": plan.settings.dtype,
            "method": options.method,
            "config": json.loads(plan.config_json),
            "anchors": plan.anchor_ids,
            "storyboard": sheets[0] if sheets else None,
            "storyboards": sheets,
            "complete": len(done) == len(spec.frames),
            "frames": [
                {"id": f.id, "index": f.index, "prompt": f.prompt, "seed": f.seed, "done": f.id in done,
                 "stale": f.id in stored and f.id not in done, "is_anchor": f.id in plan.anchor_ids,
                 "fingerprint": plan.fingerprints[f.id]}
                for f in spec.frames
            ],
            "removed": removed,
            "devices": stats.get("devices", previous.get("devices", [])),
            "damaged": list(sink.damaged),
            "updated": now_iso(),
        }

    try:
        manifest = update_manifest(plan, entry_for)
    except OSError as exc:
        raise StorySyncUserError(f"--out {options.out}: cannot write the manifest ({_one_line(exc)})") from None
    return board.get("url", ""), manifest
