"""Ray job entrypoint: render one story into a Parquet dataset.

    ray job submit --working-dir . -- python jobs/render_story.py examples/story.yaml \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --out s3://bucket/stories/cat --workers 8

The options are those of ``storysync render`` (the same groups of ``storysync_dist.arguments``)
plus ``-v``. Under ``ray job submit`` RAY_ADDRESS is set, so the job joins the cluster it was
submitted to. A user error (bad story, unknown model, bad option) prints one line and exits with
code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _common import job_parser, parse_and_run, warn_if_driver_only

from storysync_dist.arguments import options_from_args, print_result
from storysync_dist.cli import add_render_arguments

__all__ = ["build_parser", "main", "options_from_args"]

PROG = "render_story"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``storysync render`` plus ``-v``."""
    return job_parser(PROG, "Render a story (StorySync) into a Parquet dataset, on a Ray cluster or in this "
                      "process.", add_render_arguments)


def _main(args: argparse.Namespace) -> int:
    from storysync_dist.api import render_story

    options = options_from_args(args)  # as `storysync render` reads them, --address rule included
    warn_if_driver_only(PROG, args.workers)
    print_result(render_story(args.story, options))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the exit code (0, or 2 for a user error)."""
    return parse_and_run(PROG, _main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
