"""Is the toyworld model an instrument yet? The four validity properties of issue 21, measured on
a toyworld suite (measures only; prints one JSON object, writes it with ``--json``, and the table
section of ``docs/quality.md`` with ``--markdown``).

    python bench/toyworld_validity.py --model toyworld --suite toyworld --out out/validity

1. **Vanilla adherence**: the suite rendered by ``--method vanilla``, read by the oracle
   (``storysync eval --metrics oracle``): the share of frames with the background, the classes and
   the places their prompt asks for. Threshold >= 0.9.
2. **Vanilla identity consistency**: the share of a story's frame pairs whose subject has the same
   identity, mean over stories; its chance level is sum_i p_i^2 over the identities' frequencies
   among the vanilla frames (1/36 if the model drew them uniformly). Threshold <= chance + 0.15.
3. **Subject-mask IoU**: the suite rendered by StorySync (its default config), and at every step
   of every frame (anchors and frames) the subject mask the step shares with (``final_masks``
   after the step: the current step's mask with ``mask_source: current``), upsampled to the
   picture, against the mask of the subject the oracle finds in the finished frame. Mean over
   steps and frames (frames whose subject the oracle does not find are counted apart).
   Threshold >= 0.5.
4. **Naive extended attention**: ``--method storysync`` with only sharing on, every anchor token,
   no mask, no dropout, no RFH, no BLI; its identity consistency minus vanilla's. Threshold >= 0.3.

The renders go to ``--out`` (a rerun reuses them: the engine's fingerprints); one process, no Ray.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

NAIVE = {"share_attention": True, "use_masks": False, "harmonize": False, "layout_interpolation": False,
         "share_dropout": 0.0, "mask_dropout": 0.0, "rfh_dropout": 0.0}
THRESHOLDS = {"adherence": 0.9, "consistency_over_chance": 0.15, "mask_iou": 0.5, "naive_gain": 0.3}
MARKS = ("<!-- validity:start -->", "<!-- validity:end -->")


def render_and_score(stories: list[Any], model: str, out: pathlib.Path, name: str, method: str,
                     overrides: dict[str, Any], steps: int | None, ablation: str | None = None) -> dict[str, Any]:
    """Render ``stories`` into ``out/renders/<name>`` with one method and config (one process; a
    rerun reuses the frames), then ``storysync eval --metrics oracle`` into ``out/scores/<name>``:
    the eval summary, its per-frame and per-story rows, and the render's seconds."""
    from storysync_dist.api import RenderOptions, render_stories
    from storysync_dist.eval.run import EvalOptions, evaluate_dataset
    from storysync_dist.io.scores import read_scores

    dataset, scores = str(out / "renders" / name), str(out / "scores" / name)
    start = time.perf_counter()
    for _ in render_stories(stories, RenderOptions(model=model, out=dataset, method=method, ablation=ablation,
                                                   overrides=overrides, steps=steps, progress=False)):
        pass  # a generator: one story's result at a time
    seconds = time.perf_counter() - start
    result = evaluate_dataset(EvalOptions(dataset=dataset, out=scores, metrics=["oracle"], progress=False))
    frames, story_rows = read_scores(scores)
    return {"summary": result.summary, "frames": frames, "stories": story_rows, "render_seconds": seconds}


def _chance(identities: Sequence[str | None]) -> float:
    """sum_i p_i^2 over the identities read (frames without a subject left out)."""
    counts = collections.Counter(i for i in identities if i is not None)
    total = sum(counts.values())
    return float(sum((c / total) ** 2 for c in counts.values())) if total else float("nan")


def mask_iou(stories: list[Any], model: str, steps: int | None, tmp: pathlib.Path) -> dict[str, Any]:
    """Property 3: every step's subject mask of every frame against the oracle's subject mask."""
    import torch

    from storysync_dist.api import RenderOptions
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.engine.renderer import StoryRenderer
    from storysync_dist.models.presets import load_pipeline
    from storysync_dist.models.registry import adapter_for
    from storysync_dist.toyworld import read_image, scene_of_prompt

    class Recording(StoryRenderer):
        """A StoryRenderer that keeps the subject masks of every step of its last call."""

        def _state(self, role, jobs, bundle):  # type: ignore[no-untyped-def]
            self.state = super()._state(role, jobs, bundle)
            self.step_masks: list[torch.Tensor | None] = []
            return self.state

        def record(self, _step: int) -> None:
            self.step_masks.append(self.state.final_masks())

    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    adapter = adapter_for(pipe)
    per_step: dict[int, list[float]] = collections.defaultdict(list)
    found = missing = 0
    grid_hw: list[int] | None = None
    for story in stories:
        plan = prepare_job(story, RenderOptions(model=model, out=str(tmp / story.id), steps=steps, progress=False),
                           pipe=pipe)
        renderer = Recording(adapter, plan.config, plan.settings)
        cls = story.subjects[0].tokens[0]
        rendered, bundle = renderer.render_anchors(plan.anchor_jobs, on_step=renderer.record)
        batches: list[tuple[list[Any], list[torch.Tensor | None]]] = [(rendered, renderer.step_masks)]
        for job in plan.frame_jobs:
            if job.frame_id not in plan.anchor_ids:
                batches.append((renderer.render_frames([job], bundle, on_step=renderer.record), renderer.step_masks))
        for frames, step_masks in batches:
            for i, frame in enumerate(frames):
                image = np.asarray(frame.image.convert("RGB"))
                place = scene_of_prompt(frame.job.prompt).objects[0].place
                subjects = sorted((o for o in read_image(image).objects if o.cls == cls), key=lambda o: o.place != place)
                if not subjects:
                    missing += 1
                    continue
                found += 1
                truth = subjects[0].mask
                for step, mask in enumerate(step_masks):
                    if mask is None:
                        continue
                    grid = mask[i].float()[None, None]
                    grid_hw = list(mask.shape[1:])
                    big = torch.nn.functional.interpolate(grid, size=truth.shape, mode="nearest")[0, 0].bool().numpy()
                    union = (big | truth).sum()
                    per_step[step].append(float((big & truth).sum() / union) if union else 0.0)
        print(f"masks: {story.id} done", file=sys.stderr, flush=True)
    means = [float(np.mean(per_step[s])) for s in sorted(per_step)]
    every = [v for s in per_step for v in per_step[s]]
    return {"mask_iou": float(np.mean(every)) if every else float("nan"), "mask_iou_per_step": means,
            "mask_grid": grid_hw,
            "frames_with_subject": found, "frames_without_subject": missing}


def measure(model: str, suite: str, out: pathlib.Path, limit: int | None, steps: int | None,
            skip_masks: bool) -> dict[str, Any]:
    from storysync_dist.io.suites import resolve_suite
    from storysync_dist.story import load_benchmark

    stories = load_benchmark(resolve_suite(suite), limit=limit)
    report: dict[str, Any] = {"model": model, "suite": suite, "stories": len(stories),
                              "frames": sum(len(s.frames) for s in stories), "steps": steps}
    for name, method, overrides in (("vanilla", "vanilla", {}), ("naive", "storysync", NAIVE)):
        scored = render_and_score(stories, model, out, name, method, overrides, steps)
        summary, frames = scored["summary"], scored["frames"]
        report[name] = {"adherence": summary["mean"]["adherence"],
                        "identity_consistency": summary["mean"]["identity-consistency"],
                        "background_leakage": summary["mean"]["background-leakage"],
                        "render_seconds": scored["render_seconds"],
                        "identities": collections.Counter(str(f["oracle_identity"]) for f in frames).most_common()}
        if name == "vanilla":
            report["chance"] = _chance([f["oracle_identity"] for f in frames])
        print(f"{name}: {report[name]['identity_consistency']:.3f} consistency", file=sys.stderr, flush=True)
    if not skip_masks:
        report.update(mask_iou(stories, model, steps, out / "masks"))
    vanilla, naive = report["vanilla"], report["naive"]
    report["checks"] = {
        "adherence": {"value": vanilla["adherence"], "threshold": f">= {THRESHOLDS['adherence']}",
                      "met": vanilla["adherence"] >= THRESHOLDS["adherence"]},
        "consistency": {"value": vanilla["identity_consistency"],
                        "threshold": f"<= chance {report['chance']:.3f} + {THRESHOLDS['consistency_over_chance']}",
                        "met": vanilla["identity_consistency"] <= report["chance"] + THRESHOLDS["consistency_over_chance"]},
        "naive_gain": {"value": naive["identity_consistency"] - vanilla["identity_consistency"],
                       "threshold": f">= {THRESHOLDS['naive_gain']}",
                       "met": naive["identity_consistency"] - vanilla["identity_consistency"] >= THRESHOLDS["naive_gain"]},
    }
    if "mask_iou" in report:
        report["checks"]["mask_iou"] = {"value": report["mask_iou"], "threshold": f">= {THRESHOLDS['mask_iou']}",
                                        "met": report["mask_iou"] >= THRESHOLDS["mask_iou"]}
    report["valid"] = all(c["met"] for c in report["checks"].values()) and "mask_iou" in report
    return report


def markdown(report: dict[str, Any]) -> str:
    """The validity table of docs/quality.md."""
    names = {"adherence": "vanilla adherence (class, background, place as prompted)",
             "consistency": "vanilla identity consistency (same-identity frame pairs)",
             "mask_iou": "subject-token Otsu mask IoU with the oracle's mask (every step StorySync shares at)",
             "naive_gain": "naive extended attention raises identity consistency by"}
    machine = report.get("machine", {})
    lines = [MARKS[0], "",
             f"Measured {machine.get('date', '?')} on {machine.get('cpu', '?')} ({machine.get('nproc', '?')} CPUs) by "
             f"`python bench/toyworld_validity.py --model {report['model']} --suite {report['suite']}`: "
             f"{report['stories']} stories x {report['frames'] // max(1, report['stories'])} frames, "
             f"{report['steps'] or 'the model default'} steps. "
             f"**{'Valid' if report['valid'] else 'Not valid'}.**", "",
             "| property | measured | threshold | met |", "|---|---|---|---|"]
    for key, check in report["checks"].items():
        lines.append(f"| {names[key]} | {check['value']:.3f} | {check['threshold']} | {'yes' if check['met'] else '**no**'} |")
    lines += ["", MARKS[1]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--suite", default="toyworld")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/validity"))
    parser.add_argument("--limit", type=int, help="the first N stories of the suite")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--skip-masks", action="store_true", help="properties 1, 2 and 4 only")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path, help="write the validity table into this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench.report import emit_report, machine_info

    report = {"machine": machine_info(), **measure(args.model, args.suite, args.out, args.limit, args.steps,
                                                   args.skip_masks)}
    emit_report(report, args.json, args.markdown, markdown, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
