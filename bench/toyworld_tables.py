"""Table 1, Table 3a and the untested readings on the quality instrument (issue 21), scored by the
oracle (measures only; prints one JSON object, writes it with ``--json``, and the tables section
of ``docs/quality.md`` with ``--markdown``).

    python bench/toyworld_tables.py --suite toyworld --validity out/validity.json --out out/tables

Every row renders the same stories, prompts and seeds with one method and config, through the
public API (one process), and ``storysync eval --metrics oracle`` scores it: identity consistency
(same-identity frame pairs per story), adherence, background leakage. Each cell is the mean over
stories; ``±`` is its standard error over stories, and ``Δ`` is the row's paired difference from
vanilla's identity consistency (story by story) with its standard error.

- **Table 1**: vanilla, storysync, consistory, storydiffusion.
- **Table 3a**: the paper's ablations (``--ablation``): none, no-mask, no-rfh, no-pose.
- **Readings** chosen without evidence so far: ``mask_source`` previous (ours: current),
  ``bli_target`` output (ours: query), no dropout at all, and sharing in the encoder too (with
  previous-step masks: no text attention runs before the encoder's first self-attention).

Choose constants on ``--suite toyworld-tune``; publish ``--suite toyworld``. ``--markdown`` is
refused unless ``--validity`` names a report of ``bench/toyworld_validity.py`` that says the
instrument is valid for the same model: no method number from an invalid instrument.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# name -> (method, ablation, overrides); the table each belongs to.
ROWS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "vanilla": ("vanilla", None, {}),
    "storysync": ("storysync", None, {}),
    "consistory": ("consistory", None, {}),
    "storydiffusion": ("storydiffusion", None, {}),
    "no-mask": ("storysync", "no-mask", {}),
    "no-rfh": ("storysync", "no-rfh", {}),
    "no-pose": ("storysync", "no-pose", {}),
    "mask_source=previous": ("storysync", None, {"mask_source": "previous"}),
    "bli_target=output": ("storysync", None, {"bli_target": "output"}),
    "no dropout": ("storysync", None, {"share_dropout": 0.0, "rfh_dropout": 0.0, "mask_dropout": 0.0}),
    # Sharing from the first attention on leaves no cross-attention before it to make the current
    # step's masks: this row takes the previous step's, so compare it with mask_source=previous.
    "share in encoder too": ("storysync", None, {"share_layers": ["down_blocks", "up_blocks"],
                                                 "mask_source": "previous"}),
}
TABLES = {
    "Table 1": ("vanilla", "storysync", "consistory", "storydiffusion"),
    "Table 3a": ("storysync", "no-mask", "no-rfh", "no-pose"),
    "Readings": ("storysync", "mask_source=previous", "bli_target=output", "no dropout", "share in encoder too"),
}
SCORES = ("identity_consistency", "adherence", "background_leakage")
MARKS = ("<!-- tables:start -->", "<!-- tables:end -->")


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan")
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, math.sqrt(var / len(kept))


def measure(model: str, suite: str, out: pathlib.Path, rows: Sequence[str], limit: int | None,
            steps: int | None) -> dict[str, Any]:
    from bench.toyworld_validity import render_and_score
    from storysync_dist.io.suites import resolve_suite
    from storysync_dist.story import load_benchmark

    stories = load_benchmark(resolve_suite(suite), limit=limit)
    per_story: dict[str, dict[str, dict[str, float]]] = {}
    report: dict[str, Any] = {"model": model, "suite": suite, "stories": len(stories), "steps": steps, "rows": {}}
    for name in rows:
        method, ablation, overrides = ROWS[name]
        scored = render_and_score(stories, model, out, name.replace("=", "-").replace(" ", "-"), method, overrides,
                                  steps, ablation=ablation)
        per_story[name] = {r["story_id"]: r for r in scored["stories"]}
        report["rows"][name] = {"method": method, "ablation": ablation, "overrides": overrides,
                                "render_seconds": scored["render_seconds"]}
        for score in SCORES:
            mean, se = _mean_se([r[score] for r in scored["stories"]])
            report["rows"][name][score] = {"mean": mean, "se": se}
        print(f"{name}: identity {report['rows'][name]['identity_consistency']['mean']:.3f}", file=sys.stderr,
              flush=True)
    if "vanilla" in per_story:
        base = per_story["vanilla"]
        for name in rows:
            diffs = [per_story[name][s]["identity_consistency"] - base[s]["identity_consistency"]
                     for s in base if s in per_story[name]]
            mean, se = _mean_se(diffs)
            report["rows"][name]["identity_gain"] = {"mean": mean, "se": se}
    return report


def _cell(entry: dict[str, float] | None) -> str:
    if entry is None or math.isnan(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.3f}" + ("" if math.isnan(entry["se"]) else f" ± {entry['se']:.3f}")


def markdown(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    lines = [MARKS[0], "", f"Measured {machine.get('date', '?')} on {machine.get('cpu', '?')} by "
             f"`python bench/toyworld_tables.py --suite {report['suite']}`: {report['stories']} stories; mean ± "
             "standard error over stories; Δ is the paired gain in identity consistency over vanilla.", ""]
    for title, names in TABLES.items():
        names = [n for n in names if n in report["rows"]]
        if not names:
            continue
        lines += [f"**{title}**", "", "| row | identity ↑ | Δ identity | adherence ↑ | background leakage ↓ |",
                  "|---|---|---|---|---|"]
        for name in names:
            row = report["rows"][name]
            lines.append(f"| {name} | {_cell(row['identity_consistency'])} | {_cell(row.get('identity_gain'))} | "
                         f"{_cell(row['adherence'])} | {_cell(row['background_leakage'])} |")
        lines.append("")
    lines.append(MARKS[1])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--suite", default="toyworld")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/tables"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path, help="write the tables into this file (needs --validity)")
    parser.add_argument("--validity", type=pathlib.Path, help="bench/toyworld_validity.py's --json report")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}")
    if args.markdown is not None:
        validity = json.loads(args.validity.read_text()) if args.validity and args.validity.is_file() else None
        if validity is None or not validity.get("valid") or validity.get("model") != args.model:
            parser.error("--markdown: the instrument is not shown valid (--validity names no valid report of this "
                         "model); no method number is published from an invalid instrument")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench.report import emit_report, machine_info

    report = {"machine": machine_info(), **measure(args.model, args.suite, args.out, rows, args.limit, args.steps)}
    emit_report(report, args.json, args.markdown, markdown, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
