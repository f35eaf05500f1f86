"""Planning at the scale of the renders: a one-story file of N frames, read, planned and dry-run.

For each N a story of N frames is written (YAML and JSON Lines), then a fresh Python process
imports what ``storysync render`` imports, and measures, in that order: ``load_story`` (parse,
schema, ids, seeds, prompts), ``render_story(..., dry_run=True)`` (the same load again, the model
checks with tokenization, fingerprints, the look-up of the dataset, the plan, its summary, the
memory estimate), and its peak resident set (``ru_maxrss``) and the resident set after the imports.
Measures only; prints a markdown table, and ``--json`` writes the rows.

    python bench/planning_benchmark.py --frames 1000,10000,100000
    python bench/planning_benchmark.py --frames 1000000 --formats jsonl   # minutes, and GBs

Not measured yet (issue 20): 10^4 stories at once, the plan against a dataset that already holds
the frames (the rerun case), and the driver's memory over a long render.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import machine_info

MODEL = "tiny-sdxl"


def write_story(folder: pathlib.Path, frames: int, fmt: str) -> pathlib.Path:
    """A one-subject story of ``frames`` frames, as YAML or JSON Lines."""
    header = {"id": "long", "style": "A photo of",
              "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
              "defaults": {"steps": 2, "height": 64, "width": 64}}
    rows = [{"id": f"f{i}", "prompt": f"{{fox}} in scene number {i}, seen from afar"} for i in range(frames)]
    path = folder / f"long-{frames}.{fmt}"
    if fmt == "jsonl":
        with path.open("w") as handle:
            handle.write(json.dumps(header) + "\n")
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    else:
        import yaml

        path.write_text(yaml.dump({**header, "frames": rows}, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                  sort_keys=False))
    return path


def child(story: str, out: str) -> dict[str, Any]:
    """Run in a fresh process: the measurements of one story file."""
    start = time.perf_counter()
    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.spec import load_story

    imported = time.perf_counter()
    rss_after_imports = _rss_kib()
    spec = load_story(story)
    loaded = time.perf_counter()
    result = render_story(story, RenderOptions(model=MODEL, out=out, progress=False, dry_run=True))
    done = time.perf_counter()
    assert any(line.startswith(f"render:  {len(spec.frames)} ") for line in result.notes), result.notes
    return {"imports_s": imported - start, "load_s": loaded - imported, "dry_run_s": done - loaded,
            "rss_after_imports_mib": rss_after_imports / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _rss_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(frames: int, fmt: str, folder: pathlib.Path) -> dict[str, Any]:
    story = write_story(folder, frames, fmt)
    out = folder / f"out-{frames}-{fmt}"
    root = str(pathlib.Path(__file__).resolve().parents[1])
    code = (f"import json, sys; sys.path.insert(0, {root!r}); from bench.planning_benchmark import child; "
            f"print(json.dumps(child({str(story)!r}, {str(out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"frames": frames, "format": fmt, "file_mib": story.stat().st_size / 2**20, **row}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| frames | format | file | load_story | dry run (load, check, plan, summary) | load + dry run | "
             "RSS after imports | peak RSS |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']:,} | {r['format']} | {r['file_mib']:.1f} MiB | {r['load_s']:.2f} s | "
                     f"{r['dry_run_s']:.2f} s | {r['load_s'] + r['dry_run_s']:.2f} s | "
                     f"{r['rss_after_imports_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="1000,10000,100000", help="comma-separated frame counts")
    parser.add_argument("--formats", default="yaml,jsonl", help="comma-separated: yaml, jsonl")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="planning-") as tmp:
        for frames in (int(x) for x in args.frames.split(",")):
            for fmt in args.formats.split(","):
                rows.append(measure(frames, fmt, pathlib.Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{MODEL}; {json.dumps(machine_info())}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
