"""The command-line argument layer: ``storysync`` and every ``jobs/*.py`` entrypoint build their
parsers from these groups, read them with :func:`options_from_args`, print with
:func:`print_result` and report errors with :func:`run_command`, so an option is written once.

Each ``add_*`` function adds one group of options; a command takes the groups it needs. Option
values that the engine checks (``--ablation``, ``--bundle-on``, ``--offload``, ``--set`` keys) are
not argparse ``choices``: the engine's one-line error (exit 2) names them like every other input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .core.config import ABLATIONS
from .core.methods import METHODS
from .errors import RenderError, StorySyncUserError
from .interrupts import print_interrupted, signals_interrupt
from .sizes import parse_size

if TYPE_CHECKING:
    from .engine.job import JobResult, RenderOptions
    from .eval.bench import BenchOptions
    from .eval.run import EvalOptions

EXIT_USER_ERROR = 2
MODEL_HELP = ("a preset (tiny-sdxl, tiny-sd, tiny-flux, tiny-kandinsky3, random-sdxl, random-flux), a local "
              "diffusers folder (SDXL, SD, FLUX.1, Kandinsky 3), or a hub id in the HF cache")
OUT_HELP = "output folder or fsspec URL (file://, memory://, s3://, gs://)"


# ---- value types ----------------------------------------------------------------------------------
def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# ---- option groups --------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, *, model_help: str = MODEL_HELP,
                        with_method: bool = True) -> None:
    """``--model``, ``--out``, and ``--method`` unless ``with_method`` is False."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--out", required=True, help=OUT_HELP)
    parser.add_argument("--scheduler", metavar="NAME",
                        help="a diffusers scheduler class for the pipeline, built from the pipeline's own scheduler "
                        "config, e.g. DPMSolverMultistepScheduler (default: the model's; docs/configuration.md)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", dest="loras",
                        help="a LoRA adapter (.safetensors, loaded with diffusers' load_lora_weights) and its "
                        "scale, default 1.0 (repeatable)")
    if not with_method:
        return
    parser.add_argument("--method", choices=list(METHODS), default="storysync",
                        help="storysync (default); vanilla (stock generation); consistory or storydiffusion "
                        "(baselines re-implemented from their papers, docs/evaluation.md)")


def add_suite_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--height``, ``--width``, ``--seed`` of a benchmark prompt suite: they become
    every story's defaults (``story.load_benchmark``)."""
    parser.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's, 50 for SDXL)")
    parser.add_argument("--height", type=positive_int, help="image height in pixels (default: the model's native size)")
    parser.add_argument("--width", type=positive_int, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--seed", type=non_negative_int, help="base seed: frame i of every story gets seed + i (default 0)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``."""
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="default on cuda: the model family's (float16; bfloat16 for FLUX.1), float32 elsewhere")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, ``--ablation``, ``--replace-config``: the StorySync config of the job."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="set a StorySync option, e.g. --set rfh_gamma=0.5 (repeatable; beats the story's "
                        "storysync: section and --ablation; options: docs/configuration.md)")
    parser.add_argument("--ablation", metavar="{" + ",".join(ABLATIONS) + "}",
                        help="switch one StorySync component off, as the rows of the paper's Table 3a: "
                        "no-mask (sharing without subject masks), no-rfh (no feature harmonization), "
                        "no-pose (no layout interpolation, no dropouts); none is the full method")
    parser.add_argument("--replace-config", action="store_true",
                        help="frames in --out were rendered with other settings: render them again with these "
                        "(without it such a run is refused; not with --only)")


def add_efficiency_arguments(parser: argparse.ArgumentParser) -> None:
    """``--frame-batch``, ``--bundle-on`` and ``--offload`` (docs/memory.md)."""
    parser.add_argument("--frame-batch", type=positive_int, metavar="B",
                        help="render up to B non-anchor frames of a story in one denoiser batch (default 1; "
                        "see docs/memory.md); each frame keeps its own seed, and its pixels equal its "
                        "batch-of-one render within the documented tolerance")
    parser.add_argument("--bundle-on", default="auto", metavar="{device,host,auto}",
                        help="where a frame worker keeps the anchor bundle: device, host (pinned host memory, "
                        "two steps at a time on the device) or auto (from free device memory; default)")
    parser.add_argument("--offload", default="none", metavar="{none,model}",
                        help="model: for small GPUs, the denoiser stays on the device and the text encoders "
                        "and VAE visit it (diffusers' enable_model_cpu_offload); default none")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N``, ``--address [ADDR]`` and ``--start-timeout``."""
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="Ray FrameWorker actors, one GPU each (one CPU each with --device cpu or on a cluster "
                        "without GPUs; 0: render in this process, without Ray)")
    parser.add_argument("--address", nargs="?", const="auto", default=None,
                        help="Ray cluster to join; bare --address means 'auto' (the cluster running on this node); "
                        "default: RAY_ADDRESS (set by `ray job submit`), else an embedded local Ray")
    parser.add_argument("--start-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                        help="with --workers: how long to wait for the cluster's resources (default 600)")


def byte_size(text: str) -> int:
    """argparse type: a size in bytes (``8589934592``, ``8G``, ``512MiB``)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_ray_start_arguments(parser: argparse.ArgumentParser) -> None:
    """``--object-store-memory`` and ``--spill-dir``: for the Ray a job starts itself."""
    parser.add_argument("--object-store-memory", type=byte_size, metavar="SIZE",
                        help="with --workers and no cluster to join: the object store of the Ray this job starts "
                        "(bytes, or 64G, 512MiB; default: Ray's, 30%% of RAM); the anchor steps of every open "
                        "story live there. A cluster you join sets it with `ray start --object-store-memory`")
    parser.add_argument("--spill-dir", metavar="DIR",
                        help="with --workers and no cluster to join: where that Ray spills objects that do not fit "
                        "its store (a local folder; default: Ray's, under its temp dir)")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics``, ``--weights``, ``--encoders``: what ``storysync eval`` and ``bench`` score with."""
    parser.add_argument("--metrics", help="comma-separated metrics (default: clip-t,clip-i,dino,lpips,dreamsim; "
                        "also: oracle, toyworld renders only, no weights)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="DIR",
                        help="folder of the metric weights (layout: docs/evaluation.md); default: the Hugging "
                        "Face cache, never a download")
    source.add_argument("--encoders", choices=["random-tiny"],
                        help="random-tiny: tiny randomly initialised encoders, offline; every output is labelled "
                        "a plumbing check")


def split_list(text: str | None, option: str) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None; a list with nothing in it is a one-line error."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise StorySyncUserError(f"{option}: give at least one value")
    return items


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose``."""
    parser.add_argument("-v", "--verbose", action="store_true", help="log every frame")


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` and ``--log-every``: a bar on a terminal, plain lines elsewhere."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no progress lines")
    parser.add_argument("--log-every", type=positive_float, default=10.0, metavar="SECONDS",
                        help="when stderr is not a terminal (ray job logs, CI, a redirected file): one plain "
                        "progress line every SECONDS (default 10); a terminal keeps the bar")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """``--force``: skip the peak-memory check made before anything renders (docs/memory.md)."""
    parser.add_argument("--force", action="store_true",
                        help="render even when the estimated peak memory per worker exceeds the device's free "
                        "memory (docs/memory.md)")


def resolve_address(address: str | None) -> str | None:
    """The address to hand to ``RenderOptions.address``.

    Under ``ray job submit`` RAY_ADDRESS is set and Ray joins that cluster by itself, so a bare
    ``--address`` ("auto") is dropped there; it is only passed on when RAY_ADDRESS is unset (a driver
    started by hand on a cluster node). An explicit address is always passed on.
    """
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        return None
    return address


def parse_loras(values: Sequence[str]) -> list[tuple[str, float]]:
    """``["a.safetensors", "b.safetensors:0.5"]`` -> ``[("a.safetensors", 1.0), ("b.safetensors", 0.5)]``.

    The scale is what follows the last ``:`` when it is a number, so a path with a colon in it
    (``s3://...``, ``C:\\...``) keeps its colon; a bad scale is a one-line error naming ``--lora``.
    """
    loras: list[tuple[str, float]] = []
    for value in values:
        path, scale = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head and "/" not in tail and "\\" not in tail:
            try:
                scale = float(tail)
            except ValueError:
                raise StorySyncUserError(f"--lora {value}: {tail!r} is not a scale (PATH[:SCALE])") from None
            path = head
        if not path:
            raise StorySyncUserError(f"--lora {value!r}: give a path (PATH[:SCALE])")
        loras.append((path, scale))
    return loras


# ---- reading and printing -------------------------------------------------------------------------
def _given(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def options_from_args(args: argparse.Namespace, **changes: Any) -> RenderOptions:
    """The ``RenderOptions`` of parsed arguments (whichever groups the command has; the others
    keep their defaults); ``changes`` replace fields.

    ``--set`` values are parsed here (YAML scalars, as in a story file); their keys and values are
    checked by the engine. Both give one-line ``StorySyncUserError``s naming the option.
    """
    from .core.config import ConfigError, parse_set_options
    from .engine.job import RenderOptions

    raw_only = _given(args, "only")
    only = [x.strip() for x in raw_only.split(",") if x.strip()] if raw_only else None
    if raw_only is not None and not only:
        raise StorySyncUserError("--only: give at least one frame id")
    try:
        overrides = parse_set_options(_given(args, "set_options", []) or [])
    except ConfigError as exc:
        raise StorySyncUserError(f"--set {exc}") from None
    fields: dict[str, Any] = dict(
        model=args.model, out=args.out, method=_given(args, "method", "storysync"), only=only,
        steps=_given(args, "steps"), height=_given(args, "height"), width=_given(args, "width"),
        seed=_given(args, "seed"), device=_given(args, "device"), dtype=_given(args, "dtype"),
        anchors=_given(args, "anchors"), save_anchors=bool(_given(args, "save_anchors", False)),
        progress=not _given(args, "no_progress", False), workers=_given(args, "workers", 0),
        address=resolve_address(_given(args, "address")), dry_run=bool(_given(args, "dry_run", False)),
        start_timeout=_given(args, "start_timeout", 600.0), ablation=_given(args, "ablation"),
        overrides=overrides, replace_config=bool(_given(args, "replace_config", False)),
        frame_batch=_given(args, "frame_batch"), bundle_on=_given(args, "bundle_on", "auto"),
        offload=_given(args, "offload", "none"), scheduler=_given(args, "scheduler"),
        loras=parse_loras(_given(args, "loras", []) or []), force=bool(_given(args, "force", False)),
        log_every=_given(args, "log_every", 10.0), object_store_memory=_given(args, "object_store_memory"),
        spill_dir=_given(args, "spill_dir"),
    )
    return RenderOptions(**{**fields, **changes})


def eval_options_from_args(args: argparse.Namespace, **changes: Any) -> EvalOptions:
    """The ``EvalOptions`` of ``storysync eval``'s arguments (``dataset`` and ``out`` may be
    replaced through ``changes``, as ``bench`` does per method)."""
    from .eval.run import EvalOptions

    fields: dict[str, Any] = dict(
        dataset=_given(args, "dataset"), out=_given(args, "out"), metrics=split_list(_given(args, "metrics"), "--metrics"),
        weights=_given(args, "weights"), encoders=_given(args, "encoders"), workers=_given(args, "workers", 0),
        address=resolve_address(_given(args, "address")), device=_given(args, "device"),
        progress=not _given(args, "no_progress", False), log_every=_given(args, "log_every", 10.0),
    )
    return EvalOptions(**{**fields, **changes})


def bench_options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The ``BenchOptions`` of ``storysync bench`` (and ``jobs/benchmark.py``)."""
    from .eval.bench import BenchOptions

    return BenchOptions(
        suite=args.suite, limit=args.limit, categories=split_list(args.category, "--category"),
        methods=split_list(args.methods, "--methods") or [], seed=args.seed,
        render=options_from_args(args, method="storysync"),
        scoring=eval_options_from_args(args, dataset="", out=None, device=None),
    )


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


def run_command(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Set up logging and run ``body(args)``: a user error prints one line and returns 2, a render
    error (the job ran and failed) one line and 1, SIGINT or SIGTERM one line and 130 or 143
    (``interrupts``: what is complete is kept, and a rerun finishes the job)."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        with signals_interrupt():
            try:
                return body(args)
            except KeyboardInterrupt as exc:  # an Interrupted, or Ray's own for one (interrupts.py)
                return print_interrupted(prog, exc)
    except StorySyncUserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RenderError as exc:
        if exc.__cause__ is not None:  # a worker's exception and its remote traceback: with -v only
            logging.getLogger("storysync").info("the cause:\n%s", "".join(traceback.format_exception(exc.__cause__)))
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def parse_and_run(prog: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
                  argv: Sequence[str] | None) -> int:
    """Parse ``argv`` with ``parser`` and :func:`run_command` ``body``."""
    return run_command(prog, body, parser.parse_args(argv))
