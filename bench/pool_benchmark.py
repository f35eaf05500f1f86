"""Pool utilisation across many short stories, and time to the first non-anchor frame, on a local
Ray with CPU workers (measures only; prints one JSON object, and writes it with ``--json``).

    python bench/pool_benchmark.py --stories 12 --frames 4 --workers 2 --steps 10 --size 128

Utilisation is rendering seconds over workers x wall, after start-up: the pool is started and
warmed with a one-frame story first, then the wall clock runs from handing over the stories to the
last story's result. Rendering seconds are the ``render_seconds`` the workers wrote for every row
(an anchor row holds its share of the anchor batch), less the seconds frames spent blocked on
anchor steps not yet published (``wait_seconds`` of the workers' stats, where the code reports it).

The script also runs against an older checkout (``PYTHONPATH=<old tree> python bench/pool_benchmark.py``):
without ``render_stories`` it renders the stories one after another on one pooled executor, as
``jobs/make_dataset.py`` did, and takes the anchors' first step time from ``on_anchor_object``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import print_json


def write_story(folder: pathlib.Path, story_id: str, frames: int, steps: int, size: int) -> str:
    story = {
        "id": story_id,
        "subjects": [{"name": "fox", "description": "a red fox", "tokens": ["fox"]}],
        "defaults": {"steps": steps, "height": size, "width": size, "seed": 7},
        "frames": [{"id": f"f{k}", "prompt": f"{{fox}} in place number {k}"} for k in range(frames)],
    }
    path = folder / f"{story_id}.yaml"
    path.write_text(yaml.safe_dump(story))
    return str(path)


def dataset_rows(out: pathlib.Path) -> list[dict[str, Any]]:
    import pyarrow.dataset as ds

    table = ds.dataset(out / "data", format="parquet").to_table(columns=["story_id", "frame_id", "is_anchor",
                                                                         "render_seconds"])
    return table.to_pylist()


def _waits(stats: list[dict]) -> float:
    return sum(s.get("wait_seconds", 0.0) for s in stats if s)


def _busy(stats: list[dict]) -> float | None:
    values = [s.get("busy_seconds") for s in stats if s]
    return sum(values) if values and all(v is not None for v in values) else None


def measure_pool(folder: pathlib.Path, stories: int, frames: int, workers: int, steps: int, size: int) -> dict:
    from storysync_dist import api
    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.distributed.executor import RayExecutor

    paths = [write_story(folder, f"story-{i:03d}", frames, steps, size) for i in range(stories)]
    out = folder / "pool"
    options = RenderOptions(model="tiny-sdxl", out=str(out), workers=workers, device="cpu", progress=False)
    with RayExecutor(options) as executor:
        warm = render_story(write_story(folder, "warm-up", 1, 1, size), options, executor=executor)
        waited_before = _waits(warm.stats.get("worker_stats", []))
        busy_before = _busy(warm.stats.get("worker_stats", []))
        start = time.perf_counter()
        if hasattr(api, "render_stories"):
            results = list(api.render_stories(paths, options, executor=executor))
        else:
            results = [render_story(path, options, executor=executor) for path in paths]
        wall = time.perf_counter() - start
    last = max(results, key=lambda r: r.seconds)
    final_stats = results[-1].stats.get("worker_stats", [])
    waited = _waits(final_stats) - waited_before
    busy_after = _busy(final_stats)
    # Where the workers report it: seconds inside render calls (rendering plus PNG encoding and
    # anchor-step transfers), less the seconds blocked on anchor steps.
    busy = None if busy_after is None or busy_before is None else busy_after - busy_before - waited
    rows = [r for r in dataset_rows(out) if r["story_id"] != "warm-up"]
    rendering = sum(r["render_seconds"] for r in rows) - waited
    return {
        "stories": stories, "frames_per_story": frames, "workers": workers, "steps": steps, "size": size,
        "frames": len(rows), "wall_seconds": wall, "render_seconds": rendering, "wait_seconds": waited,
        "utilisation": rendering / (workers * wall), "slowest_story_seconds": last.seconds,
        "busy_seconds": busy, "busy_utilisation": None if busy is None else busy / (workers * wall),
        "mode": "render_stories" if hasattr(api, "render_stories") else "render_story loop",
    }


def measure_first_frame(folder: pathlib.Path, frames: int, workers: int, steps: int, size: int) -> dict:
    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.distributed.executor import RayExecutor

    story = write_story(folder, "first-frame", frames, steps, size)
    out = folder / "first"
    options = RenderOptions(model="tiny-sdxl", out=str(out), workers=workers, device="cpu", progress=False)
    marks: dict[str, float] = {}

    def on_frame(output: Any) -> None:
        if not output.is_anchor and "first_non_anchor" not in marks:
            marks["first_non_anchor"] = time.perf_counter()

    def on_event(kind: str, info: dict) -> None:  # the pool scheduler's events
        if kind == "anchor_step" and info["step"] == 0:
            marks.setdefault("anchor_step_0", time.perf_counter())

    def on_anchor_object(index: int) -> None:  # the older executor's hook
        if index == 0:
            marks.setdefault("anchor_step_0", time.perf_counter())

    try:
        executor = RayExecutor(options, on_event=on_event)
    except TypeError:
        executor = RayExecutor(options)
        executor.on_anchor_object = on_anchor_object
    with executor:
        render_story(write_story(folder, "warm-up", 1, 1, size), options, executor=executor)
        marks.clear()
        start = time.perf_counter()
        result = render_story(story, options, executor=executor, on_frame=on_frame)
        end = time.perf_counter()
    rows = [r for r in dataset_rows(out) if r["story_id"] == "first-frame"]
    frame_seconds = statistics.median(r["render_seconds"] for r in rows if not r["is_anchor"])
    anchor_seconds = sum(r["render_seconds"] for r in rows if r["is_anchor"])
    step0 = marks["anchor_step_0"] - start
    first = marks["first_non_anchor"] - start
    return {
        "frames": frames, "workers": workers, "steps": steps, "size": size, "story_seconds": end - start,
        "anchor_step_0_seconds": step0, "first_non_anchor_seconds": first, "after_step_0_seconds": first - step0,
        "anchor_render_seconds": anchor_seconds, "median_frame_render_seconds": frame_seconds,
        "rendered": len(result.rendered),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=12)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--first-frame-frames", type=int, default=6)
    parser.add_argument("--first-frame-steps", type=int, default=20)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)

    import ray

    import storysync_dist

    ray.init(address="local", num_cpus=args.workers + 1, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        report = {
            "code": os.path.dirname(storysync_dist.__file__),
            "cpus": os.cpu_count(),
            "pool": measure_pool(folder, args.stories, args.frames, args.workers, args.steps, args.size),
            "first_frame": measure_first_frame(folder, args.first_frame_frames, args.workers,
                                               args.first_frame_steps, args.size),
        }
    ray.shutdown()
    print_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
