"""The benchmark's report: one row per method (the mean over stories), a Markdown table in the
layout of the StorySync paper's Table 1, and the prompt-adherence / subject-similarity plot that
ConsiStory and StorySync draw (CLIP-T on x, a subject metric on y, one point per method).

A run with random-tiny encoders is a plumbing check: its table and plot say so in their title.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["bench_rows", "plot_adherence", "table_markdown"]

PLUMBING = ("PLUMBING CHECK: random weights (random-tiny encoders, or a tiny/random model preset); these "
            "numbers test that the pipeline runs end to end and say nothing about quality.")
# How the paper names the methods in Table 1.
DISPLAY = {"vanilla": "Vanilla", "storysync": "StorySync", "consistory": "ConsiStory", "storydiffusion": "StoryDiffusion"}
# Table 1's columns, and DINO after them; the arrow says which way is better.
COLUMNS = (("clip-t", "CLIP-T ↑"), ("clip-i", "CLIP-I ↑"), ("lpips", "LPIPS ↓"), ("dreamsim", "DreamSim ↓"),
           ("dino", "DINO ↑"))


def bench_rows(summaries: Mapping[str, Mapping[str, Any]], *, model: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method from each method's eval summary (``summary.json``): its means over stories."""
    rows = []
    for method, summary in summaries.items():
        row: dict[str, Any] = {"method": method, "model": model, "stories": summary["stories"],
                               "frames": summary["frames"]}
        for metric in metrics:
            row[metric.replace("-", "_")] = summary["mean"].get(metric)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], *, plumbing_check: bool,
                   suite: str | None = None, stories: int | None = None) -> str:
    """Table 1's layout: Method | Model | CLIP-T | CLIP-I | LPIPS | DreamSim (| DINO)."""
    columns = [(m, title) for m, title in COLUMNS if m in metrics]
    lines = []
    if plumbing_check:
        lines += [f"**{PLUMBING}**", ""]
    if suite is not None:
        lines += [f"Suite: `{suite}`, {stories} subject set(s); subject metrics on background-removed frames, "
                  "mean over each story's frame pairs, then over stories.", ""]
    lines.append("| Method | Model | " + " | ".join(title for _, title in columns) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        cells = [_cell(row.get(m.replace("-", "_"))) for m, _ in columns]
        lines.append(f"| {DISPLAY.get(row['method'], row['method'])} | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_adherence(rows: Sequence[Mapping[str, Any]], *, plumbing_check: bool) -> bytes:
    """PNG: CLIP-T (prompt adherence) against each subject metric present (CLIP-I, DreamSim, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = dict(COLUMNS)
    # CLIP-I and DreamSim first: the paper's two subject-similarity headline metrics.
    similarity = [(m, titles[m]) for m in ("clip-i", "dreamsim", "dino", "lpips")
                  if any(r.get(m.replace("-", "_")) is not None for r in rows)]
    panels = similarity[:2] or [("clip-t", "CLIP-T ↑")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for row in rows:
            x, y = row.get("clip_t"), row.get(metric.replace("-", "_"))
            if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
                continue
            ax.scatter([x], [y], s=60)
            ax.annotate(DISPLAY.get(row["method"], row["method"]), (x, y), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("prompt adherence: CLIP-T ↑")
        ax.set_ylabel(f"subject similarity: {title}")
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(alpha=0.3)
    model = rows[0]["model"] if rows else ""
    fig.suptitle(("PLUMBING CHECK (random weights): not a quality result\n" if plumbing_check else "")
                 + f"prompt adherence vs subject similarity, {model}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
