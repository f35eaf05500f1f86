"""Running a planned story: lease it, render it with an executor, commit and write its outputs.

``StoryJob`` is one story from the lease to the manifest (``start``, ``finish``, ``abort``);
``run_job``/``run_story`` run one with an executor: :func:`local_executor` renders in this process,
``storysync_dist.distributed.RayExecutor`` on a pool of Ray workers (which also runs many
``StoryJob``s at once). Either way the driver alone writes: one staged file per frame as frames
arrive (``JobContext.emit``), committed when the story finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import torch

from ..core.anchors import AnchorBundle
from ..core.residency import PlacedBundle
from ..errors import StorySyncUserError, one_line
from ..io.lease import Lease, LeaseHeldError
from ..io.sink import FrameRecord, ParquetFrameSink, hand_back_memory, write_bytes
from ..models.customize import apply_model_setup
from ..models.presets import load_pipeline
from ..models.registry import adapter_for
from .devices import device_and_dtype
from .job import JobResult, RenderOptions
from .outputs import ManifestWriter, write_story_outputs
from .plan import JobPlan, bundle_relpath, plan_work
from .progress import JobProgress
from .renderer import FrameOutput, StoryRenderer, encode_frame, frame_batches

__all__ = ["Executor", "JobContext", "StoryJob", "local_executor", "run_job", "run_story"]

log = logging.getLogger("storysync")


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
        # The job's JobProgress (render_story and render_stories give one for all their stories); a
        # story run alone (run_job) gets its own, shown the same way: a bar on a terminal, plain
        # lines every --log-every seconds elsewhere (engine.progress).
        self._own_progress = progress is None
        if progress is None:
            progress = JobProgress(plan.options.out, show=plan.options.progress, log_every=plan.options.log_every)
        self.progress = progress
        progress.open_story(plan.spec.id, plan.total)

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
        log.info("frame %s done in %.2fs (%d/%d, ETA %.0fs)", output.job.frame_id, output.seconds, done,
                 plan.total, elapsed / done * max(0, plan.total - done))
        self.progress.frame_done(plan.spec.id, output.seconds)
        if self._on_frame is not None:
            self._on_frame(output)

    def step(self, label: str, i: int) -> None:
        """Denoising step ``i`` of ``label`` (the anchors, a frame or a batch) is done. Progress counts
        frames, so no bar or line shows it (it is logged at DEBUG level)."""
        total = self.plan.settings.steps * self.plan.config.render_passes  # ConsiStory renders twice
        log.debug("%s: %s step %d/%d", self.plan.spec.id, label, i + 1, total)

    def save_bundle(self, bundle: AnchorBundle) -> None:
        """Save the anchor bundle next to the dataset when the job asked for it."""
        options = self.plan.options
        if self.plan.save_bundle:
            self.bundle_url = write_bytes(options.out, bundle_relpath(self.plan.spec.id), bundle.to_bytes(),
                                          storage_options=options.storage_options)

    def close(self) -> None:
        self.progress.story_done(self.plan.spec.id)
        if self._own_progress:
            self.progress.close()


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


def local_executor(pipe: object | None = None) -> Executor:
    """Render in this process with one pipeline (loaded here unless one is given)."""

    def execute(plan: JobPlan, ctx: JobContext) -> dict:
        options = plan.options
        nonlocal pipe
        if pipe is None:
            device, dtype = device_and_dtype(options.device, options.dtype, options.model)
            pipe = load_pipeline(options.model, device=device, dtype=dtype, offload=options.offload)
        # The story's --scheduler and --lora (one pipeline serves stories with different ones).
        apply_model_setup(pipe, plan.settings.scheduler, plan.settings.loras, plan.settings.freeu)
        renderer = StoryRenderer(adapter_for(pipe), plan.config, plan.settings)
        device = str(renderer.adapter.device)
        log.info("rendering in this process on %s (%s)", device, plan.settings.dtype)
        stats: dict = {"workers": 0, "devices": [{
            "role": "local", "index": 0, "host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "gpu_ids": [], "threads": torch.get_num_threads()}]}
        bundle = plan.bundle
        if plan.anchor_jobs:
            anchor_frames, bundle = renderer.render_anchors(plan.anchor_jobs, lambda i: ctx.step("anchors", i))
            for frame in anchor_frames:
                if frame.job.frame_id in plan.anchor_writes:
                    ctx.emit(encode_frame(frame))
        if plan.save_bundle and bundle is not None:
            ctx.save_bundle(bundle)
        # One placement per story, so with --bundle-on device the steps go to the device once.
        placed = PlacedBundle(bundle, renderer.adapter.device, options.bundle_on) if bundle is not None else None
        try:
            for batch in frame_batches(plan.frame_jobs, plan.frame_batch):
                label = batch[0].frame_id if len(batch) == 1 else f"{batch[0].frame_id}+{len(batch) - 1}"
                for frame in renderer.render_frames(batch, placed, lambda i, label=label: ctx.step(label, i)):
                    ctx.emit(encode_frame(frame))
        finally:
            if placed is not None:
                placed.close()  # the story's device copies and staging buffers go
        stats["anchor_bytes"] = bundle.nbytes() if bundle is not None else 0
        stats["frame_batch"] = plan.frame_batch
        if placed is not None and placed.placement is not None:
            stats["bundle_on"] = placed.placement
            stats["peak_resident_steps"] = placed.peak_resident_steps
        return stats

    return execute


def _story_lease(plan: JobPlan) -> Lease:
    options, spec = plan.options, plan.spec
    return Lease(options.out, f"story-{spec.id}", storage_options=options.storage_options,
                 purpose=f"job rendering story {spec.id!r}")


def _acquire(lease: Lease, plan: JobPlan) -> None:
    options, spec = plan.options, plan.spec
    try:
        lease.acquire()
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
        self._aborted = False

    def start(self) -> tuple[JobPlan, JobContext] | None:
        """Lease the story and re-plan it; return (plan, ctx), or None when nothing renders."""
        options = self.plan.options
        self._start = time.perf_counter()
        self._existed = _out_exists(options)
        # Kept before it is taken, so an interrupt that lands while it is taken still lets it go (abort).
        self._lease = _story_lease(self.plan)
        try:
            _acquire(self._lease, self.plan)
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
            hand_back_memory()  # the storyboard's decoded frames: a driver of many stories stays flat
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
        effort: a rerun commits them otherwise), so readers see them, and the manifest entry says
        what is stored. Once is enough: a second call does nothing."""
        if self._aborted:
            return
        self._aborted = True
        if self.ctx is not None:
            self.ctx.close()
        if self._sink is not None and self._lease is not None:
            try:
                self._sink.commit_story(self.plan.spec.id, current=self.plan.fingerprints)
                if self.ctx is not None and self.ctx.rendered:
                    # The manifest entry says what is stored now: "complete": false, which frames are
                    # done. (A job that wrote nothing leaves the manifest, and a new --out, as they were.)
                    write_story_outputs(self._sink, self.plan, {}, changed=True, removed=[], manifest=self.manifest)
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
    stats: dict = {}
    try:
        opened = job.start()
        if opened is not None or job.plan.save_bundle:
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
