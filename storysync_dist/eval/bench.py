"""``storysync bench``: render a prompt suite with several methods on the same prompts and seeds,
score every method's dataset, and report them side by side (the paper's Table 1).

Layout of ``--out``::

    renders/<method>/      one dataset per method (storysync's Parquet format)
    scores/<method>/       its scores (``storysync eval``: per_frame/per_story Parquet, CSV)
    results.csv            one row per method: the mean over stories of every metric (``oracle``:
                           identity consistency, adherence, background leakage)
    table.md               the same in the layout of the paper's Table 1
    adherence_vs_similarity.png   CLIP-T against subject similarity, one point per method (without
                           CLIP-T, the oracle's adherence against identity consistency)
    storyboards/<story>.png       one sheet per subject set, the methods as rows

A rerun resumes: the renders skip the frames already present (the engine's fingerprints) and the
scores keep the stories whose frames did not change (``eval.run``). The encoders are loaded before
anything renders, so missing weights fail at once, not after the renders.

``suite`` is a name of ``io.suites.SUITES`` (fetched once into the cache) or a file. Every subject
set is checked against the model before anything renders; one that does not fit (a concept token
the prompts lack, a prompt too long for the text encoder) is left out with a one-line warning
(logger ``storysync``) and listed in ``BenchResult.skipped``: the run goes on with the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.methods import METHODS
from ..errors import StorySyncUserError

if TYPE_CHECKING:
    from ..engine.job import RenderOptions
    from ..story import StorySpec
    from .run import EvalOptions, StoryImages

__all__ = ["BenchOptions", "BenchResult", "print_bench_result", "run_benchmark"]


@dataclass
class BenchOptions:
    """Options of ``storysync bench``: the suite and its selection, the methods, and the render
    and scoring options every method shares (``render.out`` is the benchmark folder)."""

    suite: str
    methods: list[str]
    render: RenderOptions
    scoring: EvalOptions
    limit: int | None = None
    categories: list[str] | None = None
    seed: int | None = None


@dataclass
class BenchResult:
    out: str
    rows: list[dict[str, Any]]
    files: dict[str, str]
    storyboards: list[str]
    plumbing_check: bool
    seconds: float
    rendered: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # one line per subject set left out, and why


def _check_methods(methods: list[str]) -> list[str]:
    if not methods:
        raise StorySyncUserError("--methods: give at least one method")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StorySyncUserError(f"--methods {','.join(unknown)}: unknown method (choose from {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise StorySyncUserError(f"--methods {','.join(methods)}: a method is listed twice")
    return methods


def run_benchmark(options: BenchOptions) -> BenchResult:
    """Render, score and report; see the module docstring."""
    from ..api import render_stories
    from ..io.storage import write_bytes
    from ..io.suites import resolve_suite
    from ..story import load_benchmark
    from .report import bench_rows, plot_adherence, table_markdown
    from .run import StoryImages, check_eval_options, evaluate_dataset, load_scorers

    started = time.perf_counter()
    methods = _check_methods(list(options.methods))
    out = options.render.out
    defaults = {k: v for k, v in (("steps", options.render.steps), ("height", options.render.height),
                                  ("width", options.render.width), ("seed", options.seed)) if v is not None}
    suite = resolve_suite(options.suite)
    stories = load_benchmark(suite, categories=options.categories, limit=options.limit, defaults=defaults)
    if not stories:
        raise StorySyncUserError(f"{options.suite}: no subject set matches --category/--limit")
    stories, skipped = _sets_that_fit(stories, options.render.model)
    metrics = check_eval_options(options.scoring)
    loaded = load_scorers(metrics, options.scoring)  # missing weights: exit 2 now, before any render

    rendered: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        executor = None
        if options.render.workers > 0:  # one pool of workers renders every method, then goes
            from ..distributed.executor import RayExecutor

            executor = stack.enter_context(RayExecutor(options.render))
        for method in methods:
            render = dataclasses.replace(options.render, method=method, out=posixpath.join(out, "renders", method),
                                         steps=None, height=None, width=None, seed=None)
            rendered[method] = sum(len(r.rendered) for r in render_stories(stories, render, executor=executor))
    evals = {}
    for method in methods:
        scoring = dataclasses.replace(options.scoring, dataset=posixpath.join(out, "renders", method),
                                      out=posixpath.join(out, "scores", method),
                                      storage_options=options.render.storage_options)
        evals[method] = evaluate_dataset(scoring, loaded=loaded)

    plumbing = any(e.summary["plumbing_check"] for e in evals.values())
    model = options.render.model
    rows = bench_rows({m: e.summary for m, e in evals.items()}, model=model, metrics=metrics)
    store = options.render.storage_options
    files = {
        "csv": write_bytes(out, "results.csv", _csv(rows), store),
        "table": write_bytes(out, "table.md", table_markdown(rows, metrics, plumbing_check=plumbing,
                                                              suite=options.suite, stories=len(stories)).encode(), store),
        "plot": write_bytes(out, "adherence_vs_similarity.png", plot_adherence(rows, plumbing_check=plumbing), store),
    }
    readers = {m: StoryImages(posixpath.join(out, "renders", m), store) for m in methods}
    boards = [write_bytes(out, f"storyboards/{story.id}.png", _storyboard(story, methods, readers), store)
              for story in stories]
    return BenchResult(out=out, rows=rows, files=files, storyboards=boards, plumbing_check=plumbing,
                       seconds=time.perf_counter() - started, rendered=rendered, skipped=skipped)


def _sets_that_fit(stories: list[StorySpec], model: str) -> tuple[list[StorySpec], list[str]]:
    """The subject sets that fit ``model`` (``validate_for_model`` at the size the engine will use,
    without loading weights), and one line for each that does not, which is logged as a warning.
    Only when none fits is it an error: then the cause is the options (a size) or the model."""
    from ..models.info import load_model_info
    from ..story import validate_for_model

    try:
        info = load_model_info(model)
    except (ValueError, TypeError) as exc:  # UnknownModelError, an unsupported pipeline folder
        raise StorySyncUserError(f"--model: {exc}") from None
    good, skipped = [], []
    for story in stories:
        size = (story.defaults.height or info.default_height, story.defaults.width or info.default_width)
        try:
            validate_for_model(story, info.tokenizer, info.size_factor, size=size,
                               max_tokens=story.defaults.max_sequence_length or info.text_len)
        except StorySyncUserError as exc:
            skipped.append(str(exc))
        else:
            good.append(story)
    if not good:
        raise StorySyncUserError(f"no subject set fits --model {model} ({len(skipped)} checked); the first: "
                                 f"{skipped[0]}")
    for line in skipped:
        logging.getLogger("storysync").warning("warning: skipping %s", line)
    return good, skipped


def _csv(rows: list[dict[str, Any]]) -> bytes:
    import csv

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def _storyboard(story: StorySpec, methods: list[str], readers: dict[str, StoryImages]) -> bytes:
    """One sheet: a row per method, a column per frame of the story (same prompts and seeds)."""
    from PIL import Image

    from ..io.storyboard import make_storyboard, png_bytes

    tiles = []
    for method in methods:
        images = readers[method].of(story.id)
        for frame in story.frames:
            png = images.get(frame.id)
            image = Image.open(io.BytesIO(png)) if png is not None else Image.new("RGB", (8, 8), (255, 255, 255))
            tiles.append((f"{method} · {frame.id}" if png is not None else f"{method} · {frame.id} missing", image, None))
    return png_bytes(make_storyboard(tiles, columns=len(story.frames), show_masks=False))


def print_bench_result(result: BenchResult) -> None:
    """What ``storysync bench`` prints: the table, then where everything went."""
    from .report import table_markdown

    if result.plumbing_check:
        print("PLUMBING CHECK (random weights: random-tiny encoders or a tiny/random model preset): the numbers "
              "say nothing about quality")
    rendered = ", ".join(f"{m} {n}" for m, n in result.rendered.items())
    print(f"rendered frames: {rendered}; in {result.seconds:.1f}s")
    if result.skipped:
        print(f"skipped: {len(result.skipped)} subject set(s) that do not fit the model (the warnings above)")
    metrics = [k.replace("_", "-") for k in result.rows[0] if k not in ("method", "model", "stories", "frames")]
    print(table_markdown(result.rows, metrics, plumbing_check=result.plumbing_check))
    for kind, url in result.files.items():
        print(f"{kind + ':':12s} {url}")
    print(f"storyboards: {len(result.storyboards)} in {posixpath.dirname(result.storyboards[0])}"
          if result.storyboards else "storyboards: none")
