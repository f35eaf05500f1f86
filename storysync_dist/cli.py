"""The ``storysync`` console script: parse arguments, call the Python API, print where things went.

User errors (bad story file, unknown model, bad option) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .core.config import ABLATIONS
from .errors import RenderError, StorySyncUserError

if TYPE_CHECKING:
    from .engine.job import JobResult, RenderOptions

EXIT_USER_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storysync", description="Consistent-subject story rendering (StorySync).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every frame")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="render a story into a Parquet dataset")
    render.add_argument("story", help="story file (.yaml, .yml or .json)")
    render.add_argument("--model", required=True,
                        help="a preset (tiny-sdxl, tiny-sd, tiny-flux, tiny-kandinsky3, random-sdxl, random-flux), "
                        "a local diffusers folder (SDXL, SD, FLUX.1, Kandinsky 3), or a hub id in the HF cache")
    render.add_argument("--out", required=True, help="output folder or fsspec URL (file://, memory://, s3://, gs://)")
    render.add_argument("--method", choices=["storysync", "vanilla"], default="storysync")
    render.add_argument("--only", help="comma-separated frame ids to render (against the same anchors)")
    render.add_argument("--steps", type=_positive_int,
                        help="denoising steps (overrides the story; default: the story's, else the model's "
                        "stock default, 50 for SDXL and SD)")
    render.add_argument("--height", type=_positive_int,
                        help="image height in pixels (overrides the story; default: the story's, else the "
                        "model's native size, 1024 for SDXL base)")
    render.add_argument("--width", type=_positive_int,
                        help="image width in pixels (overrides the story; default as --height)")
    render.add_argument("--seed", type=_non_negative_int, help="base seed (overrides the story)")
    render.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    render.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on cuda")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="set a StorySync option, e.g. --set rfh_gamma=0.5 (repeatable; beats the story's "
                        "storysync: section and --ablation; options: docs/configuration.md)")
    # Not argparse choices: the engine checks the name, so a wrong one is a one-line error (exit 2)
    # like every other option, not argparse's usage block.
    render.add_argument("--ablation", metavar="{" + ",".join(ABLATIONS) + "}",
                        help="switch one StorySync component off, as the rows of the paper's Table 3a: "
                        "no-mask (sharing without subject masks), no-rfh (no feature harmonization), "
                        "no-pose (no layout interpolation, no dropouts); none is the full method")
    render.add_argument("--replace-config", action="store_true",
                        help="the story's frames in --out were rendered with other settings: render the "
                        "whole story again with these (without it such a run is refused; not with --only)")
    render.add_argument("--anchors", help="reuse an anchor bundle (.safetensors) saved by an earlier job")
    render.add_argument("--save-anchors", action="store_true",
                        help="save the anchor bundle as <out>/anchors/<story>.safetensors")
    render.add_argument("--workers", type=_non_negative_int, default=0,
                        help="Ray frame workers (one pipeline per GPU); 0 renders in this process without Ray")
    render.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    render.add_argument("--dry-run", action="store_true",
                        help="print what a run would render, replace and remove, and write nothing")
    render.add_argument("--start-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                        help="with --workers: how long to wait for the cluster's resources (default 600)")
    add_efficiency_arguments(render)
    render.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_efficiency_arguments(parser: argparse.ArgumentParser) -> None:
    """``--frame-batch``, ``--bundle-on`` and ``--offload`` (``storysync render`` and the jobs)."""
    parser.add_argument("--frame-batch", type=_positive_int, metavar="B",
                        help="render up to B non-anchor frames of a story in one denoiser batch (default: per "
                        "device, see docs/memory.md); each frame keeps its own seed, and its pixels equal its "
                        "batch-of-one render within the documented tolerance")
    # Not argparse choices: the engine checks them, so a wrong one is a one-line error (exit 2).
    parser.add_argument("--bundle-on", default="auto", metavar="{device,host,auto}",
                        help="where a frame worker keeps the anchor bundle: device, host (pinned host memory, "
                        "two steps at a time on the device) or auto (from free device memory; default)")
    parser.add_argument("--offload", default="none", metavar="{none,model}",
                        help="model: diffusers' enable_model_cpu_offload, for small GPUs (the text encoders "
                        "and VAE leave the device while the denoiser runs); default none")


def efficiency_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``RenderOptions`` fields of ``add_efficiency_arguments``."""
    return {"frame_batch": args.frame_batch, "bundle_on": args.bundle_on, "offload": args.offload}


def print_result(result: JobResult) -> None:
    """What ``storysync render`` (and ``jobs/render_story.py``) print when a job is done."""
    if result.dry_run:
        print(f"dry run of story {result.story_id!r} into {result.out}: nothing was written")
        for line in result.notes:
            print(f"  {line}")
        return
    print(f"rendered {len(result.rendered)} frame(s), skipped {len(result.skipped)} already present, "
          f"in {result.seconds:.1f}s")
    if result.replaced:
        print(f"replaced:   {len(result.replaced)} frame(s) stored with other inputs ({', '.join(result.replaced)})")
    if result.removed:
        print(f"removed:    {len(result.removed)} frame(s) no longer in the story ({', '.join(result.removed)})")
    if result.stale:
        print(f"stale:      {len(result.stale)} frame(s) out of date, not selected by --only "
              f"({', '.join(result.stale)})")
    for damaged in result.damaged:
        print(f"set aside:  damaged part file {damaged}")
    for note in result.notes:
        print(f"note:       {note}")
    print(f"dataset:    {result.out}")
    print(f"storyboard: {result.storyboard}")
    print(f"manifest:   {result.manifest}")
    if result.anchor_bundle:
        print(f"anchors:    {result.anchor_bundle}")


def options_from_args(args: argparse.Namespace, **changes: Any) -> RenderOptions:
    """The ``RenderOptions`` of parsed ``storysync render`` arguments (``jobs/render_story.py``
    uses it too, so both read the options the same way); ``changes`` replace fields.

    ``--set`` values are parsed here (YAML scalars, as in a story file); their keys and values are
    checked by the engine. Both give one-line ``StorySyncUserError``s naming the option.
    """
    from .core.config import ConfigError, parse_set_options
    from .engine.job import RenderOptions

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    if args.only is not None and not only:
        raise StorySyncUserError("--only: give at least one frame id")
    try:
        overrides = parse_set_options(args.set_options)
    except ConfigError as exc:
        raise StorySyncUserError(f"--set {exc}") from None
    fields: dict[str, Any] = dict(
        model=args.model, out=args.out, method=args.method, only=only, steps=args.steps,
        height=args.height, width=args.width, seed=args.seed, device=args.device, dtype=args.dtype,
        anchors=args.anchors, save_anchors=args.save_anchors, progress=not args.no_progress,
        workers=args.workers, address=args.address, dry_run=args.dry_run, start_timeout=args.start_timeout,
        ablation=args.ablation, overrides=overrides, replace_config=args.replace_config,
        **efficiency_options(args),
    )
    return RenderOptions(**{**fields, **changes})


def _render(args: argparse.Namespace) -> int:
    from .api import render_story

    print_result(render_story(args.story, options_from_args(args)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "render":
            return _render(args)
    except StorySyncUserError as exc:
        print(f"storysync: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RenderError as exc:
        print(f"storysync: error: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
