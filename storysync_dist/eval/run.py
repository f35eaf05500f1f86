"""``storysync eval``: score any dataset in our Parquet format, in this process or on Ray workers.

The dataset is read through ``io.layout.open_dataset`` (committed parts only), one story at a time
in frame order. Each story is scored by ``eval.scores.score_story``: CLIP-T per frame, the subject
metrics as the mean over the story's frame pairs on background-removed images, and, when asked for
(``--metrics oracle``, toyworld renders only), toyworld's oracle (``eval.oracle``). The scores go to
``<out>`` (default ``<dataset>/eval``) as Parquet and CSV (``io.scores``).

A rerun resumes: a story whose frames (ids and fingerprints), metrics and weights (and, with the
oracle, its flagged anchor frames) are those of its stored row keeps its scores and is not scored
again.

Encoders are loaded (and missing weights reported, exit 2) before any story is scored; with
``workers >= 1`` each Ray ``EvalWorker`` loads its own (``distributed.evaluator``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import StorySyncUserError
from ..interrupts import note_written
from .story import RANDOM_TINY, EvalOptions, StoryFrames, check_eval_options, load_scorers, score_story_frames

__all__ = ["RANDOM_TINY", "EvalOptions", "EvalResult", "StoryFrames", "StoryImages", "check_eval_options",
           "evaluate_dataset", "load_scorers", "print_eval_result", "read_story_index", "score_story_frames"]

log = logging.getLogger("storysync")

EVAL_DIR = "eval"


@dataclass
class EvalResult:
    out: str
    files: dict[str, str]
    stories: int
    frames: int
    scored: list[str]
    reused: list[str]
    summary: dict[str, Any]
    seconds: float
    story_rows: list[dict[str, Any]] = field(default_factory=list)


def _digest(frames: list[tuple[str, str | None]], metrics: Sequence[str], weights: dict[str, str],
            anchors: list[str] | None = None) -> str:
    """A story's scores are kept while this is unchanged: its frames (ids, fingerprints), the
    metrics, the weights, and for the oracle the anchor frames its background leakage is
    measured against (given only then, so the digests of the other metrics stay as they were)."""
    parts: list[Any] = [sorted(frames, key=lambda f: f[0]), list(metrics), weights]
    if anchors is not None:
        parts.append(sorted(anchors))
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


INDEX_COLUMNS = ["story_id", "frame_id", "frame_index", "prompt", "fingerprint", "model", "is_anchor"]


def read_story_index(dataset: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, list[dict]]]:
    """Every story of the dataset as ``(story_id, rows in frame order)``, without the images (the
    small columns of every committed part); a one-line error when ``dataset`` holds no frame."""
    from ..io.layout import open_dataset

    try:
        table = open_dataset(dataset, storage_options).to_table(columns=INDEX_COLUMNS)
    except (OSError, ValueError) as exc:
        raise StorySyncUserError(f"{dataset}: no frames to score, not a storysync dataset "
                                 f"({' '.join(str(exc).split())})") from None
    if table.num_rows == 0:
        raise StorySyncUserError(f"{dataset}: the dataset holds no frames (render one with storysync render)")
    stories: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        stories.setdefault(row["story_id"], []).append(row)
    return [(sid, sorted(rows, key=lambda r: r["frame_index"])) for sid, rows in sorted(stories.items())]


class StoryImages:
    """Reads one story's committed frames at a time (its own folder of parts, ``io.sink``), so
    memory holds the stories being scored, not the dataset."""

    def __init__(self, dataset: str, storage_options: dict[str, Any] | None = None) -> None:
        from ..io.sink import ParquetFrameSink

        self.sink = ParquetFrameSink(dataset, storage_options=storage_options, read_only=True)

    def of(self, story_id: str) -> dict[str, bytes]:
        """``{frame_id: PNG bytes}`` of the story's committed frames."""
        table = self.sink.read_table(story_id).select(["frame_id", "image"])
        return {row["frame_id"]: row["image"]["bytes"] for row in table.to_pylist()}

    def with_images(self, story: StoryFrames) -> StoryFrames:
        images = self.of(story.story_id)
        return dataclasses.replace(story, images=[images[f] for f in story.frame_ids])


def evaluate_dataset(options: EvalOptions, *, loaded: tuple[Any, Any] | None = None) -> EvalResult:
    """Score every story of ``options.dataset`` and write the tables; see the module docstring.

    ``loaded``: the ``(encoders, background remover)`` of these options, loaded earlier (``bench``
    scores several datasets with one set)."""
    from ..io.scores import read_scores

    started = time.perf_counter()
    metrics = check_eval_options(options)
    out = options.out or posixpath.join(options.dataset.rstrip("/"), EVAL_DIR)
    stories = read_story_index(options.dataset, options.storage_options)
    oracle = "oracle" in metrics
    if oracle:  # every prompt must be toyworld's: a one-line error (exit 2) before anything loads
        from .oracle import toyworld_scenes

        for story_id, rows in stories:
            toyworld_scenes(story_id, [r["frame_id"] for r in rows], [r["prompt"] for r in rows])
    # The encoders load here first, in-process: missing weights fail at once (exit 2), before any
    # worker starts; their description of the weights is part of every story's digest.
    encoders, remover = loaded if loaded is not None else load_scorers(metrics, options)
    weights = dict(encoders.weights)  # each metric's, and "background"
    # Random weights anywhere make the numbers a plumbing check: the encoders (random-tiny), or the
    # model that rendered the frames (the offline presets built from configs, tiny-* and random-*;
    # not a trained preset shipped as a folder, toyworld).
    preset_models = random_weight_models({r["model"] for _, rows in stories for r in rows})
    plumbing = bool(encoders.plumbing_check) or bool(preset_models)

    work: list[StoryFrames] = []
    for story_id, rows in stories:
        flags = [r.get("is_anchor") for r in rows]
        anchors = [r["frame_id"] for r in rows if r.get("is_anchor")] if oracle else None
        digest = _digest([(r["frame_id"], r["fingerprint"]) for r in rows], metrics, weights, anchors)
        work.append(StoryFrames(story_id, [r["frame_id"] for r in rows], [r["prompt"] for r in rows], digest,
                                anchors=flags))
    previous = read_scores(out, options.storage_options) or ([], [])
    kept = {row["story_id"]: row for row in previous[1] if row.get("digest") in {s.digest for s in work}}
    todo = [s for s in work if s.story_id not in kept]
    reused = sorted(kept)

    results: dict[str, tuple[list, dict]] = {}
    images = StoryImages(options.dataset, options.storage_options)
    loading = (images.with_images(story) for story in todo)  # one story's images at a time

    def write(complete: bool) -> tuple[dict[str, str], dict[str, Any], list[dict[str, Any]]]:
        return _write_tables(out, work, kept, results, previous[0], metrics, weights, options, plumbing,
                             _random_parts(encoders.plumbing_check, preset_models), preset_models, complete)

    with _EvalProgress(options, todo) as progress:
        try:
            if todo and options.workers > 0:
                from ..distributed.evaluator import score_on_ray

                score_on_ray(loading, len(todo), metrics, options, on_scored=progress.scored, into=results)
            else:
                for story in loading:
                    results[story.story_id] = score_story_frames(story, encoders, remover, metrics)
                    progress.scored(story.story_id, len(story.frame_ids))
        except KeyboardInterrupt as exc:  # SIGINT/SIGTERM (interrupts): keep the stories scored so far
            scored = f"{len(results)} of {len(todo)} stories scored"
            if results:
                write(complete=False)
                scored += f", their scores written to {out}"
            note_written(exc, scored)
            raise

    files, summary, story_rows = write(complete=True)
    return EvalResult(out=out, files=files, stories=len(work), frames=summary["frames"],
                      scored=[s.story_id for s in todo], reused=reused, summary=summary,
                      seconds=time.perf_counter() - started, story_rows=story_rows)


def _write_tables(out: str, work: list[StoryFrames], kept: dict[str, dict], results: dict[str, tuple[list, dict]],
                  previous_frames: list[dict[str, Any]], metrics: Sequence[str], weights: dict[str, str],
                  options: EvalOptions, plumbing: bool, random_parts: str, preset_models: list[str],
                  complete: bool) -> tuple[dict[str, str], dict[str, Any], list[dict[str, Any]]]:
    """Write the score tables of the stories scored (``kept`` from earlier runs, ``results`` now);
    an interrupted run writes what it has with ``complete`` False, and its rerun reuses them."""
    from ..io.scores import write_scores
    from .scores import score_names

    frame_rows: list[dict[str, Any]] = [r for r in previous_frames if r["story_id"] in kept]
    story_rows: list[dict[str, Any]] = []
    for story in work:
        if story.story_id in kept:
            story_rows.append(kept[story.story_id])
            continue
        if story.story_id not in results:
            continue  # not scored yet (an interrupted run)
        frames, row = results[story.story_id]
        frame_rows.extend(frames)
        story_rows.append({**row, "digest": story.digest, "plumbing_check": plumbing})
    frame_rows.sort(key=lambda r: (r["story_id"], r["frame_id"]))
    summary = {
        "dataset": options.dataset, "stories": len(work), "frames": sum(len(s.frame_ids) for s in work),
        "complete": complete, "scored_stories": len(story_rows),
        "metrics": list(metrics), "weights": weights, "plumbing_check": plumbing,
        "label": (f"PLUMBING CHECK: random weights ({random_parts}); "
                  "these numbers say nothing about quality") if plumbing else "scores with the weights listed",
        "random_weight_models": preset_models,
        # Keyed by score ("clip-t", ..., and the oracle's "identity-consistency", "adherence",
        # "background-leakage"), each the mean over stories of its column (eval.scores.score_names).
        "mean": {m: _mean([row.get(m.replace("-", "_")) for row in story_rows]) for m in score_names(metrics)},
    }
    return write_scores(out, frame_rows, story_rows, summary, options.storage_options), summary, story_rows


class _EvalProgress:
    """Images scored of those to score, and stories: ``engine.progress.JobProgress`` counting
    images, without Ray metrics (those are render's) or a line per story."""

    def __init__(self, options: EvalOptions, todo: list[StoryFrames]) -> None:
        from ..engine.progress import JobProgress

        self.job = JobProgress(f"scoring {options.dataset}", show=options.progress and bool(todo),
                               log_every=options.log_every, unit="image", story_lines=False)
        for story in todo:
            self.job.add_story(story.story_id, len(story.frame_ids))

    def scored(self, story_id: str, images: int) -> None:
        """``story_id`` is scored: its ``images`` count, and the story is done."""
        log.info("scored story %s (%d frames)", story_id, images)
        if images:
            self.job.frame_done(story_id, count=images)
        self.job.story_done(story_id)

    def __enter__(self) -> _EvalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.job.close()


def random_weight_models(models: set[str] | Sequence[str]) -> list[str]:
    """The ``models`` that are offline presets with random weights (every preset built from
    configs: ``Preset.folder is None``), sorted; a trained preset (``toyworld``) is not one."""
    from ..models.presets import PRESETS

    return sorted({m for m in models if m in PRESETS and PRESETS[m].folder is None})


def _random_parts(random_encoders: bool, preset_models: list[str]) -> str:
    parts = ["random-tiny encoders"] if random_encoders else []
    if preset_models:
        parts.append(f"frames rendered by the random-weight preset {', '.join(preset_models)}")
    return " and ".join(parts)


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None


def print_eval_result(result: EvalResult) -> None:
    """What ``storysync eval`` prints."""
    if result.summary["plumbing_check"]:
        print(result.summary["label"])
    print(f"scored {len(result.scored)} story(ies), kept {len(result.reused)} scored earlier, "
          f"{result.frames} frame(s), in {result.seconds:.1f}s")
    width = max([9, *map(len, result.summary["mean"])])
    for metric, value in result.summary["mean"].items():
        print(f"  {metric:{width}s} {'n/a' if value is None else f'{value:.4f}'}")
    for metric, used in result.summary["weights"].items():
        print(f"weights:    {metric}: {used}")
    for kind in ("per_frame", "per_story", "csv"):
        print(f"{kind + ':':11s} {result.files[kind]}")
