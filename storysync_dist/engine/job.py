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
prompt, scheduler and LoRAs, StorySync config; not the anchors), the job is refused before it writes anything, unless
``replace_config`` is set, which renders those frames again (and cannot be combined with ``only``).

Sampling settings the story leaves out come from the model, the way its stock pipeline picks them
(``models.info``); precedence: ``RenderOptions.steps/height/width`` (the CLI) > the story's
``defaults`` > the model. The StorySync config is resolved by ``core.config.resolve_config``: the
story's ``storysync:`` section (or ``RenderOptions.config`` when a Python caller gives one), then
``ablation``, then ``overrides`` (``--set``).

Running a planned story (its lease, the executor, the commit and the outputs) is ``engine.run``. A
job holds a lease on its story for as long as it writes (``io.lease``), so two jobs never write the
same story at once: the second is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.config import ABLATIONS, ConfigError, StorySyncConfig, resolve_config
from ..core.methods import METHODS, SamplingOverride, method_config, method_sampling, uses_anchors
from ..core.residency import PLACEMENTS
from ..errors import StorySyncUserError
from ..io.sink import ParquetFrameSink
from ..models.customize import ModelSetup, resolve_model_setup
from ..models.info import (
    ModelInfo,
    attention_processor_names,
    attention_processor_names_of,
    load_model_info,
    model_info_from_pipeline,
)
from ..models.loading import OFFLOADS
from ..models.registry import family_named
from ..models.revision import model_revision
from ..story import StorySpec, load_story, validate_for_model
from .bundles import check_bundle_for_job, read_bundle
from .devices import default_dtype, default_frame_batch, device_and_dtype
from .identity import AnchorIdentity, RenderIdentity, fingerprints_of
from .layers import check_layers
from .memory import check_size
from .options import RenderOptions
from .plan import JobPlan, frame_config_json, plan_jobs, plan_work
from .renderer import RenderSettings

__all__ = [
    "JobPlan", "JobResult", "RenderOptions", "device_and_dtype", "job_config", "model_info", "prepare_job",
    "with_model_defaults",
]

log = logging.getLogger("storysync")


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
    # For a dry run: the frames a real run would write that the dataset does not hold yet (the
    # ``replaced`` ones are rendered too).
    new: int = 0


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
        device, dtype = device_and_dtype(options.device, options.dtype, options.model)  # refuses a missing device
        return str(dtype).removeprefix("torch.")
    return options.dtype or default_dtype(device, options.model)


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
    check_efficiency_options(options)
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

    info = _with_text_len(_model_info(options, pipe), spec, options)
    # The layers left to the model family (None) are named now, so the config column, the
    # fingerprints and the bundles hold the names that were used.
    config = config.with_layers(info.share_layers, info.mask_layers).for_model(info.feature_injection)
    if uses_anchors(options.method):
        _check_layers(config, info, options, pipe)  # a typo in a layer name must not switch the method off
    if spec.defaults.negative_prompt is not None and not info.negative_prompt:
        raise StorySyncUserError(
            f"{spec.source}: defaults.negative_prompt: --model {options.model} takes no negative prompt "
            f"({info.family} pipelines); leave it out"
        )
    size = (_or(spec.defaults.height, info.default_height), _or(spec.defaults.width, info.default_width))
    # Checked before the model's values are filled in, so an error names where a bad size came from.
    check_size(size, info.max_size, cli=(options.height, options.width), story=(spec.defaults.height,
               spec.defaults.width), source=spec.source)  # before any weights load (engine.memory)
    token_positions = validate_for_model(spec, info.tokenizer, info.size_factor, size=size, max_tokens=info.text_len)
    spec = with_model_defaults(spec, info)
    # The method's own sampler (ConsiStory's DDIM + FreeU), on the families with FreeU only.
    sampling = method_sampling(options.method) if info.freeu else None
    setup = _model_setup(spec, options, pipe, sampling)  # --scheduler and --lora, checked before anything renders

    storysync = uses_anchors(options.method)
    d = spec.defaults
    settings = RenderSettings(
        model=options.model, steps=d.steps, height=d.height, width=d.width, guidance_scale=d.guidance_scale,
        dtype=_dtype_name(options, pipe, device), model_revision=model_revision(options.model),
        negative_prompt=d.negative_prompt, scheduler=setup.scheduler,
        loras=tuple(lora.as_settings() for lora in setup.loras),
        max_sequence_length=info.text_len if info.max_text_len is not None else None,
        freeu=sampling.freeu if sampling is not None else None,
    )
    # anchor_dtype left to the model (None) follows the dtype the frames render in, before the
    # config reaches the fingerprints, the config column and the bundle checks.
    config = config.with_anchor_dtype(settings.dtype)
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
        anchors=anchors, scheduler=setup.scheduler, loras=tuple((lora.sha256, lora.scale) for lora in setup.loras),
        max_sequence_length=settings.max_sequence_length, freeu=settings.freeu,
    )
    fingerprint = fingerprints_of(identity)  # the render part serialized once, not per frame
    fingerprints = {
        job.frame_id: fingerprint(frame_id=job.frame_id, prompt=job.prompt, seed=job.seed,
                                  token_positions=job.token_positions, is_anchor=job.frame_id in anchor_ids)
        for job in jobs.values()
    }
    plan = JobPlan(
        spec=spec, options=options, config=config, settings=settings,
        config_json=frame_config_json(options, settings, config, anchor_ids), identity=identity,
        fingerprints=fingerprints, jobs=jobs, anchor_ids=anchor_ids, anchor_jobs=[], anchor_writes=set(),
        frame_jobs=[], bundle=bundle, skipped=[],
        frame_batch=options.frame_batch or default_frame_batch(_device_kind(options, pipe, device)),
    )
    sink = ParquetFrameSink(options.out, storage_options=options.storage_options, read_only=True)
    return plan_work(plan, sink)


def check_efficiency_options(options: RenderOptions) -> None:
    """``--frame-batch``, ``--bundle-on`` and ``--offload``: one-line errors naming the option."""
    if options.frame_batch is not None and (isinstance(options.frame_batch, bool)
                                            or not isinstance(options.frame_batch, int) or options.frame_batch < 1):
        raise StorySyncUserError(f"--frame-batch {options.frame_batch!r}: must be an integer >= 1")
    if options.bundle_on not in PLACEMENTS:
        raise StorySyncUserError(f"--bundle-on {options.bundle_on!r}: choose one of {', '.join(PLACEMENTS)}")
    if options.offload not in OFFLOADS:
        raise StorySyncUserError(f"--offload {options.offload!r}: choose one of {', '.join(OFFLOADS)}")
    check_ray_start_options(options)


# Ray's smallest object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES in Ray 2.60).
MIN_OBJECT_STORE = 75 * 1024 * 1024


def check_ray_start_options(options: RenderOptions) -> None:
    """``--object-store-memory`` and ``--spill-dir``: one-line errors naming the option. They size
    the Ray this job starts, so they need ``--workers`` and no cluster to join."""
    given = [name for name, value in (("--object-store-memory", options.object_store_memory),
                                      ("--spill-dir", options.spill_dir)) if value is not None]
    if not given:
        return
    if options.workers == 0:
        raise StorySyncUserError(f"{given[0]}: only with --workers N (without it no Ray starts)")
    joined = options.address or os.environ.get("RAY_ADDRESS")
    if joined:
        raise StorySyncUserError(
            f"{given[0]}: this job joins the Ray cluster at {joined}, which has its own; set it with "
            "`ray start --object-store-memory ... --object-spilling-directory ...` on its nodes, or drop --address"
        )
    size = options.object_store_memory
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_OBJECT_STORE):
        raise StorySyncUserError(f"--object-store-memory {size!r}: must be at least {MIN_OBJECT_STORE} bytes (75 MiB)")
    spill = options.spill_dir
    if spill is not None and ("://" in spill or (os.path.exists(spill) and not os.path.isdir(spill))):
        raise StorySyncUserError(f"--spill-dir {spill}: must be a local folder")


def _device_kind(options: RenderOptions, pipe: object | None, device: str | None) -> str:
    if pipe is not None:
        return str(getattr(pipe, "_execution_device", None) or pipe.device)
    if device is not None:
        return device
    return options.device or ("cuda" if options.workers == 0 and torch.cuda.is_available() else "cpu")


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


def _with_text_len(info: ModelInfo, spec: StorySpec, options: RenderOptions) -> ModelInfo:
    """``info`` with the story's ``defaults.max_sequence_length`` as its text length, checked
    against what the family's pipeline accepts (``ModelInfo.max_text_len``)."""
    asked = spec.defaults.max_sequence_length
    if asked is None or asked == info.text_len:
        return info
    where = f"{spec.source}: defaults.max_sequence_length={asked}"
    if info.max_text_len is None:
        raise StorySyncUserError(f"{where}: --model {options.model} has a fixed text length ({info.text_len} "
                                 f"tokens, {info.family} pipelines); leave it out")
    if asked > info.max_text_len:
        raise StorySyncUserError(f"{where}: --model {options.model} takes at most {info.max_text_len} text tokens")
    return dataclasses.replace(info, text_len=asked)


def _check_layers(config: StorySyncConfig, info: ModelInfo, options: RenderOptions, pipe: object | None) -> None:
    """``share_layers``/``mask_layers`` against the denoiser's processor names (``engine.layers``)."""
    family = family_named(info.family)
    try:
        if pipe is not None:
            processors = attention_processor_names_of(pipe)
        else:
            processors = attention_processor_names(options.model, model_revision(options.model))
    except (ValueError, TypeError, OSError) as exc:
        raise StorySyncUserError(f"--model: {exc}") from None
    check_layers(config, processors, shares_at=family.shares_at, maps_at=family.maps_at, model=options.model)


def _model_setup(spec: StorySpec, options: RenderOptions, pipe: object | None,
                 sampling: SamplingOverride | None = None) -> ModelSetup:
    """The job's scheduler and LoRAs, checked against the model (``models.customize``): ``--scheduler``
    and ``--lora`` (``RenderOptions.scheduler``/``loras``), else the story's ``model:`` section; any
    ``--lora`` replaces the story's whole list. A scheduler neither names comes from the method's own
    sampler (``sampling``: ConsiStory's DDIM, built from the model's scheduler config), else the model's."""
    scheduler = None
    if options.scheduler is not None:
        scheduler = (options.scheduler, "--scheduler")
    elif spec.model.scheduler is not None:
        scheduler = (spec.model.scheduler, f"{spec.source}: model.scheduler")
    elif sampling is not None:
        scheduler = (sampling.scheduler, f"--method {options.method}")
    loras: list[tuple[str, Any, str]] = []
    for item in options.loras or []:
        if isinstance(item, str):
            loras.append((item, 1.0, "--lora"))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            loras.append((item[0], item[1], "--lora"))
        else:
            raise StorySyncUserError(f"--lora {item!r}: give a path or a (path, scale) pair")
    if not loras:
        loras = [(lora.path, lora.scale, f"{spec.source}: model.loras[{i}]") for i, lora in enumerate(spec.model.loras)]
    return resolve_model_setup(options.model, scheduler, loras, pipe=pipe, steps=spec.defaults.steps)


def model_info(options: RenderOptions, pipe: object | None = None) -> ModelInfo:
    """The :class:`ModelInfo` ``prepare_job`` plans against (cached per model and revision)."""
    return _model_info(options, pipe)


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
                f"{' and '.join(given)}: StorySync options, but --method {options.method} renders with "
                f"{'every StorySync mechanism off' if options.method == 'vanilla' else 'its own fixed settings'}; "
                "drop them or use --method storysync"
            )
        return method_config(options.method)
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
