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

The free memory compared against is ``torch.cuda.mem_get_info`` on a GPU and ``MemAvailable`` of
``/proc/meminfo`` on a CPU, capped by the environment variable ``STORYSYNC_MEMORY_LIMIT`` (bytes,
or with a K/M/G/T suffix, powers of 1024) when it is set: for a user who shares the machine, and
for tests. With Ray workers the driver estimates and the free memory comes from where the workers
run (:func:`free_memory_on_workers`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import re
from dataclasses import dataclass, replace
from typing import Any

from ..core.harmonize import SCORE_CHUNK_ELEMENTS
from ..core.residency import AUTO_DEVICE_SHARE
from ..errors import StorySyncUserError
from ..models.offload import resident_roles
from ..sizes import parse_size

__all__ = [
    "MEMORY_LIMIT_ENV", "FreeMemory", "JobShape", "MemoryEstimate", "ModelShapes", "alternatives", "check_fits",
    "check_memory", "check_size", "decode_activation_bytes", "denoiser_activation_bytes", "estimate",
    "free_memory", "free_memory_on_workers", "layer_tokens", "memory_limit", "model_shapes",
    "model_shapes_from_pipeline",
]

log = logging.getLogger("storysync")

MEMORY_LIMIT_ENV = "STORYSYNC_MEMORY_LIMIT"
GIB = 1024**3
MIB = 1024**2

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
# Seconds a probe of the workers' free memory may wait for Ray to place it.
PROBE_TIMEOUT = 60.0

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


# ---- the model, from its configs -----------------------------------------------------------------
@dataclass(frozen=True)
class AttentionShape:
    """One attention layer of the denoiser: its name (a processor-name prefix, as ``share_layers``
    matches), its resolution ``level`` (0: the denoiser's input grid; a UNet's level i runs at
    1/2^i of it), ``channels`` (its input width), ``inner`` (heads x head dim) and ``heads``;
    ``self_attention`` when its keys come from its own tokens."""

    name: str
    level: int
    channels: int
    inner: int
    heads: int
    self_attention: bool


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs of a model, none of it weights.

    ``params``: parameters per component role; ``buffers``: bytes of their buffers. ``denoiser``
    and ``decoder`` name the roles of the UNet/transformer and of the VAE. ``input_width``: the
    channels of the denoiser's first layer (its widest map at the input grid), ``patch``: latent
    pixels per side of one input token (FLUX packs 2x2), ``attention``: every attention layer.
    ``decoder_channels``: the VAE's ``block_out_channels``, ``decoder_upcast``: the pipeline
    decodes in float32 when it is in float16 (SDXL's ``force_upcast`` with ``upcast_vae``);
    ``decoder_spatial_norm``: its norms are spatial (MoVQ).
    """

    params: dict[str, int]
    buffers: dict[str, int]
    denoiser: str
    decoder: str
    input_width: int
    patch: int
    attention: tuple[AttentionShape, ...]
    decoder_channels: tuple[int, ...]
    decoder_upcast: bool
    decoder_spatial_norm: bool = False

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (2 per decoder level after the first)."""
        return 2 ** (len(self.decoder_channels) - 1)


def model_shapes_from_pipeline(pipe: Any) -> ModelShapes:
    """:class:`ModelShapes` of a loaded pipeline (its own modules)."""
    import torch

    modules = {role: m for role, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    return _shapes(modules, upcasts=hasattr(pipe, "upcast_vae"))


@functools.lru_cache(maxsize=8)
def model_shapes(model: str, revision: str | None = None) -> ModelShapes:
    """:class:`ModelShapes` of a preset, a local folder or a cached hub id, from its
    ``model_index.json`` and each component's config, built on the meta device (no weights are
    read, nothing is allocated). ``revision`` only keys the cache (an edited folder is read again).
    ``ValueError`` for a folder whose components cannot be built that way."""
    import diffusers

    from ..models.info import meta_components, model_folder

    folder = pathlib.Path(model_folder(model))
    index = json.loads((folder / "model_index.json").read_text())
    modules = meta_components(str(folder), revision)
    return _shapes(modules, upcasts=hasattr(getattr(diffusers, str(index.get("_class_name")), None), "upcast_vae"))


def _shapes(modules: dict[str, Any], *, upcasts: bool) -> ModelShapes:
    """``upcasts``: the pipeline class decodes a half-precision VAE in float32 when its config says
    ``force_upcast`` (``upcast_vae``: SDXL's pipelines; SD 1.x, FLUX and Kandinsky 3 do not)."""
    decoder = next((r for r, m in modules.items() if hasattr(m, "decode") and hasattr(m.config, "block_out_channels")),
                   None)
    denoiser = next((r for r, m in modules.items() if r != decoder and hasattr(m, "attn_processors")), None)
    if decoder is None or denoiser is None:
        raise ValueError(f"no denoiser and VAE among the components {sorted(modules)}")
    den, vae = modules[denoiser], modules[decoder]
    latent_channels = int(vae.config.latent_channels)
    in_channels = int(den.config.in_channels)
    return ModelShapes(
        params={r: sum(p.numel() for p in m.parameters()) for r, m in modules.items()},
        buffers={r: sum(b.numel() * b.element_size() for b in m.buffers()) for r, m in modules.items()},
        denoiser=denoiser, decoder=decoder,
        input_width=_input_width(den, in_channels),
        patch=max(1, math.isqrt(max(1, in_channels // latent_channels))),
        attention=_attention_layers(den),
        decoder_channels=tuple(int(c) for c in vae.config.block_out_channels),
        decoder_upcast=upcasts and bool(getattr(vae.config, "force_upcast", False)),
        decoder_spatial_norm=getattr(vae.config, "norm_type", None) == "spatial",
    )


def _input_width(denoiser: Any, in_channels: int) -> int:
    """Channels of the denoiser's first layer that reads the latent (a UNet's ``conv_in``, a
    transformer's patch embedding)."""
    import torch

    for module in denoiser.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == in_channels:
            return int(module.out_channels)
        if isinstance(module, torch.nn.Linear) and module.in_features == in_channels:
            return int(module.out_features)
    raise ValueError(f"{type(denoiser).__name__}: no layer reads its {in_channels} input channels")


def _attention_layers(denoiser: Any) -> tuple[AttentionShape, ...]:
    """Every attention layer of the denoiser with its resolution level.

    The levels follow diffusers' UNet layout (``UNet2DConditionModel``, ``Kandinsky3UNet``):
    ``down_blocks.i`` runs at level i, ``up_blocks.j`` at level L-1-j and ``mid_block`` at L-1 (L
    levels); a denoiser without ``down_blocks`` (a transformer) runs every layer at level 0. A layer
    is a self-attention when diffusers marks it so (``is_cross_attention`` False); in a model that
    marks every layer cross (Kandinsky 3 builds its self-attentions with its own width as the
    context), when its keys are as wide as its queries, which also takes a cross-attention whose
    text is exactly as wide (only in the tiny preset: 32 channels).
    """
    levels = len(getattr(denoiser, "down_blocks", ())) or 1
    modules = {}
    for name in denoiser.attn_processors:
        path = name.removesuffix(".processor")
        attn = denoiser.get_submodule(path)
        if getattr(attn, "to_q", None) is not None and getattr(attn, "to_k", None) is not None:
            modules[path] = attn
    flags = any(not getattr(a, "is_cross_attention", False) for a in modules.values())
    return tuple(
        AttentionShape(
            name=path, level=_level(path, levels), channels=int(a.to_q.in_features), inner=int(a.to_q.out_features),
            heads=int(getattr(a, "heads", 1)),
            self_attention=(not getattr(a, "is_cross_attention", False)) if flags
            else int(a.to_k.in_features) == int(a.to_q.in_features),
        )
        for path, a in modules.items()
    )


def _level(path: str, levels: int) -> int:
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", path)
    if match:
        i = int(match.group(2))
        return min(i, levels - 1) if match.group(1) == "down_blocks" else max(0, levels - 1 - i)
    return levels - 1 if path.startswith("mid_block.") else 0


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
        return (f"~{_gib(self.total)} (weights {_gib(self.weights)}{' already loaded' if self.loaded else ''}, "
                f"activations {_gib(self.activations)}, anchor bundle {_gib(self.bundle)}, "
                f"runtime {_gib(self.runtime)})")


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


def _gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def _device_type(device: str) -> str:
    return device.split(":")[0]


def estimate(shapes: ModelShapes, job: JobShape) -> MemoryEstimate:
    """The peak memory of one worker rendering ``job`` (see the module docstring for the phases)."""
    kind = _device_type(job.device)
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
    if job.offload != "model" and _device_type(job.device) == "cuda":
        variants.append(("--offload model", replace(job, offload="model")))
    if job.frame_batch > 1:
        variants.append((f"--frame-batch 1 (now {job.frame_batch})", replace(job, frame_batch=1)))
    base = estimate(shapes, job).needed
    return [(flag, e) for flag, e in ((f, estimate(shapes, j)) for f, j in variants) if e.needed < base]


# ---- free memory ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeMemory:
    """Free bytes of the device a worker renders on, where that was read, and whether
    ``STORYSYNC_MEMORY_LIMIT`` capped it."""

    bytes: int
    where: str
    capped: bool = False

    def describe(self) -> str:
        return f"{_gib(self.bytes)} free on {self.where}" + (f" ({MEMORY_LIMIT_ENV})" if self.capped else "")


def memory_limit() -> int | None:
    """``STORYSYNC_MEMORY_LIMIT`` in bytes (``8589934592``, ``8G``, ``512MiB``), or None when unset;
    a value that is not a size is a one-line user error."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError:
        raise StorySyncUserError(f"{MEMORY_LIMIT_ENV}={text!r}: not a size in bytes (e.g. 8589934592, 8G, 512MiB)") from None


def _cap(free: int | None, where: str) -> FreeMemory | None:
    limit = memory_limit()
    if limit is not None and (free is None or limit < free):
        return FreeMemory(limit, where, capped=True)
    return FreeMemory(free, where) if free is not None else None


def host_available() -> int | None:
    """Bytes of RAM available to a new allocation: ``MemAvailable`` of /proc/meminfo (Linux), else
    free pages (``os.sysconf``), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def device_free(device: str) -> int | None:
    """Free bytes of ``device`` as this process sees it (None where it cannot tell: MPS, ...)."""
    kind = _device_type(device)
    if kind == "cpu":
        return host_available()
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def free_memory(device: str) -> FreeMemory | None:
    """The free memory of ``device`` in this process, capped by ``STORYSYNC_MEMORY_LIMIT``."""
    return _cap(device_free(device), device)


def _probe(device: str) -> tuple[str, int | None]:
    import socket

    return socket.gethostname(), device_free(device)


def free_memory_on_workers(ray_options: dict[str, Any], device: str, workers: int,
                           timeout: float = PROBE_TIMEOUT) -> FreeMemory | None:
    """The free memory one worker will see, for a Ray pool that has not started yet.

    On a GPU: a Ray task asking for what one worker asks (``ray_options``) reads
    ``torch.cuda.mem_get_info`` of the GPU Ray gives it and exits (``max_calls=1``, so its CUDA
    context is gone before the workers start). On a CPU: when every live node of the cluster is
    this machine, its ``MemAvailable`` (capped by ``STORYSYNC_MEMORY_LIMIT``) shared by the
    ``workers``, each of which loads its own pipeline; on a cluster of other machines, the same
    probe as on a GPU. None when the probe is not placed within ``timeout`` seconds (the check
    is then skipped, with a log line).
    """
    import ray

    kind = _device_type(device)
    if kind == "cpu" and _all_nodes_here():
        machine = _cap(host_available(), "this machine")
        if machine is None or workers <= 1:
            return machine
        return FreeMemory(machine.bytes // workers, f"this machine (1/{workers} of it per worker)", machine.capped)
    task = ray.remote(max_calls=1, max_retries=0)(_probe).options(**ray_options)
    ref = task.remote(device)
    ready, _ = ray.wait([ref], timeout=timeout)
    if not ready:
        ray.cancel(ref, force=True)
        log.warning("memory check skipped: a probe of the workers' free memory was not placed within %.0f s", timeout)
        return None
    host, free = ray.get(ref)
    return _cap(free, f"{device} on {host}")


def _all_nodes_here() -> bool:
    import ray

    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") == here for n in nodes)


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
    fixes = [f"{flag} (~{_gib(e.needed)})" for flag, e in options]
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
    workers' free memory is read by :func:`free_memory_on_workers` while its pool has not started
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
    advice = ", ".join([*(f"{flag} (~{_gib(e.needed)})" for flag, e in fixes), "a smaller --height/--width"])
    return line + f": does not fit, a render would be refused (try {advice}, or --force)"


def _free_for(options: Any, pipe: Any | None, executor: Any | None) -> tuple[FreeMemory | None, str]:
    """The free memory one worker sees, and the device it renders on."""
    if executor is None:
        device = local_device(options, pipe)
        return free_memory(device), device
    import ray

    device = str(executor.device)
    if executor.live_workers():
        return None, device
    if _device_type(device) != "cpu" or not _all_nodes_here():
        # The probe takes a worker's resources for a moment: only while the cluster has them free,
        # so a busy cluster never waits on it (the pool's own --start-timeout rules that wait).
        if not executor.resources.fits(ray.available_resources(), 1):
            log.info("memory check skipped: no free worker slot to read the free memory of %s", device)
            return None, device
    timeout = min(PROBE_TIMEOUT, float(options.start_timeout))
    return free_memory_on_workers(executor.resources.ray_options(), device, int(options.workers), timeout), device
