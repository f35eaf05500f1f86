"""Ray job entrypoint: the paper's Table 1 in one command. Renders a prompt suite with several
methods on the same prompts and seeds, scores every method's frames, and writes the table, a CSV,
the adherence/similarity plot and a storyboard per subject set (``storysync bench``).

    ray job submit --working-dir . -- python jobs/benchmark.py --suite consistory-plus \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --weights /data/metric-weights \\
        --out s3://bucket/table1 --workers 8

The options are those of ``storysync bench`` (docs/evaluation.md) plus ``-v``; ``--list-suites``
prints the suite names and exits. A named suite is fetched once into the cache of the node the
driver runs on (``storysync_dist.io.suites``). A rerun resumes: frames already rendered and
stories already scored are kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _common import job_parser, parse_and_run, warn_if_driver_only

from storysync_dist.arguments import bench_options_from_args
from storysync_dist.cli import add_bench_arguments, check_bench_arguments

__all__ = ["build_parser", "main"]

PROG = "benchmark"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``storysync bench`` plus ``-v``."""
    return job_parser(PROG, "Render a prompt suite with several methods and score it (the StorySync paper's "
                      "Table 1).", add_bench_arguments)


def _main(args: argparse.Namespace) -> int:
    from storysync_dist.eval.bench import print_bench_result, run_benchmark

    if args.list_suites:
        from storysync_dist.io.suites import format_suites

        print(format_suites())
        return 0
    check_bench_arguments(args)
    options = bench_options_from_args(args)
    warn_if_driver_only(PROG, args.workers)
    print_bench_result(run_benchmark(options))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the exit code (0, or 2 for a user error)."""
    return parse_and_run(PROG, _main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
