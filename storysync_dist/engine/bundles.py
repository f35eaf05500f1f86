"""Imported anchor bundles (``--anchors FILE``): read, validated and checked against the job.

The structure of a bundle (header, dtypes, shapes, finite values, sizes) is checked by
``AnchorBundle.from_bytes``; here it is checked against what this job renders: the same model,
precision, sampling settings and config, every step the frames will share at, and anchors that
agree with the story's frames of the same id.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec

from ..core.anchors import DEFAULT_MAX_BUNDLE_BYTES, AnchorBundle
from ..core.config import StorySyncConfig
from ..errors import StorySyncUserError, one_line
from ..story import StorySpec
from .renderer import BundleMismatchError, FrameJob, RenderSettings, StoryRenderer

__all__ = ["MAX_BUNDLE_BYTES", "check_bundle_for_job", "check_bundle_model_setup", "publish_steps", "read_bundle", "read_bundle_meta"]

# Larger than any real story's bundle (SDXL 1024 px, 50 steps, every layer: ~40 GB), small
# enough that a wrong file is refused before it is read into memory.
MAX_BUNDLE_BYTES = DEFAULT_MAX_BUNDLE_BYTES


def publish_steps(config: StorySyncConfig, steps: int) -> list[int]:
    """The bundle steps at which anchors publish state (and frames share): from
    ``config.first_shared_step()`` (step 0 with current-step masks, 1 with previous-step ones); with
    ConsiStory's two passes, pass 2's steps follow as ``steps + t``."""
    first = min(config.first_shared_step(), steps)
    return [p * steps + t for p in range(config.render_passes) for t in range(first, steps)]


def read_bundle(url: str, storage_options: dict | None, max_bytes: int = MAX_BUNDLE_BYTES) -> AnchorBundle:
    """Read and structurally validate a bundle; every problem is a one-line user error."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise StorySyncUserError(f"--anchors {url}: {size} bytes is larger than the {max_bytes} a bundle may be")
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise StorySyncUserError(f"--anchors {url}: no such file") from None
    except IsADirectoryError:
        raise StorySyncUserError(f"--anchors {url}: is a folder, not an anchor bundle") from None
    except OSError as exc:
        raise StorySyncUserError(f"--anchors {url}: cannot read it ({one_line(exc)})") from None
    try:
        return AnchorBundle.from_bytes(data, max_bytes=max_bytes)
    except ValueError as exc:
        raise StorySyncUserError(f"--anchors {url}: {one_line(exc)}") from None


def read_bundle_meta(url: str, storage_options: dict | None) -> dict[str, Any] | None:
    """The ``meta`` of a bundle file from its header alone, or None if there is no readable one."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= 100 * 2**20:
                return None
            header = json.loads(handle.read(header_len))
        meta = json.loads(header["__metadata__"]["meta"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def check_bundle_for_job(
    bundle: AnchorBundle,
    url: str,
    *,
    config: StorySyncConfig,
    settings: RenderSettings,
    spec: StorySpec,
    jobs: dict[str, FrameJob],
) -> None:
    """Refuse a bundle made for other settings, missing steps, or anchors that contradict the story."""
    try:
        StoryRenderer.check_bundle_meta(bundle, config, settings)
        bundle.check_coverage(publish_steps(config, settings.steps))
    except (BundleMismatchError, ValueError) as exc:
        raise StorySyncUserError(f"--anchors {url}: {one_line(exc)}") from None
    meta = bundle.meta
    check_bundle_model_setup(meta, settings, url)
    for position, anchor_id in enumerate(meta["anchor_ids"]):
        job = jobs.get(anchor_id)
        if job is None:
            continue  # a character bank from another story: its anchors are not frames here
        where = f"--anchors {url}: anchor {anchor_id!r} is frame #{job.index} of {spec.source}, but"
        if meta["anchor_prompts"][position] != job.prompt:
            raise StorySyncUserError(f"{where} the bundle rendered it with prompt "
                                     f"{meta['anchor_prompts'][position]!r}, the story says {job.prompt!r}")
        if meta["anchor_seeds"][position] != job.seed:
            raise StorySyncUserError(f"{where} the bundle rendered it with seed "
                                     f"{meta['anchor_seeds'][position]}, the story says {job.seed}")
        if [list(p) for p in meta["anchor_token_positions"][position]] != [list(p) for p in job.token_positions]:
            raise StorySyncUserError(f"{where} its subject tokens sit elsewhere in the bundle's prompt")


def _loras_text(loras: list[tuple[str, float]], paths: list[str]) -> str:
    if not loras:
        return "without a LoRA"
    shown = [f"{posixpath.basename(path) + ' ' if path else ''}(sha256 {sha[:12]}..., scale {scale:g})"
             for (sha, scale), path in zip(loras, paths + [""] * len(loras))]
    return "with LoRA " + " + ".join(shown)


def check_bundle_model_setup(meta: dict[str, Any], settings: RenderSettings, url: str) -> None:
    """Refuse a bundle made with another scheduler or other LoRAs (files by SHA-256, and scales)
    than the job's, one line. A bundle from before ``--scheduler``/``--lora`` has neither key:
    made with the model's scheduler and no LoRA."""
    made_scheduler, ours = meta.get("scheduler"), settings.scheduler
    if made_scheduler != ours:
        def named(scheduler: str | None) -> str:
            return f"--scheduler {scheduler}" if scheduler else "the model's own scheduler"

        raise StorySyncUserError(
            f"--anchors {url}: the anchor bundle was made with {named(made_scheduler)}, this job uses "
            f"{named(ours)}; anchors and frames must share one scheduler"
        )
    made_loras = [(str(sha), float(scale)) for _, scale, sha in meta.get("loras") or []]
    our_loras = [(sha, float(scale)) for _, scale, sha in settings.loras]
    if made_loras != our_loras:
        made_paths = [str(path) for path, _, _ in meta.get("loras") or []]
        raise StorySyncUserError(
            f"--anchors {url}: the anchor bundle was made {_loras_text(made_loras, made_paths)}, this job renders "
            f"{_loras_text(our_loras, [p for p, _, _ in settings.loras])}; render the anchors again with the "
            "job's --lora (or drop --anchors)"
        )
