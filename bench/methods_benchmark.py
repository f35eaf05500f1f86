"""Per-frame cost of every ``--method`` against stock generation, on one model, in one process
(measures only; prints one JSON object, and writes it with ``--json``).

    python bench/methods_benchmark.py --model random-sdxl --size 256 --steps 5 --repeats 3

For each method the anchors render first (their batch is timed, not counted in the frame time),
then one untimed frame (the first call with a new batch shape pays one-time kernel setup). Then,
``--repeats`` times, one frame of every method, interleaved in the same order (vanilla, storysync,
consistory, storydiffusion, vanilla, ...), the same prompt and seed each round. The numbers to
read are each method's median over rounds of its frame time divided by vanilla's in the same round
(wall clock and this process's CPU time), and the bytes of its anchor bundle, which every worker
pulls once per story.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

METHODS = ("vanilla", "storysync", "consistory", "storydiffusion")
ANCHORS = ("f0", "f1")  # a story without an anchors: list anchors its first two frames


def write_story(folder: pathlib.Path, frames: int, steps: int, size: int) -> str:
    import yaml

    story = {
        "id": "methods",
        "style": "A watercolor illustration of",
        "subjects": [{"name": "cat", "description": "a small ginger cat with a blue scarf", "tokens": ["cat"]}],
        "defaults": {"steps": steps, "height": size, "width": size, "guidance_scale": 5.0, "seed": 0},
        "frames": [{"id": f"f{k}", "prompt": f"{{cat}} in scene {k}"} for k in range(frames)],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def measure(model: str, size: int, steps: int, repeats: int) -> dict[str, Any]:
    import torch

    from storysync_dist.api import RenderOptions
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.engine.renderer import StoryRenderer
    from storysync_dist.models.presets import load_pipeline
    from storysync_dist.models.registry import adapter_for

    t0 = time.perf_counter()
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    load_seconds = time.perf_counter() - t0
    adapter = adapter_for(pipe)
    renderers: dict[str, tuple[StoryRenderer, Any, list]] = {}
    anchors: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="storysync-bench-") as tmp:
        story = write_story(pathlib.Path(tmp), 2 + repeats, steps, size)
        for method in METHODS:
            plan = prepare_job(story, RenderOptions(model=model, out=str(pathlib.Path(tmp) / method), method=method,
                                                    progress=False), pipe=pipe)
            renderer = StoryRenderer(adapter, plan.config, plan.settings)
            bundle = None
            if plan.anchor_jobs:
                assert tuple(plan.anchor_ids) == ANCHORS, plan.anchor_ids
                start = time.perf_counter()
                _, bundle = renderer.render_anchors(plan.anchor_jobs)
                anchors[method] = {"seconds": time.perf_counter() - start, "bundle_bytes": int(bundle.nbytes())}
            # The same non-anchor frames for every method (vanilla has no anchors: it would list them).
            jobs = [j for j in plan.frame_jobs if j.frame_id not in ANCHORS]
            renderer.render_frame(jobs[0], bundle)  # untimed: one-time setup of this batch shape
            renderers[method] = (renderer, bundle, jobs)
            print(f"{method}: ready after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rounds = []
    for r in range(repeats):
        row = {}
        for method in METHODS:
            renderer, bundle, jobs = renderers[method]
            start, cpu = time.perf_counter(), time.process_time()
            renderer.render_frame(jobs[r % len(jobs)], bundle)
            row[method] = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
        rounds.append(row)
        print(f"round {r + 1}/{repeats} done after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    ratios = {
        method: {
            kind: statistics.median(row[method][kind] / row["vanilla"][kind] for row in rounds)
            for kind in ("wall", "cpu")
        }
        for method in METHODS
    }
    return {
        "model": model, "size": size, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
        "load_seconds": load_seconds, "anchors": anchors, "rounds": rounds, "ratio_to_vanilla": ratios,
        "median_frame_seconds": {m: statistics.median(row[m]["wall"] for row in rounds) for m in METHODS},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-sdxl")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench.report import machine_info, print_json

    report = {"machine": machine_info(), **measure(args.model, args.size, args.steps, args.repeats)}
    print_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
