"""Benchmarks of storysync-dist on this machine, written as a markdown section.

    python -m bench.run [--quick] [--out docs/benchmarks.md] [--sections abcdef]

Sections (DESIGN.md, "Budgets"):
  a. per-frame wall time and peak RSS against story length (tiny-sdxl, in-process);
  b. bytes of anchor state per step and per frame, against a full-precision, all-token K/V stream;
  c. StorySync / vanilla per-frame time at real model size (random-sdxl) and on tiny-sdxl;
  d. throughput with 1 and 2 Ray workers, and time from job start to the first frame;
  e. a long story on 2 Ray workers, end to end;
  f. many short stories (a dataset) on 2 Ray workers: actors per story against a pooled executor.
Where CUDA is present, the GPU mode follows (``bench/gpu_benchmark.py``: float16/bfloat16 at
1024 px, peak device memory per bundle placement and offload, frames per second per frame batch).

Every measurement runs in a fresh child process (``--child``): peak RSS of a process only grows,
and a 14 GB model must not stay resident while the next section runs. The machine is noisy, so
the numbers that matter are ratios taken within one run (interleaved repeats in c). Nothing is
written that was not measured; a section that could not run says "not measured" and why.
The generated section replaces the one between the markers in ``--out``; text outside stays.
This file only measures; ``bench/run_report.py`` turns the measurements into its tables, and
``bench/report.py`` is the layer every benchmark shares (machine, formatting, the marked file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from bench import report as shared
from bench.report import REPO, _loadavg, machine_info
from bench.run_report import END_MARK, FULL, PAPER_STEPS, QUICK, START_MARK, Plan, Report, render_markdown

__all__ = ["END_MARK", "FULL", "PAPER_STEPS", "QUICK", "START_MARK", "Plan", "Report", "main", "render_markdown",
           "report_from_json", "run", "write_report"]

RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------- helpers
def write_story(
    folder: pathlib.Path, frames: int, *, size: int, steps: int, guidance: float, story_id: str | None = None
) -> pathlib.Path:
    """A one-subject story ("cat") of ``frames`` scenes; the first two frames are the anchors."""
    story_id = story_id or f"bench-{frames}"
    lines = [
        f"id: {story_id}",
        'style: "A watercolor illustration of"',
        "subjects:",
        '  - {name: cat, description: "a small ginger cat with a blue scarf", tokens: ["cat"]}',
        f"defaults: {{steps: {steps}, height: {size}, width: {size}, guidance_scale: {guidance}, seed: 0}}",
        "frames:",
    ]
    lines += [f'  - {{id: f{k:04d}, prompt: "{{cat}} in scene {k}"}}' for k in range(frames)]
    path = folder / f"story-{story_id}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def current_rss() -> int | None:
    """Resident set size of this process now (bytes), from /proc; None where there is none."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``storysync_dist.resident``: not
    ``ru_maxrss``, which a child inherits from its parent)."""
    from storysync_dist.resident import peak_resident_bytes

    return peak_resident_bytes()


def bundle_stats(bundle: Any, guidance: bool) -> dict[str, Any]:
    """Bytes of an anchor bundle, and what a full-precision, all-token K+V stream would be.

    The full stream sends, per published step and shared layer, K and V (2 tensors) for every
    token of every anchor (A x N), at the attention's inner width, in float32 (4 bytes), for both
    guidance branches. The bundle sends input hidden states and RFH features of the subject tokens
    only, in the config's anchor dtype, plus their int64 indices.
    """
    anchors = bundle.num_anchors
    branches = 2 if guidance else 1
    steps = sorted(bundle.steps)
    full = tokens_all = tokens_sent = 0
    layers: set[str] = set()
    index_bytes = 0
    dtype = None
    for t in steps:
        for name, layer in bundle.steps[t].layers.items():
            layers.add(name)
            inner = int(layer.features.shape[-1])
            full += 2 * anchors * layer.num_tokens * inner * 4 * branches
            tokens_all += anchors * layer.num_tokens
            tokens_sent += int(layer.index.numel())
            index_bytes += layer.index.numel() * layer.index.element_size()
            dtype = str(layer.hidden.dtype).removeprefix("torch.")
    total = int(bundle.nbytes())
    return {
        "steps_total": int(bundle.meta["steps"]),
        "steps_published": len(steps),
        "shared_layers": len(layers),
        "anchors": anchors,
        "dtype": dtype,
        "bytes": total,
        "index_bytes": int(index_bytes),
        "full_kv_fp32_bytes": int(full),
        "subject_token_fraction": tokens_sent / tokens_all if tokens_all else 0.0,
    }


def run_child(name: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``--child name`` in a fresh interpreter; its result, or {"error": ...}."""
    cmd = [sys.executable, "-m", "bench.run", "--child", name, "--args", json.dumps(args)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"child {name} ran past {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"child {name} exited with {proc.returncode}: {tail}"}


# ----------------------------------------------------------------------------- children (measure)
def child_story(frames: int, size: int, steps: int, guidance: float, model: str = "tiny-sdxl") -> dict[str, Any]:
    """Section a/b: render a story in this process (workers=0) through the job API."""
    import fsspec

    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.core.anchors import AnchorBundle

    emits: list[dict[str, Any]] = []
    rss_at: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="storysync-bench-") as tmp:
        story = write_story(pathlib.Path(tmp), frames, size=size, steps=steps, guidance=guidance)
        start = time.perf_counter()

        def on_frame(output: Any) -> None:
            emits.append({"id": output.job.frame_id, "anchor": output.is_anchor,
                          "t": time.perf_counter() - start, "cpu": time.process_time(),
                          "render_s": output.seconds})
            non_anchor = sum(1 for e in emits if not e["anchor"])
            if non_anchor == 1:
                rss_at["first_frame"] = current_rss()

        options = RenderOptions(model=model, out=str(pathlib.Path(tmp) / "out"), progress=False,
                                save_anchors=True, workers=0)
        result = render_story(str(story), options, on_frame=on_frame)
        rss_at["end"] = current_rss()
        with fsspec.open(result.anchor_bundle, "rb") as handle:
            bundle = AnchorBundle.from_bytes(handle.read())
    return {
        "frames": frames,
        "emits": emits,
        "job_seconds": result.seconds,
        "peak_rss": peak_rss(),
        "rss_first_frame": rss_at.get("first_frame"),
        "rss_end": rss_at.get("end"),
        "bundle": bundle_stats(bundle, guidance > 1.0),
    }


def child_ratio(
    model: str, size: int, steps: int, repeats: int, guidance: float, warmup: bool = True
) -> dict[str, Any]:
    """Section c: one vanilla frame and one StorySync frame, interleaved, after the anchors."""
    import torch

    from storysync_dist.api import RenderOptions
    from storysync_dist.core.config import StorySyncConfig
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.engine.renderer import StoryRenderer
    from storysync_dist.models.presets import load_pipeline
    from storysync_dist.models.registry import adapter_for

    rss_before = current_rss()
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    build_seconds = time.perf_counter() - t0
    rss_model = current_rss()
    params = sum(p.numel() for part in pipe.components.values() if isinstance(part, torch.nn.Module)
                 for p in part.parameters())
    with tempfile.TemporaryDirectory(prefix="storysync-bench-") as tmp:
        story = write_story(pathlib.Path(tmp), 2 + repeats, size=size, steps=steps, guidance=guidance)
        plan = prepare_job(str(story), RenderOptions(model=model, out=str(pathlib.Path(tmp) / "out"),
                                                     progress=False), pipe=pipe)
    adapter = adapter_for(pipe)
    storysync = StoryRenderer(adapter, plan.config, plan.settings)
    vanilla = StoryRenderer(adapter, StorySyncConfig.vanilla(), plan.settings)

    t0 = time.perf_counter()
    _, bundle = storysync.render_anchors(plan.anchor_jobs)
    anchor_seconds = time.perf_counter() - t0

    def timed(renderer: StoryRenderer, job: Any, anchor_bundle: Any) -> dict[str, Any]:
        marks: list[tuple[float, float]] = []

        def mark(i: int) -> None:
            marks.append((time.perf_counter(), time.process_time()))

        start, cpu_start = time.perf_counter(), time.process_time()
        renderer.render_frame(job, anchor_bundle, mark)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        # Step 0's interval also holds the prompt encoding, so per-step times start at step 1.
        return {"total": total, "cpu": cpu,
                "steps": [b[0] - a[0] for a, b in itertools.pairwise(marks)],
                "cpu_steps": [b[1] - a[1] for a, b in itertools.pairwise(marks)]}

    # One untimed frame of each kind first: the first call with a new batch shape pays one-time
    # kernel setup (seconds on the tiny model), which is not per-frame cost.
    if warmup:
        vanilla.render_frame(plan.frame_jobs[0], None)
        storysync.render_frame(plan.frame_jobs[0], bundle)
    pairs = []
    for r in range(repeats):
        job = plan.frame_jobs[r % len(plan.frame_jobs)]
        v = timed(vanilla, job, None)
        s = timed(storysync, job, bundle)
        pairs.append({"vanilla": v, "storysync": s})
    bli = plan.config.bli_steps(steps)
    return {
        "model": model,
        "size": size,
        "steps": steps,
        "bli_steps": bli,
        "first_share_step": plan.config.first_shared_step(),
        "params": params,
        "build_seconds": build_seconds,
        "rss_before_model": rss_before,
        "rss_with_model": rss_model,
        "anchor_seconds": anchor_seconds,
        "pairs": pairs,
        "peak_rss": peak_rss(),
        "threads": torch.get_num_threads(),
        "bundle": bundle_stats(bundle, guidance > 1.0),
    }


def child_ray(
    frames: int, workers: list[int], long_frames: int, long_workers: int, size: int, steps: int,
    guidance: float, sections: str, pool_stories: int = 0, pool_frames: int = 0,
) -> dict[str, Any]:
    """Sections d/e/f: render stories through the Ray path (``RenderOptions(workers=W)``)."""
    from storysync_dist.api import RenderOptions, render_story

    out: dict[str, Any] = {"runs": []}
    try:
        from storysync_dist.distributed.cluster import connect
    except ImportError as exc:
        return {"error": f"no Ray executor to call ({exc})"}
    t0 = time.perf_counter()
    # One embedded Ray for every run, sized for the largest; its start is timed on its own.
    connect(None, max([*workers, long_workers]))
    out["ray_start_seconds"] = time.perf_counter() - t0
    todo = [(frames, w, "d") for w in workers if "d" in sections]
    if "e" in sections:
        todo.append((long_frames, long_workers, "e"))
    with tempfile.TemporaryDirectory(prefix="storysync-bench-") as tmp:
        for n, w, section in todo:
            story = write_story(pathlib.Path(tmp), n, size=size, steps=steps, guidance=guidance)
            emits: list[dict[str, Any]] = []
            start = time.perf_counter()

            def on_frame(output: Any, start: float = start, emits: list = emits) -> None:
                emits.append({"id": output.job.frame_id, "anchor": output.is_anchor,
                              "t": time.perf_counter() - start})

            options = RenderOptions(model="tiny-sdxl", out=str(pathlib.Path(tmp) / f"out-{section}-{w}"),
                                    progress=False, workers=w)
            try:
                result = render_story(str(story), options, on_frame=on_frame)
            except Exception as exc:  # one failed run must not hide the others
                out["runs"].append({"section": section, "frames": n, "workers": w,
                                    "error": f"{type(exc).__name__}: {exc}"})
                continue
            wall = time.perf_counter() - start
            out["runs"].append({"section": section, "frames": n, "workers": w, "wall": wall,
                                "emits": emits, "stats": _plain(result.stats)})
        if "f" in sections:
            out["pool"] = _pool_runs(pathlib.Path(tmp), pool_stories, pool_frames, long_workers,
                                     size=size, steps=steps, guidance=guidance)
    return out


def _pool_runs(
    folder: pathlib.Path, stories: int, frames: int, workers: int, *, size: int, steps: int, guidance: float
) -> list[dict[str, Any]]:
    """Section f: the same stories rendered with actors started per story, then with one pool."""
    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.distributed.executor import RayExecutor

    paths = [write_story(folder, frames, size=size, steps=steps, guidance=guidance, story_id=f"pool-{k:02d}")
             for k in range(stories)]
    runs = []
    for mode in ("per-story", "pooled"):
        options = RenderOptions(model="tiny-sdxl", out=str(folder / f"out-f-{mode}"), progress=False,
                                workers=workers)
        start = time.perf_counter()
        per_story = []
        try:
            if mode == "pooled":
                with RayExecutor(options) as executor:
                    for path in paths:
                        t = time.perf_counter()
                        render_story(str(path), options, executor=executor)
                        per_story.append(time.perf_counter() - t)
            else:
                for path in paths:
                    t = time.perf_counter()
                    render_story(str(path), options)
                    per_story.append(time.perf_counter() - t)
        except Exception as exc:  # one failed mode must not hide the other
            runs.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            continue
        runs.append({"mode": mode, "stories": stories, "frames": frames, "workers": workers,
                     "wall": time.perf_counter() - start, "per_story": per_story})
    return runs


def _plain(value: Any) -> Any:
    """JSON-safe copy of a stats dict."""
    return json.loads(json.dumps(value, default=str))


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "story": child_story,
    "ratio": child_ratio,
    "ray": child_ray,
}


def write_report(path: pathlib.Path, section: str) -> None:
    """Replace this benchmark's generated section of ``path`` (between its markers)."""
    shared.write_report(path, section, (START_MARK, END_MARK))


# ---------------------------------------------------------------------------------------- the run
def run(plan: Plan, *, quick: bool, sections: str, log: Callable[[str], None] = print) -> Report:
    """Run the selected sections, each measurement in a child process."""
    report = Report(plan=plan, quick=quick, sections=sections, machine=machine_info())
    common = {"size": plan.size, "steps": plan.steps, "guidance": plan.guidance}
    if "a" in sections or "b" in sections:
        lengths = plan.lengths if "a" in sections else plan.lengths[:1]
        for frames in lengths:
            log(f"[a] {frames}-frame story in-process ...")
            result = run_child("story", {"frames": frames, **common}, timeout=3600)
            result.setdefault("frames", frames)
            report.stories.append(result)
            log(f"[a] {frames} frames: {result.get('error') or 'done'}")
    if "c" in sections or "b" in sections:
        for model, size, steps, repeats in plan.ratio_runs:
            log(f"[c] {model} {size}x{size}, {steps} steps, {repeats} interleaved pairs ...")
            result = run_child("ratio", {"model": model, "size": size, "steps": steps, "repeats": repeats,
                                         "guidance": plan.guidance, "warmup": plan.warmup}, timeout=3600)
            result.setdefault("model", model)
            report.ratios.append(result)
            log(f"[c] {model}: {result.get('error') or 'done'}")
        if quick:
            report.notes["c:random-sdxl"] = "--quick runs tiny-sdxl only"
    if "d" in sections or "e" in sections or "f" in sections:
        log("[d/e/f] Ray runs ...")
        report.ray = run_child("ray", {"frames": plan.ray_frames, "workers": list(plan.ray_workers),
                                       "long_frames": plan.long_frames, "long_workers": plan.long_workers,
                                       "pool_stories": plan.pool_stories, "pool_frames": plan.pool_frames,
                                       "sections": sections, **common}, timeout=3600)
        log(f"[d/e/f] {report.ray.get('error') or 'done'}")
    report.machine["load_end"] = _loadavg()
    for s in "abcdef":
        if s not in sections:
            report.notes.setdefault(s, f"section not selected (--sections {sections})")
    return report


def report_from_json(data: dict[str, Any]) -> Report:
    """Inverse of the ``--json`` dump."""
    plan = Plan(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                   for k, v in data["plan"].items()})
    return Report(**{**data, "plan": plan})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    parser.add_argument("--sections", default="abcdef", help="which sections to run (default: abcdef)")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--from-json", default=None,
                        help="rewrite --out from measurements saved with --json, without measuring")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](**json.loads(args.args))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.from_json:
        report = report_from_json(json.loads(pathlib.Path(args.from_json).read_text(encoding="utf-8")))
        write_report(pathlib.Path(args.out), render_markdown(report))
        print(f"wrote {args.out}")
        return 0
    sections = "".join(s for s in "abcdef" if s in args.sections)
    if not sections:
        parser.error("--sections: choose from a, b, c, d, e, f")
    report = run(QUICK if args.quick else FULL, quick=args.quick, sections=sections)
    write_report(pathlib.Path(args.out), render_markdown(report))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(asdict(report), indent=1, default=str), encoding="utf-8")
    print(f"wrote {args.out}")
    import torch

    if torch.cuda.is_available() and not args.quick:
        # The GPU mode (bench/gpu_benchmark.py): fp16/bf16 at 1024 px, memory, frame batches.
        from bench import gpu_benchmark

        return gpu_benchmark.main(["--out", args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
