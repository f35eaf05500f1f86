"""What scoring one story needs, in any process: the options of ``storysync eval``, a story's
frames as plain data, the scorers (encoders and background remover) and one story's scores. The
driver (``eval.run``) and a Ray ``EvalWorker`` (``distributed.evaluator``) both import it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import StorySyncUserError

__all__ = ["RANDOM_TINY", "EvalOptions", "StoryFrames", "check_eval_options", "load_scorers", "score_story_frames"]

RANDOM_TINY = "random-tiny"


@dataclass
class EvalOptions:
    """Options of ``storysync eval`` (and of the scoring half of ``storysync bench``)."""

    dataset: str
    out: str | None = None  # default: <dataset>/eval
    # default: every encoder metric (eval.encoders.METRICS); "oracle" (toyworld renders only) only
    # when named: eval.encoders.ALL_METRICS are the choices.
    metrics: Sequence[str] | None = None
    weights: str | None = None  # a folder of local weights (docs/evaluation.md); None: the HF cache
    encoders: str | None = None  # "random-tiny": tiny random encoders, a plumbing check
    workers: int = 0
    address: str | None = None
    device: str | None = None
    storage_options: dict[str, Any] | None = None
    # Images and stories scored so far (--no-progress turns it off): a bar on a terminal, else one
    # plain line every log_every seconds (--log-every), as render's progress (engine.progress).
    progress: bool = True
    log_every: float = 10.0


@dataclass
class StoryFrames:
    """One story's frames as plain data (what a Ray worker receives): ids, prompts, the dataset's
    ``is_anchor`` flags (None where unknown; empty: all unknown), and their PNG bytes once read
    (``with_images``; a story's images are read only when it is scored)."""

    story_id: str
    frame_ids: list[str]
    prompts: list[str]
    digest: str
    images: list[bytes] = field(default_factory=list)
    anchors: list[bool | None] = field(default_factory=list)


def check_eval_options(options: EvalOptions) -> tuple[str, ...]:
    """The metrics to compute (default: ``eval.encoders.METRICS``, every encoder metric; the
    oracle only when named); one-line errors naming the option."""
    from .encoders import ALL_METRICS, METRICS

    metrics = tuple(options.metrics) if options.metrics else METRICS
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise StorySyncUserError(f"--metrics {','.join(unknown)}: unknown metric (choose from {', '.join(ALL_METRICS)})")
    if options.encoders not in (None, RANDOM_TINY):
        raise StorySyncUserError(f"--encoders {options.encoders!r}: the only preset is {RANDOM_TINY}")
    if options.encoders and options.weights:
        raise StorySyncUserError("--encoders random-tiny and --weights: give one (random-tiny uses no weights)")
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 0:
        raise StorySyncUserError(f"--workers {options.workers!r}: must be an integer >= 0")
    return metrics


def score_story_frames(story: StoryFrames, encoders: Any, remover: Any, metrics: Sequence[str]) -> tuple[list, dict]:
    """Decode one story's PNG frames and score them (``eval.scores.score_story``)."""
    import io

    from PIL import Image

    from .scores import FrameForEval, score_story

    anchors = story.anchors or [None] * len(story.frame_ids)
    frames = [FrameForEval(story.story_id, fid, prompt, Image.open(io.BytesIO(png)).convert("RGB"), anchor)
              for fid, prompt, png, anchor in zip(story.frame_ids, story.prompts, story.images, anchors)]
    return score_story(frames, encoders, remover, metrics)


def load_scorers(metrics: tuple[str, ...], options: EvalOptions) -> tuple[Any, Any]:
    """The encoders of ``metrics`` and their background remover (None without a subject metric);
    missing weights raise ``MissingWeightsError`` (one line, exit 2) before anything loads."""
    import torch

    from .encoders import load_encoders

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = load_encoders(metrics, weights=options.weights, encoders=options.encoders, device=device)
    return encoders, encoders.remover
