"""What the ``jobs/*.py`` entrypoints share: cluster options, number parsing, user-error handling.

The entrypoints run as ``python jobs/<name>.py`` (by hand or under ``ray job submit``), so this
folder is ``sys.path[0]`` and they import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from storysync_dist.errors import StorySyncUserError

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` and ``--address [ADDR]`` (plus ``-v``), the options every job takes."""
    parser.add_argument(
        "--workers", type=non_negative_int, default=0,
        help="Ray FrameWorker actors, one GPU each (one CPU each with --device cpu or on a cluster without "
        "GPUs; 0: render in this process, without Ray)",
    )
    parser.add_argument(
        "--address", nargs="?", const="auto", default=None,
        help="Ray cluster to join; bare --address means 'auto' (the cluster running on this node). "
        "Not needed under `ray job submit`, which sets RAY_ADDRESS",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every frame")


def resolve_address(address: str | None) -> str | None:
    """The address to hand to ``RenderOptions.address``.

    Under ``ray job submit`` RAY_ADDRESS is set and Ray joins that cluster by itself, so a bare
    ``--address`` ("auto") is dropped there; it is only passed on when RAY_ADDRESS is unset (a driver
    started by hand on a cluster node). An explicit address is always passed on.
    """
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        return None
    return address


def warn_if_driver_only(prog: str, workers: int) -> None:
    """Under ``ray job submit`` with ``--workers 0`` the whole job renders in the driver process,
    usually on the head node and without a GPU: say so, since it is rarely what was meant."""
    if workers == 0 and os.environ.get("RAY_ADDRESS"):
        print(f"{prog}: note: --workers 0 renders in this driver process, not on the cluster's GPUs; "
              "pass --workers N to use N GPU workers", file=sys.stderr)


def run(prog: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None) -> int:
    """Parse ``argv``, set up logging, run ``body``; a user error prints one line and returns 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return body(args)
    except StorySyncUserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
