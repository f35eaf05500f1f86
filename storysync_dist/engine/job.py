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

One story holds one set of render settings: if the dataset has rows of the story made with other
settings (the ``config`` column: method, model and revision, dtype, steps, size, guidance, negative
prompt, StorySync config; not the anchors), the job is refused before it writes anything, unless
``replace_config`` is set, which renders those frames again (and cannot be combined with ``only``).

Sampling settings the story leaves out come from the model, the way its stock pipeline picks them
(``models.info``); precedence: ``RenderOptions.steps/height/width`` (the CLI) > the story's
``defaults`` > the model. The StorySync config is resolved by ``core.config.resolve_config``: the
story's ``storysync:`` section (or ``RenderOptions.config`` when a Python caller gives one), then
``ablation``, then ``overrides`` (``--set``).

A job holds a lease on its story for as long as it writes (``io.lease``), so two jobs never write
the same story at once: the second is refused with a one-line error. The executor renders: in this
process (:func:`local_executor`) or on Ray actors (``storysync_dist.distributed``); either way the
driver alone writes, one atomic part file per frame, as frames arrive.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.anchors import AnchorBundle
from ..core.config import ABLATIONS, ConfigError, StorySyncConfig, resolve_config
from ..errors import StorySyncUserError, one_line
from ..io.lease import Lease, LeaseHeldError
from ..io.sink import FrameRecord, ParquetFrameSink, write_bytes
from ..models.info import ModelInfo, load_model_info, model_info_from_pipeline
from ..models.presets import load_pipeline
from ..models.registry import adapter_for
from ..models.revision import model_revision
from ..spec import StorySpec, load_story, validate_for_model
from .bundles import check_bundle_for_job, read_bundle
from .devices import default_dtype, device_and_dtype
from .identity import AnchorIdentity, RenderIdentity, frame_fingerprint
from .outputs import ManifestWriter, write_story_outputs
from .plan import JobPlan, bundle_relpath, frame_config_json, plan_jobs, plan_work
from .progress import JobProgress
from .renderer import METHODS, FrameOutput, RenderSettings, StoryRenderer, encode_frame

__all__ = [
    "JobContext", "JobPlan", "JobResult", "RenderOptions", "StoryJob", "device_and_dtype", "job_config",
    "local_executor", "prepare_job", "run_job", "run_story", "with_model_defaults",
]

log = logging.getLogger("storysync")



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
    # The StorySync config, in layers (later wins): the base, then ``ablation`` (a row of the
    # paper's Table 3a: none, no-mask, no-rfh, no-pose), then ``overrides`` (``--set key=value``,
    # parsed: {"rfh_gamma": 0.5}). The base is the story's ``storysync:`` section, or ``config``
    # when a Python caller gives one (it then replaces the section; ablation and overrides still
    # apply on top). ``--method vanilla`` takes neither ablation nor overrides.
    config: StorySyncConfig | None = None
    ablation: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # A dataset holds one set of render settings per story: rows made with other settings make the
    # job refuse, unless this is set; then those frames are rendered again (not with ``only``).
    replace_config: bool = False
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
    # Bytes of anchor steps each Ray worker may keep resident: a pool renders the anchors of
    # upcoming stories while earlier stories' frames render, and keeps at most this budget divided
    # by the largest bundle seen stories open at once (None: 4 GiB; see docs/distributed.md).
    bundle_budget: int | None = None


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


class JobContext:
    """What an executor calls back into: write a finished frame, report a step, save a bundle."""

    def __init__(self, plan: JobPlan, sink: ParquetFrameSink,
                 on_frame: Callable[[FrameOutput], None] | None, progress: JobProgress | None = None) -> None:
        self.plan = plan
        self.sink = sink
        self.start = time.perf_counter()
        self.rendered: list[str] = []
        self.bundle_url: str | None = None
        self.first_frame_seconds: float | None = None
        self._on_frame = on_frame
        # A job of many stories shows one JobProgress; a single story its own bar.
        self.progress = progress
        if progress is not None:
            progress.add_story(plan.spec.id, plan.total)
        self.bar = tqdm(total=plan.total, unit="frame", disable=progress is not None or not plan.options.progress or None,
                        desc=plan.spec.id)

    def emit(self, output: FrameOutput) -> None:
        """Write one finished frame (one atomic part file, replacing any older row of it)."""
        plan = self.plan
        self.sink.write([_record(plan, output)])
        if self.sink.staged_bytes(plan.spec.id) >= self.sink.target_part_bytes:
            # A long story: make what is staged visible now, as parts of the target size.
            self.sink.commit_story(plan.spec.id, current=plan.fingerprints)
        self.rendered.append(output.job.frame_id)
        done = len(self.rendered)
        elapsed = time.perf_counter() - self.start
        if self.first_frame_seconds is None:
            self.first_frame_seconds = elapsed
        self.bar.update(1)
        self.bar.set_postfix(frame=output.job.frame_id, sec=f"{output.seconds:.2f}")
        log.info("frame %s done in %.2fs (%d/%d, ETA %.0fs)", output.job.frame_id, output.seconds, done,
                 plan.total, elapsed / done * max(0, plan.total - done))
        if self.progress is not None:
            self.progress.frame_done(plan.spec.id, output.seconds)
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
        if self.progress is not None:
            self.progress.story_done(self.plan.spec.id)


Executor = Callable[[JobPlan, JobContext], dict]


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
    the default dtype, which is part of every frame's identity. The plan's ``spec`` has every
    sampling setting resolved (CLI > story > model); its ``settings`` and ``config`` are what every
    frame's ``config`` column, fingerprint and anchor-bundle check record.
    """
    if options.method not in METHODS:
        raise StorySyncUserError(f"--method {options.method!r}: choose one of {', '.join(METHODS)}")
    if options.workers < 0:
        raise StorySyncUserError(f"--workers {options.workers}: must be >= 0")
    if options.replace_config and options.only:
        raise StorySyncUserError(
            "--replace-config renders the whole story again with the new settings; it cannot be combined "
            "with --only, which would leave the other frames with the old ones"
        )
    spec = load_story(story) if isinstance(story, str) else story
    # The command line wins over the story; what both leave out comes from the model (below).
    spec = spec.with_overrides(steps=options.steps, height=options.height, width=options.width, seed=options.seed)
    if options.only:
        for frame_id in options.only:
            spec.frame_by_id(frame_id)  # a one-line error for an unknown id
    config = job_config(spec, options)

    info = _model_info(options, pipe)
    # The layers left to the model family (None) are named now, so the config column, the
    # fingerprints and the bundles hold the names that were used.
    config = config.with_layers(info.share_layers, info.mask_layers)
    if spec.defaults.negative_prompt is not None and not info.negative_prompt:
        raise StorySyncUserError(
            f"{spec.source}: defaults.negative_prompt: --model {options.model} takes no negative prompt "
            f"({info.family} pipelines); leave it out"
        )
    size = (_or(spec.defaults.height, info.default_height), _or(spec.defaults.width, info.default_width))
    # Checked before the model's values are filled in, so an error names where a bad size came from.
    token_positions = validate_for_model(spec, info.tokenizer, info.size_factor, size=size)
    spec = with_model_defaults(spec, info)

    storysync = options.method == "storysync"
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
    return plan_work(plan, sink)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _model_info(options: RenderOptions, pipe: object | None) -> ModelInfo:
    """What the job needs of the model (tokenizer, size factor, sampling defaults): from the loaded
    pipeline when one is given, else from the model's folder without loading weights."""
    try:
        if pipe is not None:
            return model_info_from_pipeline(pipe)
        return _folder_model_info(options.model, model_revision(options.model))
    except (ValueError, TypeError) as exc:  # UnknownModelError, unsupported pipeline
        raise StorySyncUserError(f"--model: {exc}") from None


@functools.lru_cache(maxsize=8)
def _folder_model_info(model: str, revision: str | None) -> ModelInfo:
    # Building the tokenizer takes about half a second: a job of many stories plans each against
    # the same model, so it is read once per (model, revision); an edited folder has another
    # revision (models.revision hashes its configs and weight files) and is read again.
    return load_model_info(model)


def with_model_defaults(spec: StorySpec, info: ModelInfo) -> StorySpec:
    """``spec`` with the sampling settings it leaves out (``None``) set to the model's own: the
    size, steps and guidance scale its stock pipeline would use. The negative prompt is left as it
    is: ``None`` is the stock "no negative prompt", not an empty string."""
    d = spec.defaults
    filled = {
        "steps": _or(d.steps, info.default_steps),
        "height": _or(d.height, info.default_height),
        "width": _or(d.width, info.default_width),
        "guidance_scale": float(_or(d.guidance_scale, info.default_guidance_scale)),
    }
    if all(getattr(d, name) == value for name, value in filled.items()):
        return spec
    return spec.model_copy(update={"defaults": d.model_copy(update=filled)})


def job_config(spec: StorySpec, options: RenderOptions) -> StorySyncConfig:
    """The StorySync config of the job (see :class:`RenderOptions`); every problem is a one-line
    ``StorySyncUserError`` naming where the value came from (``--set KEY``, ``--ablation``)."""
    if options.method != "storysync":
        given = [flag for flag, value in (("--ablation", options.ablation is not None),
                                          ("--set", bool(options.overrides))) if value]
        if given:
            raise StorySyncUserError(
                f"{' and '.join(given)}: StorySync options, but --method {options.method} renders with every "
                "StorySync mechanism off; drop them or use --method storysync"
            )
        return StorySyncConfig.vanilla()
    if options.ablation is not None and options.ablation not in ABLATIONS:
        raise StorySyncUserError(f"--ablation: must be one of {', '.join(ABLATIONS)}, got {options.ablation!r}")
    overrides = dict(options.overrides or {})
    base = options.config.to_dict() if options.config is not None else spec.storysync
    try:
        return resolve_config(base, options.ablation, overrides)
    except ConfigError as exc:
        # The story's section was checked when it was loaded and a StorySyncConfig is valid by
        # construction, so a problem here is one of the command line's values.
        if exc.key == "ablation":
            where = "--ablation"
        elif exc.key in overrides:
            where = f"--set {exc.key}"
        else:
            where = f"{spec.source}: storysync.{exc.key}"
        raise StorySyncUserError(f"{where}: {exc.problem}") from None


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
        renderer = StoryRenderer(adapter_for(pipe), plan.config, plan.settings)
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
        raise StorySyncUserError(f"--out {options.out}: cannot write there ({one_line(exc)})") from None


def _out_exists(options: RenderOptions) -> bool | None:
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    try:
        return sink.fs.exists(sink._fs_root)
    except Exception:
        return None


class StoryJob:
    """One story of a job, from the lease to the manifest: ``start()`` leases the story and plans
    it against the dataset as it is now; an executor renders ``plan`` through ``ctx``; ``finish``
    commits the staged frames (drops superseded rows and frames the story no longer has), writes
    the storyboard and the manifest entry, and lets go of the lease; ``abort`` lets go after a
    failure. ``run_job`` runs one; ``RayExecutor.render`` runs many on one pool of workers."""

    def __init__(self, plan: JobPlan, on_frame: Callable[[FrameOutput], None] | None = None,
                 progress: JobProgress | None = None, manifest: ManifestWriter | None = None) -> None:
        self.plan = plan
        self.manifest = manifest  # shared by the stories of one job; None: roll up at once
        self.on_frame = on_frame
        self.progress = progress
        self.ctx: JobContext | None = None
        self._lease: Lease | None = None
        self._sink: ParquetFrameSink | None = None
        self._start = 0.0
        self._existed: bool | None = None

    def start(self) -> tuple[JobPlan, JobContext] | None:
        """Lease the story and re-plan it; return (plan, ctx), or None when nothing renders."""
        options = self.plan.options
        self._start = time.perf_counter()
        self._existed = _out_exists(options)
        self._lease = _lease_story(self.plan)
        try:
            self._sink = ParquetFrameSink(options.out, storage_options=options.storage_options)
            self.plan = plan_work(self.plan, self._sink)  # what changed between planning and the lease
            self.ctx = JobContext(self.plan, self._sink, self.on_frame, progress=self.progress)
        except BaseException:
            self.abort()
            raise
        plan = self.plan
        return (plan, self.ctx) if (plan.anchor_jobs or plan.frame_jobs) else None

    def finish(self, stats: dict) -> JobResult:
        """Commit and write the story's outputs (see the class docstring); return its result."""
        plan, ctx, sink = self.plan, self.ctx, self._sink
        assert ctx is not None and sink is not None
        try:
            ctx.close()
            if plan.save_bundle and plan.bundle is not None and not plan.anchor_jobs:
                ctx.save_bundle(plan.bundle)  # an imported bundle, saved next to the dataset as asked
            # Make the staged frames visible, drop superseded rows and the frames the story no longer has.
            removed = sink.commit_story(plan.spec.id, current=plan.fingerprints, remove=set(plan.remove))
            stats = dict(stats or {})
            stats["first_frame_seconds"] = ctx.first_frame_seconds
            changed = bool(ctx.rendered or removed or plan.leftovers or sink.damaged)
            storyboard, manifest = write_story_outputs(sink, plan, stats, changed=changed, removed=removed,
                                                       manifest=self.manifest)
        except BaseException:
            self.abort()
            raise
        self._release()
        return JobResult(
            out=plan.options.out, story_id=plan.spec.id, rendered=ctx.rendered, skipped=plan.skipped,
            storyboard=storyboard, manifest=manifest, seconds=time.perf_counter() - self._start,
            anchor_bundle=ctx.bundle_url, stats=stats, replaced=[i for i in plan.replace if i in ctx.rendered],
            removed=removed, stale=plan.stale, damaged=list(sink.damaged), notes=plan.notes,
        )

    def abort(self) -> None:
        """Let go of the story after a failure: the frames written so far are committed (best
        effort: a rerun commits them otherwise), so readers see them."""
        if self.ctx is not None:
            self.ctx.close()
        if self._sink is not None and self._lease is not None:
            try:
                self._sink.commit_story(self.plan.spec.id, current=self.plan.fingerprints)
            except Exception as exc:  # the job's own error matters more
                log.warning("could not commit the frames of %s written so far: %s", self.plan.spec.id, one_line(exc))
        self._release()
        if self._existed is False:
            _remove_if_empty(self.plan.options)

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None


def run_job(plan: JobPlan, executor: Executor, on_frame: Callable[[FrameOutput], None] | None = None) -> JobResult:
    """Run a planned story with ``executor``: lease the story, re-plan against the dataset as it
    is now, render, commit, then write the storyboard and the manifest (``StoryJob``)."""
    return run_story(StoryJob(plan, on_frame), executor)


def run_story(job: StoryJob, executor: Executor) -> JobResult:
    """Open ``job``, render it with ``executor`` (in this process, or one story on a Ray pool),
    finish it."""
    opened = job.start()
    stats: dict = {}
    if opened is not None or job.plan.save_bundle:
        try:
            stats = executor(job.plan, job.ctx)
        except BaseException:
            job.abort()
            raise
    return job.finish(stats)


def _remove_if_empty(options: RenderOptions) -> None:
    """A job that failed before writing anything leaves no empty output folder behind (local)."""
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    root = sink._fs_root
    if sink.url(root) != root:
        return
    data = os.path.join(root, "data")
    with contextlib.suppress(OSError):
        for entry in os.scandir(data):
            if entry.is_dir():
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)
    for folder in (os.path.join(root, "_locks"), data, root):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
