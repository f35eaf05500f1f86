"""The options of a render job: ``storysync render``'s flags, ``api.render_story``'s argument.

Their own module, below ``engine.job`` and ``engine.plan`` (both read them), so neither imports
the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.config import StorySyncConfig

__all__ = ["RenderOptions"]


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
    # The Ray this job starts itself (workers >= 1, no cluster to join): its object store in bytes
    # (--object-store-memory; None: Ray's default) and the folder it spills objects to
    # (--spill-dir; None: Ray's). A cluster the job joins has its own (docs/distributed.md).
    object_store_memory: int | None = None
    spill_dir: str | None = None
    # Non-anchor frames of a story rendered in one denoiser batch (--frame-batch); None: the
    # device's default (engine.devices.default_frame_batch; docs/memory.md).
    frame_batch: int | None = None
    # Where a frame worker keeps the anchor bundle: device, host (pinned, two steps at a time on
    # the device) or auto (from free device memory); see core/residency.py and docs/memory.md.
    bundle_on: str = "auto"
    # none, or model: the denoiser stays on the device, the text encoders and VAE visit it (models.offload).
    offload: str = "none"
    # A diffusers scheduler class name (--scheduler), built from the pipeline's own scheduler
    # config; None keeps the model's. Part of every frame's fingerprint.
    scheduler: str | None = None
    # LoRA adapters as (path, scale) (--lora PATH[:SCALE]; a bare path has scale 1), loaded with
    # load_lora_weights from safetensors; part of every frame's fingerprint and of the anchor-bundle
    # check. The CLI's values beat the story's ``model:`` section (docs/configuration.md).
    loras: list[tuple[str, float]] = field(default_factory=list)
    # Skip the peak-memory check made before anything renders (--force; docs/memory.md).
    force: bool = False
    # Where stderr is not a terminal: one plain progress line every this many seconds (--log-every).
    log_every: float = 10.0
