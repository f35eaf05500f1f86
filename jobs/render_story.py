"""Ray job entrypoint: render one story into a Parquet dataset.

    ray job submit --working-dir . -- python jobs/render_story.py examples/story.yaml \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --out s3://bucket/stories/cat --workers 8

The options are those of ``storysync render`` plus ``--workers`` and ``--address``. Under
``ray job submit`` RAY_ADDRESS is set, so the job joins the cluster it was submitted to. A user
error (bad story, unknown model, bad option) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from _common import add_cluster_arguments, resolve_address, run, warn_if_driver_only

from storysync_dist.cli import build_parser as build_cli_parser
from storysync_dist.cli import options_from_args, print_result

PROG = "render_story"


def _render_subparser() -> argparse.ArgumentParser:
    # argparse has no public accessor for a sub-parser; reusing `storysync render`'s keeps the
    # options of the job and of the CLI the same as the CLI grows.
    for action in build_cli_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["render"]
    raise RuntimeError("storysync_dist.cli.build_parser() has no 'render' command")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``storysync render`` plus ``--workers``/``--address``/``-v``."""
    parser = argparse.ArgumentParser(
        prog="jobs/render_story.py",
        description="Render a story (StorySync) into a Parquet dataset, on a Ray cluster or in this process.",
        parents=[_render_subparser()],
        add_help=False,  # the parent's -h/--help is inherited
        # "resolve": our --workers/--address win should the CLI grow options of the same name.
        conflict_handler="resolve",
    )
    add_cluster_arguments(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    from storysync_dist.api import render_story

    # The same reading of the options as `storysync render` (--set, --ablation, --replace-config, ...),
    # with this job's --address rule.
    options = options_from_args(args, address=resolve_address(args.address))
    warn_if_driver_only(PROG, args.workers)
    print_result(render_story(args.story, options))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the exit code (0, or 2 for a user error)."""
    return run(PROG, _main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
