"""The ``storysync`` console script: parse arguments, call the Python API, print where things went.

The options are the groups of ``storysync_dist.arguments``, shared with the ``jobs/`` entrypoints.
User errors (bad story file, unknown model, bad option) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .arguments import (
    EXIT_USER_ERROR,
    add_check_arguments,
    add_cluster_arguments,
    add_config_arguments,
    add_device_arguments,
    add_efficiency_arguments,
    add_logging_arguments,
    add_model_arguments,
    add_progress_arguments,
    add_ray_start_arguments,
    add_scoring_arguments,
    add_suite_sampling_arguments,
    bench_options_from_args,
    eval_options_from_args,
    non_negative_int,
    options_from_args,
    positive_int,
    print_result,
    run_command,
)
from .errors import StorySyncUserError

__all__ = ["EXIT_USER_ERROR", "add_bench_arguments", "add_render_arguments", "build_parser", "check_bench_arguments",
           "main", "options_from_args", "print_result"]


def add_render_arguments(render: argparse.ArgumentParser) -> None:
    """Every option of ``storysync render`` (``jobs/render_story.py`` takes the same)."""
    render.add_argument("story", help="story file: .yaml, .yml, .json, .jsonl (a header line, then one frame per line) "
                        "or .parquet (one row per frame)")
    add_model_arguments(render)
    render.add_argument("--only", help="comma-separated frame ids to render (against the same anchors)")
    render.add_argument("--steps", type=positive_int,
                        help="denoising steps (overrides the story; default: the story's, else the model's "
                        "stock default, 50 for SDXL and SD)")
    render.add_argument("--height", type=positive_int,
                        help="image height in pixels (overrides the story; default: the story's, else the "
                        "model's native size, 1024 for SDXL base)")
    render.add_argument("--width", type=positive_int,
                        help="image width in pixels (overrides the story; default as --height)")
    render.add_argument("--seed", type=non_negative_int, help="base seed (overrides the story)")
    add_device_arguments(render)
    add_config_arguments(render)
    render.add_argument("--anchors", help="reuse an anchor bundle (.safetensors) saved by an earlier job")
    render.add_argument("--save-anchors", action="store_true",
                        help="save the anchor bundle as <out>/anchors/<story>.safetensors")
    add_cluster_arguments(render)
    add_ray_start_arguments(render)
    render.add_argument("--dry-run", action="store_true",
                        help="print what a run would render, replace and remove, and write nothing")
    add_efficiency_arguments(render)
    add_check_arguments(render)
    add_progress_arguments(render)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``storysync eval``."""
    parser.add_argument("dataset", help="a dataset in storysync's Parquet format (folder or fsspec URL)")
    add_scoring_arguments(parser)
    parser.add_argument("--out", help="where the scores go (default: <dataset>/eval)")
    parser.add_argument("--device", help="torch device of the encoders (default: cpu; cuda on Ray GPU workers)")
    add_cluster_arguments(parser)
    add_progress_arguments(parser)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``storysync bench`` (``jobs/benchmark.py`` takes the same)."""
    parser.add_argument("--suite", help="prompt suite: a name (consistory-plus, downloaded once into the cache; "
                        "--list-suites) or a file {category: [{concept_token, subject, style, settings}]}")
    parser.add_argument("--list-suites", action="store_true",
                        help="print the suite names with their size and source, and exit")
    parser.add_argument("--limit", type=positive_int, help="the first N subject sets of each category")
    parser.add_argument("--category", help="comma-separated categories (default: all)")
    add_model_arguments(parser, with_method=False)
    # --suite, --model and --out are required unless --list-suites: check_bench_arguments says so.
    for action in parser._actions:
        if action.dest in BENCH_REQUIRED:
            action.required = False
    parser.add_argument("--methods", default="vanilla,storysync,consistory,storydiffusion",
                        help="comma-separated methods, rendered on the same prompts and seeds (default: all four)")
    add_suite_sampling_arguments(parser)
    add_device_arguments(parser)
    add_scoring_arguments(parser)
    add_cluster_arguments(parser)
    add_efficiency_arguments(parser)
    add_check_arguments(parser)
    add_progress_arguments(parser)


BENCH_REQUIRED = {"suite": "--suite", "model": "--model", "out": "--out"}


def check_bench_arguments(args: argparse.Namespace) -> None:
    """The options a bench run needs and ``--list-suites`` does not: a one-line error naming the
    missing ones (``StorySyncUserError``, exit 2)."""
    missing = [option for dest, option in BENCH_REQUIRED.items() if getattr(args, dest, None) is None]
    if missing:
        raise StorySyncUserError(f"the following arguments are required: {', '.join(missing)} "
                                 "(or --list-suites alone)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storysync", description="Consistent-subject story rendering (StorySync).")
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    add_render_arguments(sub.add_parser("render", help="render a story into a Parquet dataset"))
    add_eval_arguments(sub.add_parser("eval", help="score a dataset: CLIP-T, CLIP-I, DINO, LPIPS, DreamSim"))
    add_bench_arguments(sub.add_parser("bench", help="render a prompt suite with several methods and score it "
                                       "(the paper's Table 1)"))
    return parser


def _render(args: argparse.Namespace) -> int:
    from .api import render_story

    print_result(render_story(args.story, options_from_args(args)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval.run import evaluate_dataset, print_eval_result

    print_eval_result(evaluate_dataset(eval_options_from_args(args)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .eval.bench import print_bench_result, run_benchmark

    if args.list_suites:
        from .io.suites import format_suites

        print(format_suites())
        return 0
    check_bench_arguments(args)
    print_bench_result(run_benchmark(bench_options_from_args(args)))
    return 0


COMMANDS = {"render": _render, "eval": _eval, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("storysync", COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
