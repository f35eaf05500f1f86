"""Peak memory per worker, estimated before a render starts, and the check against free memory.

A render that cannot fit should fail in one line before anything loads, not after minutes of
loading with an allocator's traceback (issue 19). The estimate is arithmetic on shapes; no
weights are read and nothing is allocated: the pipeline's components are built from their configs
on the ``meta`` device (``torch.device("meta")``, a few tenths of a second for SDXL or FLUX.1), which
gives every parameter count and every attention layer's channels and heads.

The peak of one worker (an in-process render, or one Ray FrameWorker) is the larger of two phases:

- **anchors** (when this worker renders the story's anchors): the weights, the activations of the
  anchor batch, and the anchor steps published so far (on a CPU; on a GPU each step goes to host
  memory as it is published);
- **frames**: the weights, the activations of a batch of ``--frame-batch`` frames, and the anchor
  bundle as ``--bundle-on`` places it (``core/residency.py``): every step (``device``), or two
  (``host``); on a CPU the frames read copies of the steps, so ``device`` holds the bundle twice.

plus a fixed runtime allowance (:data:`RUNTIME_BYTES`). Activations are the larger of the denoiser
batch and the VAE decode of the batch (they never overlap): :func:`denoiser_activation_bytes` and
:func:`decode_activation_bytes`. Attention probabilities are never materialized: every attention
here (diffusers' ``AttnProcessor2_0``, ours in ``models/attention.py`` and ``models/flux.py``) goes
through ``scaled_dot_product_attention``, which on a GPU runs the flash or memory-efficient kernel
(the memory-efficient one takes our padding bias) and on a CPU the fused flash kernel, so no
``heads x tokens^2`` matrix exists (measured on the CPU in docs/memory.md). What is materialized
and counted: the subject maps of the mask layers (``heads x tokens x text``, float32) and the RFH
similarity of a frame's subject patches to an anchor's (``patches x patches``, float32).

The constants were calibrated on the CPU presets (docs/memory.md, "Peak memory, checked before a
render starts", with the table of estimate against measured peak RSS: within 30 %); no GPU has
been lent yet, so the GPU numbers are the same arithmetic with a computed decoder constant,
unmeasured.

The model's shapes come from ``engine.model_shapes`` and the free memory compared against from
``engine.free_memory`` (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on a CPU, capped by
``STORYSYNC_MEMORY_LIMIT``). With Ray workers the driver estimates and the executor reads the free
memory where the workers run (``RayExecutor.worker_free_memory``, ``distributed.memory_probe``): the
engine imports no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..core.harmonize import SCORE_CHUNK_ELEMENTS
from ..core.residency import AUTO_DEVICE_SHARE
from ..errors import StorySyncUserError
from ..models.offload import resident_roles
from .free_memory import (
    GIB,
    MEMORY_LIMIT_ENV,
    MIB,
    FreeMemory,
    device_type,
    format_bytes,
    free_memory,
    host_available,
    memory_limit,
)
from .model_shapes import AttentionShape, ModelShapes, model_shapes, model_shapes_from_pipeline

__all__ = [
    "GIB", "MEMORY_LIMIT_ENV", "FreeMemory", "JobShape", "MemoryEstimate", "ModelShapes", "alternatives", "check_fits",
    "check_memory", "check_size", "decode_activation_bytes", "denoiser_activation_bytes", "estimate",
    "format_bytes", "free_memory", "host_available", "layer_tokens", "memory_limit", "model_shapes",
    "model_shapes_from_pipeline",
]

log = logging.getLogger("storysync")


# Share of an anchor layer's tokens that are subject tokens, for a bundle not rendered yet. The masks
# depend on the prompts: measured 34 % on random-sdxl at 256 px (docs/memory.md), 30 to 59 % on the
# tiny presets; StoryDiffusion's sampling keeps 50 %. The bound (every token) is twice this.
SUBJECT_COVERAGE = 0.5
# Feature maps alive at the denoiser's peak, in units of its widest map (tokens x channels of the
# widest of: the input level, every attention layer): the skip connections of a UNet, a resnet's or
# transformer block's in/out and intermediates, the feed-forward's 4-8x expansion at a lower level.
# Measured on the CPU from how the peak before the first decode grows with the size: 17 to 22 on
# tiny-sdxl, tiny-kandinsky3 and tiny-flux (docs/memory.md).
DENOISER_LIVE_MAPS = 18.0
# Feature maps alive at the VAE decoder's peak, in units of its widest full-resolution map
# (height x width x the channels entering the last level), per device type. A GPU: the first
# full-resolution resnet's input (kept for the shortcut), its norm and its activation, plus the
# allocator's slack (computed, not measured). A CPU: measured 5 to 6.5 on the presets'
# AutoencoderKL decoders (its convolutions also copy their input: conv_out alone adds 2 maps).
DECODER_LIVE_MAPS = {"cpu": 6.0, "cuda": 3.5}
# A decoder with spatial norms (Kandinsky 3's MoVQ, ``norm_type: spatial``) conditions each norm on
# the latent: two convolutions of it, upsampled to full resolution, C channels each (measured 7 to 8
# maps on tiny-kandinsky3's MoVQ against 5 to 6.5 on the AutoencoderKL decoders).
SPATIAL_NORM_MAPS = 2.0
# Memory a render needs besides the parts above: on a CPU, the libraries and code a render pulls
# in (measured, docs/memory.md); on a GPU, the allocator's workspaces (cuBLAS/cuDNN; not measured).
RUNTIME_BYTES = {"cpu": 200 * MIB, "cuda": 512 * MIB}

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


# ---- the arithmetic --------------------------------------------------------------------------------
def latent_grid(height: int, width: int, shapes: ModelShapes) -> tuple[int, int]:
    """(h, w) of the denoiser's input tokens: the latent (image / VAE factor), in patches."""
    f = shapes.vae_factor * shapes.patch
    return max(1, height // f), max(1, width // f)


def layer_tokens(grid: tuple[int, int], level: int) -> int:
    """Tokens of a layer at ``level``: the input grid halved (rounding up, as a stride-2 conv with
    padding 1 does) ``level`` times, per side."""
    h, w = grid
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def weight_bytes(shapes: ModelShapes, dtype_bytes: int, *, roles: tuple[str, ...] | None = None) -> int:
    """Parameters of ``roles`` (every component by default) at the job's dtype, plus their buffers."""
    chosen = roles if roles is not None else tuple(shapes.params)
    return sum(shapes.params[r] * dtype_bytes + shapes.buffers[r] for r in chosen)


def shared_layers(shapes: ModelShapes, prefixes: tuple[str, ...]) -> list[AttentionShape]:
    """The self-attention layers whose names start with one of ``prefixes`` (``share_layers``)."""
    return [a for a in shapes.attention if a.self_attention and any(a.name.startswith(p) for p in prefixes)]


def bundle_step_bytes(layers: list[AttentionShape], grid: tuple[int, int], *, anchors: int, branches: int,
                      anchor_dtype_bytes: int, coverage: float = SUBJECT_COVERAGE) -> int:
    """One anchor step (``core.anchors.AnchorStep``): per shared layer, the anchors' subject tokens
    (``coverage`` of the layer's N tokens each): an int64 index, and per shared guidance branch
    their input hidden states (C) and RFH features (C_inner) in the anchor dtype."""
    total = 0
    for layer in layers:
        tokens = anchors * coverage * layer_tokens(grid, layer.level)
        total += int(tokens * (8 + branches * (layer.channels + layer.inner) * anchor_dtype_bytes))
    return total


def denoiser_activation_bytes(shapes: ModelShapes, grid: tuple[int, int], *, rows: int, dtype_bytes: int,
                              text_len: int) -> int:
    """The denoiser's live feature maps for a batch of ``rows`` images: ``DENOISER_LIVE_MAPS`` maps
    of its widest (tokens x channels) layer per image, at the job's dtype. A transformer's layers
    (level 0) hold the text tokens too (joint attention)."""
    widest = grid[0] * grid[1] * shapes.input_width
    for a in shapes.attention:
        tokens = layer_tokens(grid, a.level) + (text_len if a.level == 0 and _is_transformer(shapes) else 0)
        widest = max(widest, tokens * max(a.channels, a.inner))
    return int(DENOISER_LIVE_MAPS * widest * rows * dtype_bytes)


def _is_transformer(shapes: ModelShapes) -> bool:
    return all(a.level == 0 for a in shapes.attention)


def storysync_extra_bytes(shapes: ModelShapes, grid: tuple[int, int], shared: list[AttentionShape], mask_prefixes:
                          tuple[str, ...], *, images: int, branches: int, anchors: int, dtype_bytes: int,
                          text_len: int, coverage: float = SUBJECT_COVERAGE, role: str = "frames") -> int:
    """What StorySync adds at its largest layer, for ``images`` consistent images:

    - shared attention: keys and values of the image's N tokens plus the shared ones, per shared
      guidance branch (``2 x (N + M) x C_inner``): for frames the anchors' M = anchors x coverage x
      N subject tokens; for the anchors (``role="anchors"``) every anchor's N tokens, which the
      log-mask of ``core.sharing.masked_shared_attention`` admits or not;
    - RFH, dense (``core.harmonize.harmonize_batch``): the float32 match scores of every patch
      against each reference set of Q patches (frames: coverage x N per anchor; anchors: N), at most
      ``SCORE_CHUNK_ELEMENTS`` at once, three copies live (cosine, masked, softmax); and the float32
      matched patches of every reference set plus three float32 copies of the features
      (``(anchors + 3) x N x C_inner`` per image and branch);
    - subject maps of the mask layers: ``heads x N x text`` float32 scores and probabilities for the
      conditional branch's images.
    """
    kv = rfh = 0
    for layer in shared:
        n = layer_tokens(grid, layer.level)
        q = n if role == "anchors" else coverage * n
        m = anchors * q
        kv = max(kv, int(2 * (n + m) * layer.inner * images * branches * dtype_bytes))
        scores = min(branches * images * anchors * n * q, SCORE_CHUNK_ELEMENTS) * 4 * 3
        matched = branches * images * n * (anchors + 3) * layer.inner * 4
        rfh = max(rfh, int(scores + matched))
    maps = 0
    for layer in shapes.attention:
        if any(layer.name.startswith(p) for p in mask_prefixes):
            maps = max(maps, 2 * layer.heads * layer_tokens(grid, layer.level) * text_len * 4 * images)
    return kv + rfh + maps


def decode_activation_bytes(shapes: ModelShapes, height: int, width: int, *, images: int, dtype_bytes: int,
                            device_type: str = "cuda") -> int:
    """The VAE decoder's live maps for ``images`` images decoded together: ``DECODER_LIVE_MAPS``
    maps of height x width x the channels entering its last level (the upsampler's output), in
    float32 when the VAE upcasts (its weights then also get a float32 copy)."""
    upcast = shapes.decoder_upcast and dtype_bytes == 2
    nbytes = 4 if upcast else dtype_bytes
    channels = shapes.decoder_channels[1] if len(shapes.decoder_channels) > 1 else shapes.decoder_channels[0]
    live = DECODER_LIVE_MAPS.get(device_type, DECODER_LIVE_MAPS["cuda"])
    live += SPATIAL_NORM_MAPS if shapes.decoder_spatial_norm else 0.0
    maps = int(live * height * width * channels * images * nbytes)
    return maps + (weight_bytes(shapes, 4, roles=(shapes.decoder,)) if upcast else 0)


# ---- the estimate of a planned job -----------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of one worker, in bytes, by part: ``weights`` (what the device holds of
    the pipeline), ``activations`` (the larger of the denoiser batch and the VAE decode), ``bundle``
    (anchor steps held), ``runtime`` (the fixed allowance). ``phase`` says which phase peaks
    (``anchors`` or ``frames``); ``loaded``: the weights are on the device already (a pipeline
    passed in), so they need no more room."""

    device: str
    weights: int
    activations: int
    bundle: int
    runtime: int
    phase: str
    loaded: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.bundle + self.runtime

    @property
    def needed(self) -> int:
        """What must still fit in the free memory."""
        return self.total - (self.weights if self.loaded else 0)

    def describe(self) -> str:
        return (f"~{format_bytes(self.total)} (weights {format_bytes(self.weights)}{' already loaded' if self.loaded else ''}, "
                f"activations {format_bytes(self.activations)}, anchor bundle {format_bytes(self.bundle)}, "
                f"runtime {format_bytes(self.runtime)})")


@dataclass(frozen=True)
class JobShape:
    """What the estimate reads of a planned job (``JobShape.of(plan, ...)``); the option variants
    of :func:`alternatives` are copies with one field changed."""

    height: int
    width: int
    dtype_bytes: int
    device: str
    frame_batch: int
    anchors_here: int  # anchor images this worker renders in one batch (0: none)
    frames_here: bool
    anchors: int  # anchors the frames share with
    guidance_branches: int
    vanilla: bool
    shares: bool
    shared_branches: int
    published_steps: int
    anchor_dtype_bytes: int
    bundle_exact: int | None  # bytes of a bundle read from --anchors
    bundle_on: str
    offload: str
    text_len: int
    share_layers: tuple[str, ...]
    mask_layers: tuple[str, ...]
    free: int | None  # what --bundle-on auto decides from
    loaded: bool

    @classmethod
    def of(cls, plan: Any, *, cfg_batch: bool, text_len: int, device: str, free: int | None = None,
           loaded: bool = False) -> JobShape:
        """The shape of ``plan`` (an ``engine.plan.JobPlan``) rendered on ``device``; ``cfg_batch``
        and ``text_len`` are the model's (``ModelInfo``)."""
        from ..core.methods import uses_anchors

        st, cfg, options = plan.settings, plan.config, plan.options
        guidance = 2 if cfg_batch and st.guidance_scale > 1.0 else 1
        shares = uses_anchors(options.method) and (cfg.share_attention or cfg.harmonize)
        return cls(
            height=st.height, width=st.width, dtype_bytes=_DTYPE_BYTES.get(st.dtype, 4), device=device,
            frame_batch=max(1, plan.frame_batch), anchors_here=len(plan.anchor_jobs),
            frames_here=bool(plan.frame_jobs), anchors=len(plan.anchor_ids), guidance_branches=guidance,
            vanilla=cfg.bli_steps(st.steps) > 0, shares=shares, shared_branches=guidance if cfg.share_uncond else 1,
            # ConsiStory's two passes publish twice the steps (its injection outputs are not counted).
            published_steps=cfg.render_passes * max(0, st.steps - cfg.first_shared_step()),
            anchor_dtype_bytes=_DTYPE_BYTES.get(cfg.anchor_dtype, 2),
            bundle_exact=plan.bundle.nbytes() if plan.bundle is not None else None,
            bundle_on=options.bundle_on, offload=options.offload, text_len=text_len,
            share_layers=tuple(cfg.share_layers or ()), mask_layers=tuple(cfg.mask_layers or ()),
            free=free, loaded=loaded,
        )


def estimate(shapes: ModelShapes, job: JobShape) -> MemoryEstimate:
    """The peak memory of one worker rendering ``job`` (see the module docstring for the phases)."""
    kind = device_type(job.device)
    grid = latent_grid(job.height, job.width, shapes)
    shared = shared_layers(shapes, job.share_layers) if job.shares else []
    step = bundle_step_bytes(shared, grid, anchors=job.anchors, branches=job.shared_branches,
                             anchor_dtype_bytes=job.anchor_dtype_bytes)
    whole = step * job.published_steps
    if job.bundle_exact is not None:
        whole = job.bundle_exact
        step = whole // max(1, job.published_steps)
    offloaded = job.offload == "model" and kind == "cuda"  # the denoiser stays, the others visit it
    resident = resident_roles(shapes.params, shapes.denoiser, shapes.decoder) if offloaded else None
    weights = weight_bytes(shapes, job.dtype_bytes, roles=resident)

    def activations(images: int, role: str = "frames") -> int:
        rows = images * job.guidance_branches * (2 if job.vanilla else 1)
        den = denoiser_activation_bytes(shapes, grid, rows=rows, dtype_bytes=job.dtype_bytes, text_len=job.text_len)
        if shared:
            den += storysync_extra_bytes(shapes, grid, shared, job.mask_layers, images=images,
                                         branches=job.shared_branches, anchors=job.anchors,
                                         dtype_bytes=job.dtype_bytes, text_len=job.text_len, role=role)
        # A frame batch decodes one image at a time (models.denoise.decode_each).
        dec = decode_activation_bytes(shapes, job.height, job.width, images=1, dtype_bytes=job.dtype_bytes,
                                      device_type=kind)
        return max(den, dec)

    phases: list[tuple[str, int, int]] = []  # (phase, activations, bundle)
    if job.anchors_here:
        # A CPU keeps the published steps in the same memory; a GPU moves each to the host at once.
        phases.append(("anchors", activations(job.anchors_here, "anchors"),
                       (whole if kind == "cpu" else step) if shared else 0))
    if job.frames_here:
        phases.append(("frames", activations(job.frame_batch), _frames_bundle(job, kind, step, whole)))
    phase, act, bundle = max(phases or [("frames", 0, 0)], key=lambda p: p[1] + p[2])
    return MemoryEstimate(device=job.device, weights=weights, activations=act, bundle=bundle,
                          runtime=RUNTIME_BYTES.get(kind, RUNTIME_BYTES["cuda"]), phase=phase, loaded=job.loaded)


def _frames_bundle(job: JobShape, kind: str, step: int, whole: int) -> int:
    """The anchor steps a frame worker holds (``core.residency``): the frames' copies (every step
    for ``device``, two for ``host``), plus, on a CPU, the host steps they are copied from."""
    if not job.shares:
        return 0
    placement = job.bundle_on
    if placement == "auto":
        placement = "device" if kind != "cuda" or job.free is None or whole <= AUTO_DEVICE_SHARE * job.free else "host"
    copies = whole if placement == "device" else min(whole, 2 * step)
    return copies + (whole if kind == "cpu" else 0)


def alternatives(shapes: ModelShapes, job: JobShape) -> list[tuple[str, MemoryEstimate]]:
    """The options that would lower this job's estimate, each with the estimate it would give."""
    variants = []
    if job.shares and job.bundle_on != "host":
        variants.append(("--bundle-on host", replace(job, bundle_on="host")))
    if job.offload != "model" and device_type(job.device) == "cuda":
        variants.append(("--offload model", replace(job, offload="model")))
    if job.frame_batch > 1:
        variants.append((f"--frame-batch 1 (now {job.frame_batch})", replace(job, frame_batch=1)))
    base = estimate(shapes, job).needed
    return [(flag, e) for flag, e in ((f, estimate(shapes, j)) for f, j in variants) if e.needed < base]


# ---- the checks -------------------------------------------------------------------------------------
def check_size(size: tuple[int, int], max_size: int, *, cli: tuple[int | None, int | None],
               story: tuple[int | None, int | None], source: str) -> None:
    """Refuse a height or width above the model's ``max_size`` before anything loads: one line
    naming where the value came from (``--height``, the story's ``defaults.height``, or the model's
    default) and the maximum."""
    for axis, name in enumerate(("height", "width")):
        value = size[axis]
        if value is None or value <= max_size:
            continue
        if cli[axis] is not None:
            where = f"--{name} {value}"
        elif story[axis] is not None:
            where = f"{source}: defaults.{name}={value}"
        else:
            where = f"the model's default {name} ({value})"
        raise StorySyncUserError(f"{where}: larger than {max_size} px, the most this model renders; "
                                 f"use a {name} of at most {max_size}")


def check_fits(estimate: MemoryEstimate, free: FreeMemory | None,
               options: list[tuple[str, MemoryEstimate]]) -> None:
    """Refuse a job whose estimate does not fit the free memory: one line with the estimate, the
    free memory, and the options that would lower it (each with its estimate)."""
    if free is None or estimate.needed <= free.bytes:
        return
    fixes = [f"{flag} (~{format_bytes(e.needed)})" for flag, e in options]
    raise StorySyncUserError(
        f"peak memory per worker is estimated at {estimate.describe()}, more than the {free.describe()}; "
        f"to fit, try {', '.join([*fixes, 'a smaller --height/--width'])}, or --force to render anyway "
        "(docs/memory.md)"
    )


def local_device(options: Any, pipe: Any | None) -> str:
    """The device an in-process render uses: the pipeline's, ``--device``, else cuda when there is one."""
    if pipe is not None:
        return str(getattr(pipe, "_execution_device", None) or pipe.device)
    if options.device:
        return str(options.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_memory(plans: list[Any], info: Any, *, pipe: Any | None = None, executor: Any | None = None) -> list[str]:
    """Estimate the peak memory per worker of each planned story, compare it with the free memory
    where the workers render, and return one note per plan for ``--dry-run``.

    Raises ``StorySyncUserError`` (one line) for the first story that does not fit, unless
    ``--force`` or ``--dry-run``. ``info`` is the model's ``ModelInfo``; ``pipe`` a pipeline the
    caller loaded (its weights are on the device already); ``executor`` a ``RayExecutor``, whose
    workers' free memory it reads (``worker_free_memory``) while its pool has not started
    (a running pool's devices already hold the weights: the comparison is skipped). Plans with
    nothing to render, and models whose components cannot be built from their configs, are not
    checked (the note says so).
    """
    if not plans:
        return []
    options = plans[0].options
    if options.force and not options.dry_run:
        return []
    busy = [p for p in plans if p.anchor_jobs or p.frame_jobs]
    if not busy:
        return ["peak memory per worker: nothing to render"] * len(plans)
    try:
        shapes = model_shapes_from_pipeline(pipe) if pipe is not None else model_shapes(options.model,
                                                                                        plans[0].settings.model_revision)
    except (ValueError, TypeError, KeyError, OSError, AttributeError, RuntimeError) as exc:
        log.info("memory check skipped: %s", exc)
        return [f"peak memory per worker: not estimated ({' '.join(str(exc).split())[:200]})"] * len(plans)
    free, where = _free_for(options, pipe, executor)
    notes = []
    # Stories of one job mostly have the same shape (10^4 subject sets of a suite): each distinct
    # shape is estimated once.
    known: dict[JobShape, tuple[MemoryEstimate, list[tuple[str, MemoryEstimate]], str]] = {}
    for plan in plans:
        if not (plan.anchor_jobs or plan.frame_jobs):
            notes.append("peak memory per worker: nothing to render")
            continue
        text_len = plan.settings.max_sequence_length or info.text_len  # a story's FLUX text length
        job = JobShape.of(plan, cfg_batch=bool(info.cfg_batch), text_len=int(text_len), device=where,
                          free=free.bytes if free is not None else None, loaded=pipe is not None)
        if job not in known:
            est, fixes = estimate(shapes, job), alternatives(shapes, job)
            known[job] = (est, fixes, _note(est, free, where, fixes))
        est, fixes, note = known[job]
        if not (options.force or options.dry_run):
            check_fits(est, free, fixes)
        notes.append(note)
    return notes


def _note(est: MemoryEstimate, free: FreeMemory | None, where: str, fixes: list[tuple[str, MemoryEstimate]]) -> str:
    """The dry run's line: the estimate, the free memory, and whether a render would be refused."""
    line = f"peak memory per worker: {est.describe()}; "
    if free is None:
        return line + f"the free memory of {where} is not known here"
    line += free.describe()
    if est.needed <= free.bytes:
        return line
    advice = ", ".join([*(f"{flag} (~{format_bytes(e.needed)})" for flag, e in fixes), "a smaller --height/--width"])
    return line + f": does not fit, a render would be refused (try {advice}, or --force)"


def _free_for(options: Any, pipe: Any | None, executor: Any | None) -> tuple[FreeMemory | None, str]:
    """The free memory one worker sees, and the device it renders on: this process's, or what the
    executor reads where its workers run (``RayExecutor.worker_free_memory``)."""
    if executor is None:
        device = local_device(options, pipe)
        return free_memory(device), device
    return executor.worker_free_memory(), str(executor.device)
