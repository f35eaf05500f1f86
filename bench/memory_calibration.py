"""The peak-memory estimate (``storysync_dist.engine.memory``) against the measured peak, on the CPU.

For each case (model, size, frame batch, frames) a fresh Python process imports what a render
imports, reads its resident set (``VmRSS``), renders the story in-process on the CPU (float32, 2
steps, one torch thread, as the test suite and a Ray CPU worker run), and reports its peak
resident set (``VmHWM``) minus that baseline: the memory the render itself took. The parent
computes the estimate the check would make for the same job (``check_memory``'s arithmetic, with
the bundle placement the render uses) and prints both, with the error (estimate / measured - 1).
The child also reports the peak before the first VAE decode and the peak of each decode (VmHWM is
reset through ``/proc/self/clear_refs`` around every decode), so the denoiser and decoder parts
can be told apart. Not ``ru_maxrss``: a child started by a large process (pytest in the full suite)
inherits that process's peak in it (``storysync_dist.resident``).

With ``--device cuda`` the child renders on the GPU in the device's default dtype and reports the
caching allocator's peak (``torch.cuda.max_memory_reserved``, cuBLAS workspaces included; the
CUDA context is outside it, as it is outside the free memory the check reads), per decode too.
No GPU has been lent yet, so that mode has not run.

    python bench/memory_calibration.py                     # the default cases, a markdown table
    python bench/memory_calibration.py --json out.json --case tiny-sdxl:512:4:6
    python bench/memory_calibration.py --device cuda --case random-sdxl:1024:1:3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (model, size, frame batch, frames)
DEFAULT_CASES = [
    ("tiny-sdxl", 128, 1, 3), ("tiny-sdxl", 512, 1, 3), ("tiny-sdxl", 512, 4, 6), ("tiny-sdxl", 1024, 1, 3),
    ("tiny-sd", 128, 1, 3), ("tiny-sd", 512, 2, 4),
    ("tiny-flux", 128, 1, 3), ("tiny-flux", 512, 1, 3), ("tiny-flux", 512, 4, 6),
    ("tiny-kandinsky3", 128, 1, 3), ("tiny-kandinsky3", 512, 1, 3), ("tiny-kandinsky3", 512, 4, 6),
]
STEPS = 2
SCENES = ["in a meadow", "by a stream", "in the snow", "in a city at night", "on a beach", "in a forest",
          "on a mountain", "in a library"]


def story(frames: int, size: int) -> dict[str, Any]:
    """A one-subject story of ``frames`` scenes at ``size`` px, 2 steps."""
    return {
        "id": "fox", "style": "A photo of",
        "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
        "frames": [{"id": f"f{k}", "prompt": f"{{fox}} {where}", "seed": 3 + k} for k, where in enumerate(SCENES[:frames])],
        "defaults": {"steps": STEPS, "height": size, "width": size},
    }


def child(model: str, story_path: str, out: str, frame_batch: int, device: str = "cpu") -> dict[str, Any]:
    """Measure one render in this (fresh) process."""
    if device.startswith("cuda"):
        return _cuda_child(model, story_path, out, frame_batch, device)
    import pyarrow.parquet  # noqa: F401 - imported by the sink; before the baseline
    from diffusers import AutoencoderKL, VQModel

    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.models.registry import families
    from storysync_dist.resident import peak_resident_bytes, resident_bytes

    families()  # every family's module and pipeline classes
    decodes: list[dict[str, int]] = []

    def measured(cls: Any) -> None:
        original = cls.decode

        def decode(self: Any, *args: Any, **kwargs: Any) -> Any:
            before = peak_resident_bytes()
            _reset_hwm()
            start = resident_bytes()
            result = original(self, *args, **kwargs)
            decodes.append({"peak_before": before, "start": start, "peak": peak_resident_bytes()})
            _reset_hwm()
            return result

        cls.decode = decode

    measured(AutoencoderKL)
    measured(VQModel)
    base = resident_bytes()
    t0 = time.perf_counter()
    render_story(story_path, RenderOptions(model=model, out=out, progress=False, frame_batch=frame_batch,
                                           device="cpu", dtype="float32"))
    # VmHWM is reset around each decode, so the peak is the largest of every reading.
    peak = max([peak_resident_bytes(), *(d["peak_before"] for d in decodes), *(d["peak"] for d in decodes)])
    return {"base": base, "peak": peak, "growth": peak - base, "seconds": time.perf_counter() - t0,
            "before_first_decode": decodes[0]["peak_before"] - base if decodes else None,
            "decode_growth": max((d["peak"] - d["start"] for d in decodes), default=None)}


def _cuda_child(model: str, story_path: str, out: str, frame_batch: int, device: str) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, VQModel

    from storysync_dist.api import RenderOptions, render_story

    torch.cuda.init()
    decodes: list[dict[str, int]] = []
    for cls in (AutoencoderKL, VQModel):
        original = cls.decode

        def decode(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            before = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_reserved()
            result = _original(self, *args, **kwargs)
            decodes.append({"peak_before": before, "start": start, "peak": torch.cuda.max_memory_reserved()})
            return result

        cls.decode = decode
    t0 = time.perf_counter()
    render_story(story_path, RenderOptions(model=model, out=out, progress=False, frame_batch=frame_batch,
                                           device=device))
    peak = max([torch.cuda.max_memory_reserved(), *(d["peak_before"] for d in decodes)])
    return {"base": 0, "peak": peak, "growth": peak, "seconds": time.perf_counter() - t0,
            "before_first_decode": decodes[0]["peak_before"] if decodes else None,
            "decode_growth": max((d["peak"] - d["start"] for d in decodes), default=None)}


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def estimate(model: str, story_path: str, out: str, frame_batch: int, device: str = "cpu") -> dict[str, Any]:
    """What ``check_memory`` estimates for the same job on ``device``."""
    from storysync_dist.engine.free_memory import device_free
    from storysync_dist.engine.job import RenderOptions, model_info, prepare_job
    from storysync_dist.engine.memory import JobShape, estimate, model_shapes

    options = RenderOptions(model=model, out=out, progress=False, frame_batch=frame_batch, device=device,
                            dtype="float32" if device == "cpu" else None)
    plan = prepare_job(story_path, options)
    info = model_info(options)
    shapes = model_shapes(model, plan.settings.model_revision)
    job = JobShape.of(plan, cfg_batch=info.cfg_batch, text_len=info.text_len, device=device,
                      free=device_free(device))
    est = estimate(shapes, job)
    return {"total": est.total, "weights": est.weights, "activations": est.activations, "bundle": est.bundle,
            "runtime": est.runtime, "phase": est.phase}


# What the measuring child keeps of the caller's environment.
_CHILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES")


def run_case(model: str, size: int, frame_batch: int, frames: int, device: str = "cpu") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        path = os.path.join(tmp, "story.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(story(frames, size), f)
        est = estimate(model, path, os.path.join(tmp, "est"), frame_batch, device)
        # A fresh process in a plain environment with a cache of its own (it builds the preset):
        # what the caller's process set or built does not change the measurement.
        env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV}
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", STORYSYNC_CACHE=os.path.join(tmp, "cache"))
        proc = subprocess.run(
            [sys.executable, __file__, "--child", model, path, os.path.join(tmp, "out"), str(frame_batch), device],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"{model} {size}: child failed:\n{proc.stderr[-2000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": model, "size": size, "frame_batch": frame_batch, "frames": frames, "device": device,
            "estimate": est,
            "measured": got, "error": est["total"] / got["growth"] - 1}


def table(rows: list[dict[str, Any]]) -> str:
    mib = 1024**2
    lines = ["| model | size | frames (batch) | estimate MiB (weights + activations + bundle + runtime) "
             "| measured peak MiB (before 1st decode / a decode's own) | error |",
             "|---|---:|---:|---|---|---:|"]
    for r in rows:
        e, m = r["estimate"], r["measured"]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['frames']} ({r['frame_batch']}) | {e['total'] / mib:.0f} "
            f"({e['weights'] / mib:.0f} + {e['activations'] / mib:.0f} + {e['bundle'] / mib:.1f} + "
            f"{e['runtime'] / mib:.0f}) | {m['growth'] / mib:.0f} ({(m['before_first_decode'] or 0) / mib:.0f} / "
            f"{(m['decode_growth'] or 0) / mib:.0f}) | {r['error']:+.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", default=[], metavar="MODEL:SIZE:BATCH:FRAMES")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, path, out, batch, device = args.child
        print(json.dumps(child(model, path, out, int(batch), device)))
        return 0
    cases = [(m, int(s), int(b), int(f)) for m, s, b, f in (c.split(":") for c in args.case)] or DEFAULT_CASES
    rows = []
    for case in cases:
        rows.append(run_case(*case, device=args.device))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
