"""The benchmark's report: one row per method (the mean over stories), a Markdown table in the
layout of the StorySync paper's Table 1, and the prompt-adherence / subject-similarity plot that
ConsiStory and StorySync draw (CLIP-T on x, a subject metric on y, one point per method).

With ``--metrics oracle`` (toyworld renders, docs/quality.md) the rows, the CSV and the table get
the oracle's three scores: identity consistency, adherence and background leakage; without CLIP-T
the plot shows adherence on x and identity consistency on y.

A run with random-tiny encoders is a plumbing check: its table and plot say so in their title.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .scores import score_names

__all__ = ["bench_rows", "plot_adherence", "table_markdown"]

PLUMBING = ("PLUMBING CHECK: random weights (random-tiny encoders, or a tiny/random model preset); these "
            "numbers test that the pipeline runs end to end and say nothing about quality.")
# How the paper names the methods in Table 1.
DISPLAY = {"vanilla": "Vanilla", "storysync": "StorySync", "consistory": "ConsiStory", "storydiffusion": "StoryDiffusion"}
# Under a table with a StorySync row: which of its settings the paper states and which are ours
# (docs/method.md, "The paper's settings and ours").
SETTINGS_NOTE = ("StorySync defaults from the paper: γ 0.3, λ 0.7, masks from the current step. The project's own "
                 "(the paper gives none): dropouts 0.3/0.2/0.1 (shared keys/RFH/masks), τ 0.1, BLI over the first "
                 "30% of steps, sharing in the decoder only (FLUX: single-stream blocks), sharing in the "
                 "unconditional branch too (share_uncond), which layers of the step make the masks. A run's own "
                 "values: each frame's config column.")
# Table 1's columns, DINO after them, then the oracle's scores (toyworld); the arrow says which way
# is better.
COLUMNS = (("clip-t", "CLIP-T ↑"), ("clip-i", "CLIP-I ↑"), ("lpips", "LPIPS ↓"), ("dreamsim", "DreamSim ↓"),
           ("dino", "DINO ↑"), ("identity-consistency", "Identity ↑"), ("adherence", "Adherence ↑"),
           ("background-leakage", "BG leakage ↓"))


def bench_rows(summaries: Mapping[str, Mapping[str, Any]], *, model: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method from each method's eval summary (``summary.json``): its means over stories,
    one column per score of ``metrics`` (``oracle``: its three, ``scores.score_names``)."""
    rows = []
    for method, summary in summaries.items():
        row: dict[str, Any] = {"method": method, "model": model, "stories": summary["stories"],
                               "frames": summary["frames"]}
        for metric in score_names(metrics):
            row[metric.replace("-", "_")] = summary["mean"].get(metric)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], *, plumbing_check: bool,
                   suite: str | None = None, stories: int | None = None) -> str:
    """Table 1's layout: Method | Model | CLIP-T | CLIP-I | LPIPS | DreamSim (| DINO) (| Identity |
    Adherence | BG leakage, the oracle's)."""
    scores = score_names(metrics)
    columns = [(m, title) for m, title in COLUMNS if m in scores]
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
    if any(row["method"] == "storysync" for row in rows):
        lines += ["", SETTINGS_NOTE]
    return "\n".join(lines) + "\n"


def _present(rows: Sequence[Mapping[str, Any]], metric: str) -> bool:
    return any(not _missing(r.get(metric.replace("-", "_"))) for r in rows)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def plot_adherence(rows: Sequence[Mapping[str, Any]], *, plumbing_check: bool) -> bytes:
    """PNG: CLIP-T (prompt adherence) against each subject metric present (CLIP-I, DreamSim, ...);
    without CLIP-T but with the oracle's scores, adherence against identity consistency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = dict(COLUMNS)
    # CLIP-I and DreamSim first: the paper's two subject-similarity headline metrics.
    similarity = [(m, titles[m]) for m in ("clip-i", "dreamsim", "dino", "lpips") if _present(rows, m)]
    x_metric, x_title = "clip-t", "CLIP-T ↑"
    panels = similarity[:2] or [("clip-t", "CLIP-T ↑")]
    if not _present(rows, "clip-t") and _present(rows, "adherence"):  # the oracle's (toyworld) instead
        x_metric, x_title = "adherence", "oracle adherence ↑"
        panels = [("identity-consistency", "oracle identity consistency ↑")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for row in rows:
            x, y = row.get(x_metric.replace("-", "_")), row.get(metric.replace("-", "_"))
            if _missing(x) or _missing(y):
                continue
            ax.scatter([x], [y], s=60)
            ax.annotate(DISPLAY.get(row["method"], row["method"]), (x, y), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel(f"prompt adherence: {x_title}")
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
