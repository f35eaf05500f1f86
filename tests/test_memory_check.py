"""The checks made before a render starts (issue 19): the size limit and the peak-memory estimate
against the free memory (``engine/memory.py``, docs/memory.md).

The free memory is capped with ``STORYSYNC_MEMORY_LIMIT`` (the documented knob for a shared
machine), so a refusal is tested without a huge render. "Nothing loads" is checked by making any
pipeline load in this process fail the test, and on Ray by the pool having started no actor.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
from pathlib import Path

import pytest
import yaml
from _stories import fox_story

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.engine import memory
from storysync_dist.engine.job import model_info, prepare_job
from storysync_dist.errors import StorySyncUserError
from storysync_dist.models.presets import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-sdxl", "tiny-sd", "tiny-flux", "tiny-kandinsky3"]
# docs/memory.md states the estimate within 30 % of the measured peak on the CPU presets (the
# calibration found at most 22 %, and one case measured 19 % apart from one run to the next).
STATED_ERROR = 0.30


def write_story(tmp_path: Path, frames: int = 3, **defaults) -> Path:
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump(fox_story(frames, **{"steps": 2, "height": 64, "width": 64, **defaults})))
    return path


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pipeline load in this process fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr("storysync_dist.engine.run.load_pipeline", refuse)


def one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("storysync: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def local_estimate(story: Path, out: Path, **options) -> tuple[memory.MemoryEstimate, list]:
    """The estimate ``check_memory`` makes for this job on this machine's CPU."""
    opts = RenderOptions(model="tiny-sdxl", out=str(out), device="cpu", progress=False, **options)
    plan = prepare_job(str(story), opts)
    info = model_info(opts)
    shapes = memory.model_shapes("tiny-sdxl", plan.settings.model_revision)
    job = memory.JobShape.of(plan, cfg_batch=info.cfg_batch, text_len=info.text_len, device="cpu",
                             free=memory.host_available())
    return memory.estimate(shapes, job), memory.alternatives(shapes, job)


# ---- the size limit -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "defaults", "needles"), [
    (["--height", "1048576", "--width", "1048576"], {}, ["--height 1048576", "4096"]),
    ([], {"width": 8192}, ["story.yaml: defaults.width=8192", "4096"]),
])
def test_a_size_over_the_maximum_is_refused_in_one_line_before_anything_loads(
    tmp_path: Path, capsys, no_load, extra, defaults, needles,
) -> None:
    story = write_story(tmp_path, **defaults)
    out = tmp_path / "out"
    assert main(["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--no-progress", *extra]) == 2
    err = one_line(capsys)
    for needle in needles:
        assert needle in err
    if extra:  # the exact line a user sees (the console script prints what main() prints)
        assert err == ("storysync: error: --height 1048576: larger than 4096 px, the most this model renders; "
                       "use a height of at most 4096")
    assert not out.exists()


# ---- the memory check ---------------------------------------------------------------------------------
def test_a_render_over_the_free_memory_is_refused_with_the_options_that_lower_it(
    tmp_path: Path, capsys, monkeypatch, no_load,
) -> None:
    # A batch of 4: a frame batch decodes one image at a time, and at 64 px tiny-sdxl's denoiser
    # needs less for 2 frames than its decoder for one, so --frame-batch 1 would lower nothing.
    story = write_story(tmp_path, frames=6, steps=3)
    out = tmp_path / "out"
    est, fixes = local_estimate(story, out, frame_batch=4, bundle_on="device")
    assert [flag for flag, _ in fixes] == ["--bundle-on host", "--frame-batch 1 (now 4)"]
    assert all(e.needed < est.needed for _, e in fixes)
    limit = est.needed - 1
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, str(limit))
    code = main(["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--frame-batch", "4", "--bundle-on", "device"])
    assert code == 2
    err = one_line(capsys)
    assert f"estimated at {est.describe()}" in err
    assert f"more than the {memory.format_bytes(limit)} free on cpu ({memory.MEMORY_LIMIT_ENV})" in err
    for flag, e in fixes:
        assert f"{flag} (~{memory.format_bytes(e.needed)})" in err
    assert "--force" in err
    assert not out.exists()


def test_force_renders_anyway(tmp_path: Path, monkeypatch) -> None:
    story = write_story(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1M")
    args = ["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--force"]) == 0
    assert len(list((out / "data").rglob("*.parquet"))) >= 1


def test_dry_run_prints_the_estimate_and_whether_it_fits(tmp_path: Path, capsys, monkeypatch, no_load) -> None:
    story = write_story(tmp_path)
    out = tmp_path / "out"
    est, _ = local_estimate(story, out)
    args = ["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--device", "cpu", "--no-progress",
            "--dry-run"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(x.strip() for x in printed.splitlines() if "peak memory per worker" in x)
    assert line.startswith(f"peak memory per worker: {est.describe()}; ")
    assert line.endswith("free on cpu")
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1MiB")
    assert main(args) == 0  # a dry run reports; it does not refuse
    line = next(x.strip() for x in capsys.readouterr().out.splitlines() if "peak memory per worker" in x)
    assert "1.0 MiB free on cpu (STORYSYNC_MEMORY_LIMIT): does not fit, a render would be refused" in line
    assert not out.exists()


def test_a_rerun_with_nothing_to_render_is_not_checked(tmp_path: Path, capsys, monkeypatch) -> None:
    story = write_story(tmp_path, frames=2)
    out = tmp_path / "out"
    args = ["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1M")
    assert main(args) == 0  # every frame is present: nothing loads, so nothing can run out of memory
    assert "skipped 2 already present" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "expected"), [("1048576", 2**20), ("8G", 8 * 2**30), ("512MiB", 512 * 2**20),
                                                 ("1.5 kb", 1536)])
def test_the_memory_limit_reads_sizes(monkeypatch, value: str, expected: int) -> None:
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, value)
    assert memory.memory_limit() == expected


def test_a_bad_memory_limit_is_a_one_line_error(tmp_path: Path, capsys, monkeypatch, no_load) -> None:
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "lots")
    story = write_story(tmp_path)
    assert main(["render", str(story), "--model", "tiny-sdxl", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "STORYSYNC_MEMORY_LIMIT='lots': not a size" in one_line(capsys)


def test_on_a_gpu_the_refusal_offers_the_host_bundle_and_offload(tmp_path: Path) -> None:
    """The GPU arithmetic, planned on the driver without a GPU (random-sdxl's configs, 1024 px,
    50 steps): the whole bundle on a 16 GiB card does not fit, the options that lower it are named,
    and ``--bundle-on auto`` picks the host there, as ``core.residency.resolve_placement`` does."""
    story = tmp_path / "story.yaml"
    story.write_text(yaml.safe_dump(fox_story(4)))
    options = RenderOptions(model="random-sdxl", out=str(tmp_path / "out"), bundle_on="device")
    plan = prepare_job(str(story), options, device="cuda")
    info = model_info(options)
    shapes = memory.model_shapes("random-sdxl", plan.settings.model_revision)
    card = 16 * memory.GIB
    job = memory.JobShape.of(plan, cfg_batch=info.cfg_batch, text_len=info.text_len, device="cuda", free=card)
    est, fixes = memory.estimate(shapes, job), memory.alternatives(shapes, job)
    assert est.weights == memory.weight_bytes(shapes, 2) and est.total > card
    assert [flag for flag, _ in fixes] == ["--bundle-on host", "--offload model"]
    host, offload = (e for _, e in fixes)
    assert host.needed <= card < est.needed  # the host bundle fits where the whole one does not
    # --offload model: the UNet stays, and the text encoders (larger than the VAE) visit it.
    assert offload.weights == memory.weight_bytes(shapes, 2, roles=(shapes.denoiser, "text_encoder", "text_encoder_2"))
    assert offload.weights < est.weights
    with pytest.raises(StorySyncUserError, match=r"more than the 16\.00 GiB free on cuda:0; to fit, try "
                                                 r"--bundle-on host \(~.*\), --offload model \(~"):
        memory.check_fits(est, memory.FreeMemory(card, "cuda:0"), fixes)
    # --bundle-on auto: the whole bundle is more than a quarter of 16 GiB, not of 1 TiB.
    auto = dataclasses.replace(job, bundle_on="auto")
    assert memory.estimate(shapes, auto) == host
    assert memory.estimate(shapes, dataclasses.replace(auto, free=1024 * memory.GIB)) == est


# ---- the estimate against the models and the measurement ---------------------------------------------
@pytest.mark.parametrize("model", TINY)
def test_the_shapes_from_the_configs_match_the_loaded_pipeline_and_its_anchor_bundle(tmp_path: Path, model) -> None:
    """Parameters counted on the meta device equal the loaded pipeline's; the shared layers'
    token counts, channels and branches the estimate derives equal those of a real bundle."""
    pipe = load_pipeline(model, device="cpu")
    shapes = memory.model_shapes(model)
    assert shapes == memory.model_shapes_from_pipeline(pipe)
    loaded = sum(p.numel() * p.element_size() for c in pipe.components.values() if hasattr(c, "parameters")
                 for p in c.parameters())
    buffers = sum(b.numel() * b.element_size() for c in pipe.components.values() if hasattr(c, "buffers")
                  for b in c.buffers())
    assert memory.weight_bytes(shapes, 4) == loaded + buffers

    story = tmp_path / "story.yaml"
    size = 128
    story.write_text(yaml.safe_dump(fox_story(2, steps=2, height=size, width=size)))
    result = render_story(str(story), RenderOptions(model=model, out=str(tmp_path / "out"), progress=False,
                                                    save_anchors=True), pipe=pipe)
    assert result.anchor_bundle
    bundle = AnchorBundle.from_bytes(next((tmp_path / "out").rglob("*.safetensors")).read_bytes())
    info = model_info(RenderOptions(model=model, out=""))
    grid = memory.latent_grid(size, size, shapes)
    shared = {f"{a.name}.processor": a for a in memory.shared_layers(shapes, info.share_layers)}
    step = bundle.step(min(bundle.steps))
    assert step.layers and set(step.layers) <= set(shared)
    if model != "tiny-kandinsky3":  # its cross-attentions as wide as its text count as shared (docs/memory.md)
        assert set(step.layers) == set(shared)
    branches = 2 if info.cfg_batch else 1
    for name, layer in step.layers.items():
        a = shared[name]
        assert layer.num_tokens == memory.layer_tokens(grid, a.level), name
        assert layer.hidden.shape[0] == branches and layer.hidden.shape[-1] == a.channels, name
        assert layer.features.shape[-1] == a.inner, name
    bound = memory.bundle_step_bytes([shared[n] for n in step.layers], grid, anchors=2, branches=branches,
                                     anchor_dtype_bytes=2, coverage=1.0)
    assert all(s.nbytes() <= bound for s in bundle.steps.values())


def test_the_estimate_is_within_the_stated_error_of_the_measured_peak(tmp_path: Path) -> None:
    """One calibration case (bench/memory_calibration.py): the peak resident set a render adds in a
    fresh process, against the estimate. tiny-kandinsky3 at 512 px, where the activations (its
    decoder) are most of the peak, not the fixed runtime allowance."""
    sys.path.insert(0, str(ROOT))
    from bench.memory_calibration import run_case

    row = run_case("tiny-kandinsky3", 512, 1, 3)
    est, got = row["estimate"], row["measured"]
    assert est["activations"] > est["runtime"]  # the case measures the arithmetic, not the allowance
    assert abs(est["total"] / got["growth"] - 1) <= STATED_ERROR, json.dumps(row)


def test_a_child_reads_its_own_peak_not_its_parents() -> None:
    """``storysync_dist.resident``: a fresh child of a process that once held 600 MiB reads its own
    peak (tens of MiB), where ``ru_maxrss`` carries the parent's over ``execve`` (Linux), which is
    what made the calibration above read ~1 GB inside the full suite."""
    import subprocess

    held = bytearray(600 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: resident now
    del held
    code = ("import json, resource; from storysync_dist.resident import peak_resident_bytes; "
            "print(json.dumps([peak_resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    own, maxrss = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout)
    assert own < 200 * 2**20, own
    if sys.platform.startswith("linux"):
        assert maxrss >= 600 * 2**20  # the number the calibration must not read


# ---- Ray workers ----------------------------------------------------------------------------------------
def test_ray_workers_are_checked_before_the_pool_starts(tmp_path: Path, capsys, monkeypatch, ray_cluster) -> None:
    from storysync_dist.distributed.executor import RayExecutor

    story = write_story(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "2M")
    options = RenderOptions(model="tiny-sdxl", out=str(out), workers=2, device="cpu",
                            resources_per_worker={"CPU": 1}, progress=False)
    with RayExecutor(options) as executor:
        with pytest.raises(StorySyncUserError, match=r"1\.0 MiB free on this machine \(1/2 of it per worker\)"):
            render_story(str(story), options, executor=executor)
        assert executor.live_workers() == []  # no worker started, so no pipeline loaded anywhere
    args = ["render", str(story), "--model", "tiny-sdxl", "--out", str(out), "--workers", "2", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 2
    assert "per worker" in one_line(capsys)
    assert not out.exists()


def test_a_probe_reads_the_free_memory_where_a_worker_runs(monkeypatch, ray_cluster) -> None:
    """On a cluster of other machines (or GPUs) a Ray task with a worker's resources reads the
    free memory; here the cluster is this machine, so the probe is forced and must agree with it."""
    from storysync_dist.distributed import memory_probe

    monkeypatch.setattr(memory_probe, "all_nodes_here", lambda: False)
    monkeypatch.delenv(memory.MEMORY_LIMIT_ENV, raising=False)
    free = memory_probe.free_memory_on_workers({"num_cpus": 1}, "cpu", 2)
    total = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:")).split()[1])
    assert free is not None and free.where == f"cpu on {socket.gethostname()}" and not free.capped
    assert 0 < free.bytes <= total * 1024
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "3M")
    capped = memory_probe.free_memory_on_workers({"num_cpus": 1}, "cpu", 2)
    assert capped == memory.FreeMemory(3 * 2**20, f"cpu on {socket.gethostname()}", capped=True)
