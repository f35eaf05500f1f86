"""The driver over a long render: its resident memory and per-frame time as the frames pile up.

One story of N frames (default 10^4; tiny-sdxl, 64 px, 2 steps, the plumbing scale) renders on a
local Ray with ``--workers`` CPU workers. On the driver, ``on_frame`` samples the driver's own
resident set (``VmRSS``) and the wall clock every ``--every`` frames. Reports RSS after the first
500 frames, when the last frame is written, and after the job (its last compaction, storyboard
and manifest), and the end's ratio to the first (the budget of issue 20 is <= 1.2), the median seconds
per frame over the first and the last 500, and prints every sample with ``--samples``. Measures
only.

    python bench/long_render_benchmark.py --frames 10000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import itertools

from bench.report import machine_info, rss_mib

MODEL = "tiny-sdxl"
WINDOW = 500


def write_story(folder: pathlib.Path, frames: int, size: int, steps: int) -> pathlib.Path:
    header = {"id": "long-render", "style": "A photo of",
              "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
              "defaults": {"steps": steps, "height": size, "width": size}}
    path = folder / "long-render.jsonl"
    with path.open("w") as handle:
        handle.write(json.dumps(header) + "\n")
        for i in range(frames):
            handle.write(json.dumps({"id": f"f{i:06d}", "prompt": f"{{fox}} in scene number {i}"}) + "\n")
    return path


def measure(frames: int, workers: int, size: int, steps: int, every: int, folder: pathlib.Path) -> dict[str, Any]:
    from storysync_dist.api import RenderOptions, render_story

    story = write_story(folder, frames, size, steps)
    samples: list[tuple[int, float, float]] = []  # (frames done, seconds since the first frame, RSS MiB)
    times: list[float] = []
    start: list[float] = []

    def on_frame(_output: Any) -> None:
        now = time.perf_counter()
        if not start:
            start.append(now)
        times.append(now)
        if len(times) % every == 0 or len(times) == WINDOW:
            samples.append((len(times), now - start[0], rss_mib()))

    began = time.perf_counter()
    result = render_story(str(story), RenderOptions(model=MODEL, out=str(folder / "out"), workers=workers,
                                                    progress=False), on_frame=on_frame)
    wall = time.perf_counter() - began
    last_frame = samples[-1][2] if samples and samples[-1][0] == len(times) else rss_mib()
    samples.append((len(times), times[-1] - start[0], rss_mib()))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    after_window = next(rss for done, _, rss in samples if done >= WINDOW)
    return {
        "frames": frames, "workers": workers, "size": size, "steps": steps,
        "rendered": len(result.rendered), "wall_s": wall,
        "rss_after_500_mib": after_window, "rss_last_frame_mib": last_frame, "rss_end_mib": samples[-1][2],
        "rss_peak_sampled_mib": max(rss for _, _, rss in samples),
        "end_over_500": samples[-1][2] / after_window,
        "median_s_per_frame_first_500": statistics.median(gaps[:WINDOW]),
        "median_s_per_frame_last_500": statistics.median(gaps[-WINDOW:]),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--every", type=int, default=250, help="sample the RSS every this many frames")
    parser.add_argument("--samples", action="store_true", help="print every (frames, seconds, RSS) sample")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.frames < 2 * WINDOW:
        parser.error(f"--frames must be at least {2 * WINDOW}")
    with tempfile.TemporaryDirectory(prefix="long-render-") as tmp:
        row = measure(args.frames, args.workers, args.size, args.steps, args.every, pathlib.Path(tmp))
    machine = machine_info()
    summary = {k: v for k, v in row.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.samples:
        for done, seconds, rss in row["samples"]:
            print(f"{done:>8} frames  {seconds:8.1f} s  {rss:7.0f} MiB")
    print(f"{MODEL}; {json.dumps(machine)}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({**row, "machine": machine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
