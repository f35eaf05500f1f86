"""Planning at the scale of the renders: N frames in one story, or in 10^4 stories, read, planned
and dry-run, against an empty dataset and against one that holds every frame (the rerun case).

One story: a one-subject story of N frames is written (YAML, JSON Lines, Parquet) and a fresh
Python process imports what ``storysync render`` imports, then measures ``load_story`` (parse,
schema, ids, seeds, prompts) and ``render_story(..., dry_run=True)`` (the same load again, the
model checks with tokenization, fingerprints, the look-up of the dataset, the plan, its summary,
the memory estimate).

Many stories: a benchmark suite of S subject sets of N/S settings each (the ConsiStory+ shape) is
written, and the fresh process runs ``jobs/make_dataset.py SUITE --dry-run`` (load, model checks,
one plan per story, totals).

Rerun: a dataset holding every frame of the case, with the fingerprints and config a render
writes, is synthesized in another process (tiny PNGs; rendering 10^6 frames is not the point),
and the dry run is measured again against it: the look-up of what the dataset holds, per story.

Every measured process reports its peak resident set (``VmHWM``, ``storysync_dist.resident``) and the resident set after
the imports. Measures only; prints a markdown table, and ``--json`` writes the rows.

    python bench/planning_benchmark.py --frames 1000,10000,100000
    python bench/planning_benchmark.py --frames 1000000 --formats jsonl,parquet --stories 1,10000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import machine_info, rss_mib
from storysync_dist.resident import peak_resident_bytes

MODEL = "tiny-sdxl"
ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = {"steps": 2, "height": 64, "width": 64}
HEADER = {"id": "long", "style": "A photo of",
          "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
          "defaults": SIZE}


def write_story(folder: pathlib.Path, frames: int, fmt: str) -> pathlib.Path:
    """A one-subject story of ``frames`` frames, as YAML, JSON Lines or Parquet."""
    rows = [{"id": f"f{i}", "prompt": f"{{fox}} in scene number {i}, seen from afar"} for i in range(frames)]
    path = folder / f"long-{frames}.{fmt}"
    if fmt == "jsonl":
        with path.open("w") as handle:
            handle.write(json.dumps(HEADER) + "\n")
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    elif fmt == "parquet":
        from storysync_dist.io.story_table import write_story_table

        write_story_table(str(path), HEADER, rows)
    else:
        import yaml

        path.write_text(yaml.dump({**HEADER, "frames": rows}, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                  sort_keys=False))
    return path


def write_suite(folder: pathlib.Path, stories: int, frames: int) -> pathlib.Path:
    """A benchmark suite of ``stories`` subject sets sharing ``frames`` settings between them."""
    import yaml

    per_story = frames // stories
    sets = [{"concept_token": "fox", "subject": f"A red fox number {k}", "style": "A photo of",
             "settings": [f"in scene number {i}" for i in range(per_story)]} for k in range(stories)]
    path = folder / f"suite-{stories}x{per_story}.yaml"
    path.write_text(yaml.dump({"animals": sets}, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
    return path


def _suite_args(suite: str, out: str) -> list[str]:
    return [suite, "--model", MODEL, "--out", out, "--steps", "2", "--height", "64", "--width", "64"]


def child(case: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: the measurements of one case."""
    start = time.perf_counter()
    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.story import load_story

    sys.path.insert(0, str(ROOT / "jobs"))
    import make_dataset

    imported = time.perf_counter()
    rss_after_imports = rss_mib()
    row: dict[str, Any] = {"imports_s": imported - start, "rss_after_imports_mib": rss_after_imports}
    if case["stories"] == 1:
        frames = len(load_story(case["path"]).frames)  # freed before the dry run: not counted twice
        loaded = time.perf_counter()
        result = render_story(case["path"], RenderOptions(model=MODEL, out=case["out"], progress=False, dry_run=True))
        done = time.perf_counter()
        counts = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].split()[0] for line in result.notes
                  if line.startswith(("render:", "skip:"))}
        assert frames == case["frames"], frames
        row.update(load_s=loaded - imported, dry_run_s=done - loaded, render=int(counts["render"]),
                   skip=int(counts["skip"]))
    else:
        import contextlib
        import io

        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            code = make_dataset.main([*_suite_args(case["path"], case["out"]), "--dry-run", "--no-progress"])
        done = time.perf_counter()
        assert code == 0, text.getvalue()
        lines = {line.strip().split(":", 1)[0]: line.strip().split(":", 1)[1].split()[0]
                 for line in text.getvalue().splitlines() if line.strip().startswith(("render:", "skip:"))}
        row.update(load_s=None, dry_run_s=done - imported, render=int(lines["render"]), skip=int(lines["skip"]))
    row["peak_rss_mib"] = peak_resident_bytes() / 2**20
    return row


def synthesize(case: dict[str, Any]) -> float:
    """Run in a fresh process: write a dataset that holds every frame of the case as a render
    would (fingerprints and config of the plan; 1x1 PNGs). Returns the seconds it took."""
    start = time.perf_counter()
    from PIL import Image

    from storysync_dist.engine.job import RenderOptions, prepare_job
    from storysync_dist.io.sink import FrameRecord, ParquetFrameSink
    from storysync_dist.io.storyboard import png_bytes
    from storysync_dist.story import load_benchmark

    options = RenderOptions(model=MODEL, out=case["out"], progress=False)
    if case["stories"] == 1:
        specs: list[Any] = [case["path"]]
    else:
        specs = load_benchmark(case["path"], defaults=SIZE)
    png = png_bytes(Image.new("RGB", (1, 1)))
    sink = ParquetFrameSink(case["out"])
    for spec in specs:
        plan = prepare_job(spec, options)
        anchors = set(plan.anchor_ids)
        frames = plan.spec.frames
        for first in range(0, len(frames), 50_000):
            sink.write([FrameRecord(
                story_id=plan.spec.id, frame_id=f.id, frame_index=f.index, prompt=f.prompt, seed=f.seed,
                image_png=png, width=64, height=64, model=MODEL, method=options.method, config=plan.config_json,
                is_anchor=f.id in anchors, fingerprint=plan.fingerprints[f.id],
            ) for f in frames[first:first + 50_000]])
        sink.commit_story(plan.spec.id, current=plan.fingerprints)
    return time.perf_counter() - start


def _in_fresh_process(function: str, case: dict[str, Any]) -> Any:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.planning_benchmark import {function}; "
            f"print(json.dumps({function}(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{function}({case}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(frames: int, stories: int, fmt: str, folder: pathlib.Path, rerun: bool) -> list[dict[str, Any]]:
    if stories == 1:
        path = write_story(folder, frames, fmt)
    else:
        path = write_suite(folder, stories, frames)
    out = folder / f"out-{frames}-{stories}-{fmt}"
    case = {"path": str(path), "out": str(out), "frames": frames, "stories": stories}
    base = {"frames": frames, "stories": stories, "format": fmt, "file_mib": path.stat().st_size / 2**20}
    rows = [{**base, "dataset": "empty", **_in_fresh_process("child", case)}]
    assert rows[-1]["render"] == frames and rows[-1]["skip"] == 0, rows[-1]
    if rerun:
        seconds = _in_fresh_process("synthesize", case)
        rows.append({**base, "dataset": "holds every frame", "synthesized_s": seconds,
                     **_in_fresh_process("child", case)})
        assert rows[-1]["render"] == 0 and rows[-1]["skip"] == frames, rows[-1]
    return rows


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| frames | stories | format | dataset | file | load_story | dry run | RSS after imports | peak RSS |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']:,} | {r['stories']:,} | {r['format']} | {r['dataset']} | "
                     f"{r['file_mib']:.1f} MiB | {_s(r['load_s'])} | {_s(r['dry_run_s'])} | "
                     f"{r['rss_after_imports_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="1000,10000,100000", help="comma-separated frame counts")
    parser.add_argument("--stories", default="1,10000",
                        help="comma-separated story counts (each case uses min(stories, frames))")
    parser.add_argument("--formats", default="yaml,jsonl,parquet",
                        help="story file formats of the one-story cases (a suite is YAML)")
    parser.add_argument("--no-rerun", action="store_true", help="skip the dataset that holds every frame")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="planning-") as tmp:
        for frames in (int(x) for x in args.frames.split(",")):
            for stories in sorted({min(int(x), frames) for x in args.stories.split(",")}):
                for fmt in args.formats.split(",") if stories == 1 else ["suite"]:
                    for row in measure(frames, stories, fmt, pathlib.Path(tmp), rerun=not args.no_rerun):
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{MODEL}; {json.dumps(machine_info())}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
