"""What the ``jobs/*.py`` entrypoints share beyond the argument layer of
``storysync_dist.arguments`` (re-exported here): the note for a driver-only run.

The entrypoints run as ``python jobs/<name>.py`` (by hand or under ``ray job submit``), so this
folder is ``sys.path[0]`` and they import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from storysync_dist.arguments import (
    EXIT_USER_ERROR,
    add_cluster_arguments,
    add_logging_arguments,
    non_negative_int,
    parse_and_run,
    positive_int,
    resolve_address,
)

__all__ = [
    "EXIT_USER_ERROR",
    "add_cluster_arguments",
    "add_logging_arguments",
    "job_parser",
    "non_negative_int",
    "parse_and_run",
    "positive_int",
    "resolve_address",
    "warn_if_driver_only",
]


def job_parser(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None]
               ) -> argparse.ArgumentParser:
    """The parser of ``jobs/<prog>.py``: a CLI command's options (``add_arguments``) plus ``-v``."""
    parser = argparse.ArgumentParser(prog=f"jobs/{prog}.py", description=description)
    add_arguments(parser)
    add_logging_arguments(parser)
    return parser


def warn_if_driver_only(prog: str, workers: int) -> None:
    """Under ``ray job submit`` with ``--workers 0`` the whole job renders in the driver process,
    usually on the head node and without a GPU: say so, since it is rarely what was meant."""
    if workers == 0 and os.environ.get("RAY_ADDRESS"):
        print(f"{prog}: note: --workers 0 renders in this driver process, not on the cluster's GPUs; "
              "pass --workers N to use N GPU workers", file=sys.stderr)
