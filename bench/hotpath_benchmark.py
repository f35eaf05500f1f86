"""The hot path of one non-anchor frame (issue 23 item 8; measures only; prints one JSON object,
and writes it with ``--json``).

    python bench/hotpath_benchmark.py --json hotpath.json     # random-sdxl, random-flux-narrow, 256 px, 4 steps
    python bench/hotpath_benchmark.py --quick                 # tiny-sdxl, tiny-flux, 64 px, 2 steps (CI)

1. **Op census** (``bench/op_census.py``): the aten ops of one StorySync frame and of one vanilla
   frame (same model, size, steps, prompt and seed), by phase (before the first denoising step,
   each step, after the last), and the ops that would make the host wait for a CUDA device, per
   kind, per attention layer call and per call site; the same census of the anchors' render (whose
   publish may wait once per step), and the most waits in any one step of each (``sync_ops_per_step``).
   The frame reads its bundle through a
   ``PlacedBundle`` (``--bundle-on auto``, which is ``device`` on a CPU), as the engine does.
   ``random-flux`` (FLUX.1-dev, 11.9B transformer parameters: about 48 GB in float32, 24 GB in
   bfloat16) does not fit this machine's memory, so the full run counts ``random-flux-narrow``:
   every block, layer and attention call of FLUX.1-dev (19 double, 38 single blocks, T5-XXL's 24
   layers, CLIP's 12, the same VAE levels), with every width shrunk. The number of ops does not
   depend on the widths; ``random-sdxl-narrow`` (the same shrinking of SDXL) is counted beside
   ``random-sdxl`` to check that on a model that fits.
2. **Frame time**: one frame of each (vanilla; StorySync with the bundle on ``device`` and on
   ``host``), timed without the census, with the time of each denoising step and the time spent
   in ``PlacedBundle.step`` inside the frame.
3. **Bundle bookkeeping micro-run**: ``PlacedBundle.step(t)`` called once per shared layer per
   step, as ``StorySyncState.anchor_layer`` calls it, for 50 steps, two frames of a story in turn,
   on synthetic anchor steps of realistic token counts: 2 anchors, 30 % of each layer's patches
   subject tokens, float16, both guidance branches for SDXL (36 decoder layers at 1024 px: 30 of
   1024 patches x 1280 channels, 6 of 4096 x 640) and one for FLUX (38 single blocks of 4096
   patches; channels cut to 64, so the host placement's copies stay small on a CPU; the
   bookkeeping never reads the values). Bookkeeping = the time in ``step`` minus the time in its
   tensor copies (``_copy_step``, which a GPU queues on a side stream).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.methods_benchmark import ANCHORS, write_story
from bench.op_census import Census
from bench.report import machine_info, print_json

BOOK_STEPS = 50  # the budget is per frame at 50 steps
SUBJECT_SHARE = 0.3  # section b of docs/benchmarks.md measured 28 % subject tokens on random-sdxl
NUM_ANCHORS = 2
# (patches N, channels C, guidance branches G) of each shared layer at 1024 px.
MICRO_SHAPES: dict[str, list[tuple[int, int, int]]] = {
    "sdxl-1024": [(1024, 1280, 2)] * 30 + [(4096, 640, 2)] * 6,
    "flux-1024 (64 channels)": [(4096, 64, 1)] * 38,
}
QUICK_MICRO_SHAPES: dict[str, list[tuple[int, int, int]]] = {"tiny-sdxl-64": [(64, 64, 2)] * 6}


@dataclasses.dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    size: int
    steps: int
    micro: dict[str, list[tuple[int, int, int]]]


FULL = Plan(("random-sdxl", "random-sdxl-narrow", "random-flux-narrow"), 256, 4, MICRO_SHAPES)
QUICK = Plan(("tiny-sdxl", "tiny-flux"), 64, 2, QUICK_MICRO_SHAPES)


# ---- models -------------------------------------------------------------------------------------
def _narrow_components(base: str) -> dict[str, dict[str, Any]]:
    """``base``'s component configs with every layer, block and head count kept and every width
    shrunk (what an op count does not depend on)."""
    from storysync_dist.models.presets import PRESETS

    comps = {k: dict(v) for k, v in PRESETS[base].components.items()}
    vae = comps["vae"]
    vae["block_out_channels"] = [32] * len(vae["block_out_channels"])
    if base == "random-sdxl":
        for role in ("text_encoder", "text_encoder_2"):
            comps[role].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64)
        comps["unet"].update(block_out_channels=[40, 80, 160], norm_num_groups=8, cross_attention_dim=128,
                             addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64)
    else:  # random-flux: head dim 128 stays (RoPE's axes sum to it); one head instead of 24
        comps["text_encoder"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64)
        comps["text_encoder_2"].update(d_model=64, d_kv=16, d_ff=128, num_heads=4)
        comps["transformer"].update(num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=64)
    return comps


def load(model: str) -> tuple[Any, str]:
    """The pipeline (float32, CPU) and the model name the job is planned with."""
    import torch

    from storysync_dist.models.presets import PRESETS, load_pipeline

    if not model.endswith("-narrow"):
        return load_pipeline(model, device="cpu", dtype=torch.float32), model
    base = model.removesuffix("-narrow")
    preset = dataclasses.replace(PRESETS[base], name=model, components=_narrow_components(base))
    pipe = preset.build_in_memory("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, base


def _attention_layers(pipe: Any) -> dict[str, Any]:
    return {f"{role}.{name}": module for role, part in pipe.components.items() if hasattr(part, "named_modules")
            for name, module in part.named_modules() if hasattr(module, "processor")}


# ---- the census and the frame times -------------------------------------------------------------
def _summary(census: Census, steps: int) -> dict[str, Any]:
    profiles: dict[str, dict[str, Any]] = {}
    for layer, kinds in sorted(census.sync_by_layer.items()):
        calls = census.layer_calls.get(layer, 0)
        per_call = {k: v / calls for k, v in sorted(kinds.items())} if calls else dict(kinds)
        group = profiles.setdefault(json.dumps(per_call, sort_keys=True),
                                    {"layers": 0, "first": layer, "calls_per_layer": calls, "per_call": per_call})
        group["layers"] += 1
    return {
        "aten_ops": census.total,
        "aten_ops_by_phase": dict(census.ops_by_phase),
        "device_aten_ops": census.device_ops,
        "device_aten_ops_by_phase": dict(census.device_ops_by_phase),
        "top_aten_ops": dict(census.ops.most_common(12)),
        "sync_ops": dict(sorted(census.sync.items())),
        "sync_ops_all_tensors": dict(sorted(census.sync_all.items())),
        "queued_copies": dict(census.queued_copies),
        "sync_ops_by_phase": {p: dict(k) for p, k in census.sync_by_phase.items()},
        "sync_ops_per_layer_call": sorted(profiles.values(), key=lambda g: -g["layers"]),
        "sync_sites": {site: dict(k) for site, k in sorted(census.sync_sites.items(), key=lambda s: -sum(s[1].values()))},
        "attention_layer_calls": sum(census.layer_calls.values()),
        "steps": steps,
    }


def _most_per_step(summary: dict[str, Any]) -> int:
    """The most ops that would wait for the device in any one denoising step."""
    return max((sum(kinds.values()) for phase, kinds in summary["sync_ops_by_phase"].items()
                if phase.startswith("step ")), default=0)


def _timed_frame(renderer: Any, job: Any, bundle: Any) -> dict[str, Any]:
    """Wall time of one frame, each step's interval, and the time in ``PlacedBundle.step``."""
    stamps: list[float] = []
    in_step = [0.0, 0]
    if bundle is not None:
        original = bundle.step

        def timed(t: int) -> Any:
            start = time.perf_counter()
            try:
                return original(t)
            finally:
                in_step[0] += time.perf_counter() - start
                in_step[1] += 1

        bundle.step = timed  # this instance only
    start = time.perf_counter()
    renderer.render_frame(job, bundle, lambda i: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    return {"seconds": wall, "step_seconds": steps[1:] or steps, "bundle_step_seconds": in_step[0],
            "bundle_step_calls": in_step[1]}


def measure_model(model: str, size: int, steps: int) -> dict[str, Any]:
    from storysync_dist.api import RenderOptions
    from storysync_dist.core.residency import PlacedBundle
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.engine.renderer import StoryRenderer
    from storysync_dist.models.registry import adapter_for

    t0 = time.perf_counter()
    pipe, planned_as = load(model)
    load_seconds = time.perf_counter() - t0
    adapter = adapter_for(pipe)
    modules = {k: v for k, v in pipe.components.items() if hasattr(v, "parameters")}
    denoiser = pipe.components.get("unet") or pipe.components["transformer"]
    layers = _attention_layers(pipe)
    out: dict[str, Any] = {"model": model, "planned_as": planned_as, "size": size, "steps": steps,
                           "dtype": "float32", "load_seconds": load_seconds}
    with tempfile.TemporaryDirectory(prefix="storysync-hotpath-") as tmp:
        story = write_story(pathlib.Path(tmp), 2 + 3, steps, size)
        for method in ("vanilla", "storysync"):
            plan = prepare_job(story, RenderOptions(model=planned_as, out=str(pathlib.Path(tmp) / method),
                                                    method=method, progress=False), pipe=pipe)
            renderer = StoryRenderer(adapter, plan.config, plan.settings)
            bundle = None
            if plan.anchor_jobs:
                anchors = Census(modules, layers, denoiser)
                with anchors.counting():
                    _, bundle = renderer.render_anchors(plan.anchor_jobs, on_step=anchors.on_step)
                out["anchors"] = _summary(anchors, steps)
                out["bundle_bytes"] = int(bundle.nbytes())
            jobs = [j for j in plan.frame_jobs if j.frame_id not in ANCHORS]
            census = Census(modules, layers, denoiser)
            placed = PlacedBundle(bundle, adapter.device, "auto") if bundle is not None else None
            with census.counting():
                renderer.render_frame(jobs[0], placed, census.on_step)
            out[method] = _summary(census, steps)
            # Timed without the census (the census's frame also warmed this batch shape up).
            for placement in ("device", "host") if bundle is not None else ("none",):
                placed = PlacedBundle(bundle, adapter.device, placement) if bundle is not None else None
                out.setdefault("frames", {})[f"{method}" if bundle is None else f"{method}_{placement}"] = \
                    _timed_frame(renderer, jobs[1], placed)
            print(f"{model} {method}: done after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


# ---- the bookkeeping micro-run ------------------------------------------------------------------
def synthetic_bundle(shapes: list[tuple[int, int, int]], steps: int) -> Any:
    """``steps`` anchor steps over one set of layer tensors (the same tensors at every step: the
    bookkeeping counts them per step all the same, and the host keeps one copy)."""
    import torch

    from storysync_dist.core.anchors import AnchorBundle, AnchorStep, SharedLayerState

    gen = torch.Generator().manual_seed(0)
    layers = {}
    for k, (n, c, g) in enumerate(shapes):
        m = round(SUBJECT_SHARE * NUM_ANCHORS * n)
        index = torch.randperm(NUM_ANCHORS * n, generator=gen)[:m].sort().values
        layers[f"layer{k}"] = SharedLayerState(index, torch.randn(g, m, c, generator=gen).half(),
                                               torch.randn(g, m, c, generator=gen).half(), n)
    bundle = AnchorBundle(meta={"num_anchors": NUM_ANCHORS, "steps": steps})
    for t in range(steps):
        bundle.steps[t] = AnchorStep(t, dict(layers))
    return bundle


def micro_run(shapes: list[tuple[int, int, int]], placement: str, frames: int = 2,
              residency: Any = None) -> dict[str, Any]:
    """Two frames of a story reading a 50-step bundle through one ``PlacedBundle`` of
    ``residency`` (the module; default ``storysync_dist.core.residency``).

    Each step's reads are timed together; the time in ``_copy_step`` inside them is the copies',
    and the time in ``PinnedRing.get`` (the ``host`` placement's fetch into a staging buffer, or the
    wait for the ring's thread doing it; a copy too, off the render thread on a GPU while a step's
    kernels run, and with no kernels to hide behind here) is reported as ``staging_seconds``.
    The copies are also held for 3 steps, so the memory of a dropped one goes back (to the OS, on
    a CPU; to the caching allocator, on a GPU) outside the timed reads: ``release_seconds``."""
    if residency is None:
        from storysync_dist.core import residency

    bundle = synthetic_bundle(shapes, BOOK_STEPS)
    placed = residency.PlacedBundle(bundle, "cpu", placement)
    copying = [0.0]
    held: collections.deque[tuple[int, Any]] = collections.deque()
    original = residency._copy_step
    clock = [0]

    def timed_copy(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            copied = original(*args, **kwargs)
            held.append((clock[0], copied))
            return copied
        finally:
            copying[0] += time.perf_counter() - start

    ring = getattr(residency, "PinnedRing", None)  # the host placement's staging (a later residency)
    original_get = ring.get if ring is not None else None
    staging = [0.0]

    def timed_get(self: Any, t: int) -> Any:
        start = time.perf_counter()
        try:
            return original_get(self, t)
        finally:
            staging[0] += time.perf_counter() - start

    residency._copy_step = timed_copy
    if ring is not None:
        ring.get = timed_get
    rows = []
    try:
        for _ in range(frames):
            copied, staged, total, release = copying[0], staging[0], 0.0, 0.0
            for t in range(BOOK_STEPS):
                start = time.perf_counter()
                for _layer in range(len(shapes)):
                    placed.step(t)
                total += time.perf_counter() - start
                clock[0] += 1
                start = time.perf_counter()
                while held and held[0][0] <= clock[0] - 3:
                    held.popleft()
                release += time.perf_counter() - start
            copy, stage = copying[0] - copied, staging[0] - staged
            rows.append({"step_seconds": total, "copy_seconds": copy, "staging_seconds": stage,
                         "release_seconds": release, "bookkeeping_seconds": total - copy - stage})
    finally:
        residency._copy_step = original
        if ring is not None:
            ring.get = original_get
        held.clear()
    return {"placement": placed.placement, "steps": BOOK_STEPS, "layers": len(shapes),
            "calls_per_frame": BOOK_STEPS * len(shapes), "step_bytes": bundle.steps[0].nbytes(),
            "peak_resident_steps": placed.peak_resident_steps, "frames": rows,
            "bookkeeping_seconds_per_frame": max(r["bookkeeping_seconds"] for r in rows)}


def baseline_ab(path: pathlib.Path, shapes: list[tuple[int, int, int]], rounds: int = 3) -> dict[str, Any]:
    """The micro-run of another ``core/residency.py`` (e.g. ``git show HEAD:storysync_dist/core/residency.py``)
    and of the working tree's, interleaved in this process, ``rounds`` times each."""
    import importlib.util

    from storysync_dist.core import residency as current

    spec = importlib.util.spec_from_file_location("storysync_dist.core._residency_baseline", path)
    assert spec is not None and spec.loader is not None
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"baseline": {}, "current": {}}
    for _ in range(rounds):
        for name, module in (("baseline", baseline), ("current", current)):
            for placement in ("device", "host"):
                runs[name].setdefault(placement, []).append(micro_run(shapes, placement, residency=module))
    return {"baseline": str(path), "rounds": rounds, **{
        name: {p: {"median_bookkeeping_seconds_per_frame": statistics.median(
                       r["bookkeeping_seconds_per_frame"] for r in rs), "runs": [r["frames"] for r in rs]}
               for p, rs in by.items()} for name, by in runs.items()}}


# ---- the report ---------------------------------------------------------------------------------
def budget(book: dict[str, float], frames: dict[str, Any]) -> dict[str, Any]:
    """Bookkeeping per 50-step frame against 1 % of a 50-step frame estimated as 50 x the fastest
    measured denoising step of the same run's StorySync frame with that placement (a lower bound
    of the frame: no text encoding, decoding or BLI's extra branch), so the share is an upper bound."""
    out = {}
    for placement, seconds in book.items():
        frame = frames.get(f"storysync_{placement}")
        if frame is None:
            continue
        estimate = BOOK_STEPS * min(frame["step_seconds"])
        out[placement] = {"bookkeeping_seconds": seconds, "frame_50_steps_seconds_lower_bound": estimate,
                          "share": seconds / estimate, "met": seconds <= 0.01 * estimate,
                          "frame_seconds_it_would_need": seconds / 0.01}
    return out


def run(plan: Plan, quick: bool, threads: int = 1, baseline: pathlib.Path | None = None) -> dict[str, Any]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(plan, quick, baseline)
    finally:
        torch.set_num_threads(before)


def _run(plan: Plan, quick: bool, baseline: pathlib.Path | None) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"machine": machine_info(), "quick": quick, "size": plan.size, "steps": plan.steps,
                              "threads": torch.get_num_threads()}
    models = {}
    for m in plan.models:
        models[m] = measure_model(m, plan.size, plan.steps)
        gc.collect()  # the previous pipeline goes before the next loads
    report["aten_ops_per_frame"] = {m: r["storysync"]["aten_ops"] for m, r in models.items()}
    report["vanilla_aten_ops_per_frame"] = {m: r["vanilla"]["aten_ops"] for m, r in models.items()}
    # The ops a GPU would launch (bench/op_census.py): the budget's proxy without the host work.
    report["device_aten_ops_per_frame"] = {m: r["storysync"]["device_aten_ops"] for m, r in models.items()}
    report["vanilla_device_aten_ops_per_frame"] = {m: r["vanilla"]["device_aten_ops"] for m, r in models.items()}
    report["sync_ops_per_frame"] = {m: r["storysync"]["sync_ops"] for m, r in models.items()}
    report["vanilla_sync_ops_per_frame"] = {m: r["vanilla"]["sync_ops"] for m, r in models.items()}
    # The budgets: none per layer per step, at most 1 per step for a frame and for the anchors.
    report["sync_ops_per_step"] = {m: {who: _most_per_step(r[who]) for who in ("storysync", "anchors")}
                                   for m, r in models.items()}
    micro = {name: {p: micro_run(shapes, p) for p in ("device", "host")} for name, shapes in plan.micro.items()}
    first = next(iter(micro))
    report["bookkeeping_seconds_per_frame"] = {p: r["bookkeeping_seconds_per_frame"] for p, r in micro[first].items()}
    report["bookkeeping_micro_run"] = micro
    report["bookkeeping_budget"] = {"micro_run": first, "model": plan.models[0],
                                    **budget(report["bookkeeping_seconds_per_frame"], models[plan.models[0]]["frames"])}
    if baseline is not None:
        report["bookkeeping_baseline_ab"] = {first: baseline_ab(baseline, plan.micro[first])}
    report["models"] = models
    report["machine"]["load_end"] = f"{__import__('os').getloadavg()[0]:.2f}"
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, 64 px, 2 steps (seconds)")
    parser.add_argument("--models", help="comma-separated models to count (default: the plan's)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-CPU machine two threads made a tiny-sdxl "
                             "frame 160x slower, spinning against the other work)")
    parser.add_argument("--baseline-residency", type=pathlib.Path, metavar="FILE",
                        help="also time this copy of core/residency.py in the micro-run, interleaved with the "
                             "working tree's (git show REV:storysync_dist/core/residency.py > FILE)")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(
        plan, models=tuple(args.models.split(",")) if args.models else plan.models,
        size=args.size or plan.size, steps=args.steps or plan.steps)
    report = run(plan, args.quick, args.threads, args.baseline_residency)
    print_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
