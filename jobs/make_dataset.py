"""Ray job entrypoint: render a benchmark prompt file (e.g. ConsiStory+) into ONE Parquet dataset.

    python jobs/make_dataset.py consistory-plus --model tiny-sdxl \\
        --out out/consistory --categories animals,foods --limit 2 --steps 2 --height 64 --width 64
    ray job submit --working-dir . -- python jobs/make_dataset.py consistory-plus \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --out s3://bucket/consistory --workers 8

The benchmark is a suite name (``storysync bench --list-suites``; fetched once into the cache,
``storysync_dist.io.suites``) or a file of the same shape.

Every subject set becomes a story (``storysync_dist.story.load_benchmark``); all of them render into
the same ``--out``, one folder per story (``data/<story_id>/``), so the stories never collide, and
a rerun renders only the frames that are missing. Every story is checked against the model before
anything renders. With ``--workers N`` every story shares one pool of N workers and one scheduler
(``storysync_dist.api.render_stories``): the anchors of upcoming stories render while earlier
stories' frames do.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from _common import (
    add_cluster_arguments,
    add_logging_arguments,
    parse_and_run,
    positive_int,
    warn_if_driver_only,
)

from storysync_dist.arguments import (
    add_check_arguments,
    add_config_arguments,
    add_device_arguments,
    add_efficiency_arguments,
    add_model_arguments,
    add_progress_arguments,
    add_ray_start_arguments,
    add_suite_sampling_arguments,
    options_from_args,
)
from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.story import StorySpec

if TYPE_CHECKING:
    from storysync_dist.engine.job import RenderOptions

PROG = "make_dataset"


def build_parser() -> argparse.ArgumentParser:
    """Options: the benchmark file, model/out, selection, sampling overrides, and the groups of
    ``storysync_dist.arguments`` that ``storysync render`` takes too (device, config, efficiency,
    cluster)."""
    parser = argparse.ArgumentParser(
        prog="jobs/make_dataset.py",
        description="Render every subject set of a benchmark prompt file as a story, into one Parquet dataset.",
    )
    parser.add_argument("benchmark", help="a suite name (consistory-plus; fetched once into the cache) or a "
                        "benchmark file: {category: [{concept_token, subject, style, settings}]}")
    add_model_arguments(parser)
    parser.add_argument("--categories", help="comma-separated categories to render (default: all)")
    parser.add_argument("--limit", type=positive_int, help="render only the first K subject sets of each category")
    add_suite_sampling_arguments(parser)
    add_device_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out subject sets that do not fit the model (e.g. a concept token that the "
                        "subject text does not contain) instead of stopping")
    parser.add_argument("--bundle-budget", type=positive_int, metavar="BYTES",
                        help="bytes of anchor steps each worker may keep resident; bounds how many stories are "
                        "open at once (default 4 GiB; docs/distributed.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and plan every subject set against --out, print what a run would render, "
                        "replace and remove (totals), and write nothing")
    add_efficiency_arguments(parser)
    add_check_arguments(parser)
    add_progress_arguments(parser)
    add_cluster_arguments(parser)
    add_ray_start_arguments(parser)
    add_logging_arguments(parser)
    return parser


def _check_against_model(stories: list[StorySpec], model: str) -> tuple[list[StorySpec], list[str]]:
    """Split ``stories`` into those that fit the model's tokenizer and size factor, and the errors
    of the others, without loading any weights (so a driver without a GPU can do it)."""
    from storysync_dist.models.info import load_model_info
    from storysync_dist.story import validate_for_model

    try:
        info = load_model_info(model)
    except (ValueError, TypeError) as exc:  # UnknownModelError, not a UNet pipeline folder
        raise StorySyncUserError(f"--model: {exc}") from None
    good, problems = [], []
    for story in stories:
        try:
            # the text length the job will encode (FLUX.1-schnell: 256 tokens), as prepare_job checks it
            validate_for_model(story, info.tokenizer, info.size_factor,
                               max_tokens=story.defaults.max_sequence_length or info.text_len)
        except StorySpecError as exc:
            problems.append(str(exc))
        else:
            good.append(story)
    return good, problems


def _category(story: StorySpec) -> str:
    """The benchmark category of ``story`` (``story.category``, which ``load_benchmark`` sets); a
    story without one (not from a benchmark file) counts as a category of its own, its id."""
    return story.category or story.id


def check_unique_ids(stories: Sequence[StorySpec]) -> None:
    """Refuse two stories with the same id: the second would find the first one's frames "already
    present" and silently render nothing. Raises a one-line ``StorySyncUserError`` naming both."""
    first: dict[str, StorySpec] = {}
    for story in stories:
        if story.id in first:
            raise StorySyncUserError(
                f"{first[story.id].source} and {story.source} both have story id {story.id!r}; "
                "nothing was rendered"
            )
        first[story.id] = story


def _main(args: argparse.Namespace) -> int:
    from storysync_dist.api import render_stories
    from storysync_dist.engine.job import check_efficiency_options
    from storysync_dist.io.suites import resolve_suite
    from storysync_dist.story import load_benchmark

    categories = None
    if args.categories is not None:
        categories = [x.strip() for x in args.categories.split(",") if x.strip()]
        if not categories:
            raise StorySyncUserError("--categories: give at least one category")
    overrides = {name: getattr(args, name) for name in ("steps", "height", "width", "seed")
                 if getattr(args, name) is not None}
    # The overrides go in as the stories' defaults, so a bad value fails here, naming the file.
    benchmark = resolve_suite(args.benchmark, option="benchmark")
    stories = load_benchmark(benchmark, categories=categories, limit=args.limit, defaults=overrides)
    stories, problems = _check_against_model(stories, args.model)
    if problems:
        for line in problems:
            print(f"{PROG}: {'warning: skipping' if args.skip_invalid else 'error:'} {line}", file=sys.stderr)
        if not args.skip_invalid:
            print(f"{PROG}: error: {len(problems)} subject set(s) do not fit --model {args.model}; nothing was "
                  "rendered (fix them, or pass --skip-invalid to leave them out)", file=sys.stderr)
            return 2
    # load_benchmark already makes ids unique; checked again on what is about to render, since a
    # clash would silently drop a story into the other one's "already present" frames.
    check_unique_ids(stories)
    warn_if_driver_only(PROG, args.workers)

    # --steps/--height/--width/--seed went into the stories' defaults above, not over them.
    options = options_from_args(args, steps=None, height=None, width=None, seed=None,
                                bundle_budget=args.bundle_budget)
    check_efficiency_options(options)  # a bad --bundle-on or --offload fails before anything loads
    if args.dry_run:
        return _dry_run(stories, options, len(problems))
    pipe = None
    if args.workers == 0 and stories:
        # One pipeline for every story, instead of one load per story; the device/dtype defaults
        # and checks are the engine's own, so both paths pick the same.
        from storysync_dist.engine.job import device_and_dtype
        from storysync_dist.models.presets import load_pipeline

        device, dtype = device_and_dtype(args.device, args.dtype, args.model)
        pipe = load_pipeline(args.model, device=device, dtype=dtype, offload=options.offload)

    start = time.perf_counter()
    rendered: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    category_of = {story.id: _category(story) for story in stories}
    # One pool of workers and one scheduler for every story: each worker loads its pipeline
    # once, and renders upcoming stories' anchors while other stories' frames render.
    for number, result in enumerate(render_stories(stories, options, pipe=pipe), 1):
        category = category_of[result.story_id]
        rendered[category] += len(result.rendered)
        skipped[category] += len(result.skipped)
        print(f"[{number}/{len(stories)}] {result.story_id}: rendered {len(result.rendered)}, "
              f"skipped {len(result.skipped)} already present ({result.seconds:.1f}s)", flush=True)

    print(f"{len(stories)} stories, {sum(rendered.values())} frame(s) rendered, {sum(skipped.values())} already "
          f"present, {len(problems)} subject set(s) left out, in {time.perf_counter() - start:.1f}s")
    for category in dict.fromkeys(_category(story) for story in stories):
        print(f"  {category}: rendered {rendered[category]}, skipped {skipped[category]}")
    print(f"dataset: {args.out}")
    return 0


def _dry_run(stories: list[StorySpec], options: RenderOptions, left_out: int) -> int:
    """Plan every story against the dataset and print the totals (one line per kind of change, as
    ``storysync render --dry-run`` prints for one story); nothing is written and no model loads."""
    from storysync_dist.api import render_stories

    start = time.perf_counter()
    totals: Counter[str] = Counter()
    settings: list[str] = []
    memory: dict[str, None] = {}  # the distinct memory notes, in order
    for result in render_stories(stories, options):
        totals["stories"] += 1
        totals["new"] += result.new
        totals["replace"] += len(result.replaced)
        totals["remove"] += len(result.removed)
        totals["skip"] += len(result.skipped)
        totals["stale"] += len(result.stale)
        settings = settings or [line for line in result.notes if line.startswith("settings:")]
        memory.update(dict.fromkeys(line for line in result.notes if line.startswith("peak memory")))
    print(f"dry run of {totals['stories']} stories into {options.out}: nothing was written "
          f"({time.perf_counter() - start:.1f}s)")
    for line in [*settings, *list(memory)[:3]]:
        print(f"  {line}")
    if len(memory) > 3:
        print(f"  ... and {len(memory) - 3} other memory estimates")
    print(f"  render:  {totals['new']}")
    print(f"  replace: {totals['replace']}  (stored with other inputs: rendered again)")
    print(f"  remove:  {totals['remove']}  (no longer in the stories)")
    print(f"  skip:    {totals['skip']} already present")
    if totals["stale"]:
        print(f"  stale:   {totals['stale']}  (out of date, not selected)")
    if left_out:
        print(f"  {left_out} subject set(s) left out (--skip-invalid)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the exit code (0, or 2 for a user error)."""
    return parse_and_run(PROG, _main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
