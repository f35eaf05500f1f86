"""The work of one job: the plan prepared from a story, and how it is decided against the dataset.

See ``engine/job.py`` for the rules (skip, replace, remove, stale, no mixing of render settings)
and ``docs/datasets.md``.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.anchors import AnchorBundle
from ..core.config import StorySyncConfig
from ..core.methods import uses_anchors
from ..errors import StorySyncUserError, one_line
from ..io.sink import ParquetFrameSink, StoredFrame
from ..story import StorySpec
from .bundles import read_bundle_meta
from .identity import RenderIdentity
from .renderer import FrameJob, RenderSettings, bundle_meta

if TYPE_CHECKING:
    from .options import RenderOptions

__all__ = [
    "ANCHOR_DIR", "JobPlan", "bundle_relpath", "frame_config_json", "plan_jobs", "plan_work", "settings_differences",
]

ANCHOR_DIR = "anchors"
# Keys of the ``config`` column that are not render settings: the anchors are compared frame by
# frame through the fingerprints (an anchor edit re-renders the frames), not refused; where the
# LoRA files were read from is a note (a LoRA is its file's SHA-256 and scale, wherever it lies).
_NOT_SETTINGS = frozenset({"anchors", "lora_paths"})
_SHOWN_DIFFERENCES = 3
_KEY_ORDER = {key: i for i, key in enumerate((
    "method", "model", "model_revision", "dtype", "steps", "height", "width", "guidance_scale", "negative_prompt",
    "scheduler", "loras",
))}


@dataclass
class JobPlan:
    """The work of one job, decided before anything renders.

    ``anchor_jobs`` are rendered together first when the frames need their bundle, anchor frames
    must be (re)written, or ``--save-anchors`` needs a bundle; ``anchor_writes`` says which of them
    go into the dataset; ``frame_jobs`` are rendered against the bundle (or plainly, for ``--method
    vanilla``) in batches of ``frame_batch`` (``renderer.frame_batches``). ``fingerprints`` holds the current identity of every frame of the story.
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
    # Non-anchor frames per denoiser batch (RenderOptions.frame_batch, or the device's default).
    frame_batch: int = 1
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

        new = self.new_frames()
        st = self.settings
        lines = [
            # The resolved settings (model defaults filled in), so a dry run shows what a story
            # that leaves them out will render at.
            f"settings: {st.width}x{st.height} px, {st.steps} steps, guidance {st.guidance_scale:g}, {st.dtype}, "
            f"--method {self.options.method}"
            + (f", scheduler {st.scheduler}" if st.scheduler else "")
            + "".join(f", LoRA {posixpath.basename(path)} x{scale:g}" for path, scale, _ in st.loras),
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

    def new_frames(self) -> list[str]:
        """The frames the job writes that the dataset does not hold yet, in frame order."""
        writes, replaced = self._writes, set(self.replace)  # once: per frame, this was quadratic (issue 20)
        return [f.id for f in self.spec.frames if f.id in writes and f.id not in replaced]

    @property
    def _writes(self) -> set[str]:
        return set(self.anchor_writes) | {job.frame_id for job in self.frame_jobs}


def bundle_relpath(story_id: str) -> str:
    return f"{ANCHOR_DIR}/{story_id}.safetensors"


def frame_config_json(options: RenderOptions, settings: RenderSettings, config: StorySyncConfig,
                      anchors: list[str]) -> str:
    """The ``config`` column: how the frames were rendered, besides their prompt and seed.

    Holds the method, every ``RenderSettings`` field (model, revision, dtype, steps, height, width,
    guidance scale, negative prompt: the resolved values, model defaults included), the anchor ids
    and the resolved StorySync config (``storysync``). A ``--scheduler`` (``scheduler``: the class
    name) and ``--lora`` adapters (``loras``: SHA-256 and scale of each file, in order; their paths
    in ``lora_paths``, which is not a setting) appear only when the job has them, so the column of a
    job without them is what it always was; so does ``max_sequence_length`` (FLUX's text length,
    absent for families whose text length is fixed), and ``freeu`` (FreeU's factors, with the
    method's own sampler: ``--method consistory`` on a UNet).
    """
    values = dataclasses.asdict(settings)
    loras = values.pop("loras")
    for key in ("scheduler", "max_sequence_length", "freeu"):
        if values[key] is None:
            del values[key]
    if loras:
        values["loras"] = [{"sha256": sha, "scale": scale} for _, scale, sha in loras]
        values["lora_paths"] = [path for path, _, _ in loras]
    return json.dumps(
        {"method": options.method, **values, "anchors": anchors, "storysync": config.to_dict()},
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


def plan_work(plan: JobPlan, sink: ParquetFrameSink) -> JobPlan:
    """Compare the story with what the dataset holds and fill in the work (see the module doc)."""
    spec, options = plan.spec, plan.options
    try:
        stored = sink.existing(spec.id)
    except OSError as exc:
        raise StorySyncUserError(f"--out {options.out}: cannot read the dataset there ({one_line(exc)})") from None
    mixed = _rows_with_other_settings(stored, plan.config_json)
    if mixed and not options.replace_config:
        raise StorySyncUserError(_mixing_message(plan, mixed))
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

    storysync = uses_anchors(options.method)
    anchor_writes = {i for i in todo if i in plan.anchor_ids} if storysync else set()
    frame_jobs = [plan.jobs[i] for i in todo if i not in anchor_writes]
    anchors_in_story = [a for a in plan.anchor_ids if a in plan.jobs]
    save_bundle = False
    notes: list[str] = []
    if options.save_anchors and storysync:
        saved = read_bundle_meta(posixpath.join(options.out, bundle_relpath(spec.id)), options.storage_options)
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
    if mixed:
        notes.append(f"--replace-config: {len({row.frame_id for row in mixed})} frame(s) stored with other "
                     "render settings are rendered again with these")
    plan.leftovers, plan.save_bundle, plan.notes = leftovers, save_bundle, notes
    plan.damaged = list(sink.damaged)
    return plan


def _same_bundle(saved_meta: dict, plan: JobPlan) -> bool:
    # As JSON gives it back (tuples are lists there: the LoRAs of the settings).
    expected = json.loads(json.dumps(bundle_meta(plan.config, plan.settings, [plan.jobs[a] for a in plan.anchor_ids])))
    # A bundle saved before --scheduler/--lora existed has neither key: made without them.
    return all(saved_meta.get(key) == value or (key not in saved_meta and value in (None, []))
               for key, value in expected.items())


def _settings_of(config_json: str | None) -> dict[str, Any] | None:
    """The render settings of a ``config`` column value, flattened (``storysync.rfh_gamma``), or
    None when it is missing or not a JSON object."""
    try:
        data = json.loads(config_json) if config_json is not None else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key in sorted(value):
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            flat[prefix] = value

    walk("", {k: v for k, v in data.items() if k not in _NOT_SETTINGS})
    return flat


class _Said(str):
    """A description shown as it is, not as a JSON value (``(absent)``, ``(unreadable)``)."""


_ABSENT = _Said("(absent)")


def settings_differences(old_json: str | None, new_json: str) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every render setting in which two ``config`` column values differ
    (the anchors list is not a setting); ``[]`` when they agree. A missing or unreadable old value
    differs as a whole (key ``config``)."""
    new = _settings_of(new_json) or {}
    old = _settings_of(old_json)
    if old is None:
        return [("config", _Said("(missing or not a JSON object)"), _Said("(this job's settings)"))]
    # The sampling settings first (they say the most), then the StorySync options, by name.
    keys = sorted(set(old) | set(new), key=lambda k: (_KEY_ORDER.get(k, len(_KEY_ORDER)), k))
    return [
        (key, old[key] if key in old else _ABSENT, new[key] if key in new else _ABSENT)
        for key in keys
        if key not in old or key not in new or old[key] != new[key]
    ]


def _rows_with_other_settings(stored: dict[str, list[StoredFrame]], config_json: str) -> list[StoredFrame]:
    """The stored rows of the story (removed frames' included) made with other render settings."""
    verdict: dict[str | None, bool] = {config_json: False}  # rows repeat a few config strings
    mixed = []
    for rows in stored.values():
        for row in rows:
            if row.config not in verdict:
                verdict[row.config] = bool(settings_differences(row.config, config_json))
            if verdict[row.config]:
                mixed.append(row)
    return mixed


def _shown(value: Any, limit: int = 48) -> str:
    text = str(value) if isinstance(value, _Said) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."  # a long negative prompt


def _mixing_message(plan: JobPlan, mixed: list[StoredFrame]) -> str:
    """One line: which story, where, what differs (first few keys, old -> new), what to do."""
    spec, options = plan.spec, plan.options
    differences = settings_differences(mixed[0].config, plan.config_json)
    shown = ", ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in differences[:_SHOWN_DIFFERENCES])
    if len(differences) > _SHOWN_DIFFERENCES:
        shown += f", and {len(differences) - _SHOWN_DIFFERENCES} more"
    frames = len({row.frame_id for row in mixed})
    return (
        f"--out {options.out}: story {spec.id!r} has {frames} frame(s) there rendered with other settings "
        f"({shown}); nothing was written. One dataset holds one set of settings per story: render each "
        "config or ablation into its own --out, or pass --replace-config to render the story again with "
        "these settings"
    )
