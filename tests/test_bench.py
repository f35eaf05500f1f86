"""The benchmark harness in --quick mode: it runs, and writes the tables it promises."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import pytest

from bench import run


def test_quick_bench_writes_its_tables(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nHand-written notes stay.\n", encoding="utf-8")
    # Sections a-c only: d and e start Ray, which a smoke test does not need.
    assert run.main(["--quick", "--sections", "abc", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nHand-written notes stay.\n")
    assert text.count(run.START_MARK) == 1 and text.count(run.END_MARK) == 1
    assert "not measured: child" not in text  # no child process failed
    plan = run.QUICK

    # a: one row per story length: frames, non-anchor frames, then measured seconds.
    for frames in plan.lengths:
        assert re.search(rf"^\| {frames} \| {frames - 2} \| [0-9.]+ \| [0-9.]+ \|", text, re.M), frames
    # b: the bundle row (float16, subject tokens only) and bytes pulled per frame for 1 and 2 workers.
    size = f"{plan.size}x{plan.size}"
    assert re.search(rf"^\| tiny-sdxl {size} \| {plan.steps} \(\d+\) \| \d+ \| float16 \| [0-9.]+ % \|", text, re.M)
    for frames in plan.lengths:
        for workers in (1, 2):
            assert re.search(rf"^\| {frames} \| {workers} \| \d+ \| [0-9.]+ k?B \|", text, re.M)
    # c: the tiny-sdxl ratio row; random-sdxl is not run in quick mode, and says so.
    model, px, steps, pairs = plan.ratio_runs[0]
    assert re.search(rf"^\| {model} \| {px}x{px} \| {steps} \(\d+\) \| {pairs} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|",
                     text, re.M)
    assert "not measured: random-sdxl: --quick runs tiny-sdxl only" in text
    # d, e, f: not selected, and the file says so rather than leaving them out.
    assert text.count("not measured: section not selected (--sections abc)") == 3
    assert "### Where the numbers stand against the budgets" in text


def test_rerun_replaces_only_the_generated_section(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "benchmarks.md"
    run.write_report(out, f"{run.START_MARK}\nfirst\n{run.END_MARK}\n")
    out.write_text(out.read_text(encoding="utf-8") + "\nNotes after the tables.\n", encoding="utf-8")
    run.write_report(out, f"{run.START_MARK}\nsecond\n{run.END_MARK}\n")
    text = out.read_text(encoding="utf-8")
    assert "second" in text and "first" not in text
    assert text.rstrip().endswith("Notes after the tables.")
    assert text.startswith("# Benchmarks")


def test_failed_ray_run_is_reported_not_dropped() -> None:
    emits = [{"id": "f0000", "anchor": True, "t": 1.0}, {"id": "f0001", "anchor": True, "t": 1.0}]
    emits += [{"id": f"f{k:04d}", "anchor": False, "t": 1.0 + k} for k in range(2, 6)]
    stats = {"worker_stats": [{"frames": 4, "pulled_bytes": 10, "threads": 1, "peak_rss_bytes": 2**20}]}
    report = run.Report(plan=run.QUICK, quick=True, sections="de", machine={"date": "now"})
    report.ray = {"ray_start_seconds": 1.0, "runs": [
        {"section": "d", "frames": 6, "workers": 1, "wall": 6.0, "emits": emits, "stats": stats},
        {"section": "d", "frames": 6, "workers": 2, "error": "RuntimeError: boom"},
        {"section": "e", "frames": 6, "workers": 2, "error": "RuntimeError: boom"},
    ]}
    text = run.render_markdown(report)
    assert re.search(r"^\| 1 \| 1 \| 3 \| ", text, re.M)  # the run that finished keeps its row
    assert "not measured: 6 frames on 2 workers: RuntimeError: boom" in text
    assert text.count("RuntimeError: boom") == 2
    # The raw dump (--json) renders the same section again (--from-json).
    again = run.report_from_json(json.loads(json.dumps(dataclasses.asdict(report), default=str)))
    assert run.render_markdown(again) == text


def test_pooled_dataset_section_reports_both_modes() -> None:
    report = run.Report(plan=run.QUICK, quick=True, sections="f", machine={"date": "now"})
    report.ray = {"ray_start_seconds": 1.0, "runs": [], "pool": [
        {"mode": "per-story", "stories": 2, "frames": 3, "workers": 2, "wall": 12.0, "per_story": [7.0, 5.0]},
        {"mode": "pooled", "stories": 2, "frames": 3, "workers": 2, "wall": 4.0, "per_story": [3.0, 1.0]},
    ]}
    text = run.render_markdown(report)
    assert re.search(r"^\| per-story \| 2 \| 3 \| 12 \| 6 \| 7 \| 5 \| 1 \|$", text, re.M)
    assert re.search(r"^\| pooled \| 2 \| 3 \| 4 \| 2 \| 3 \| 1 \| 3 \|$", text, re.M)
    assert "a pooled executor rendered 2 stories of 3 frames 3.00x as fast" in text
    report.ray["pool"][1] = {"mode": "pooled", "error": "RuntimeError: boom"}
    text = run.render_markdown(report)
    assert "not measured: pooled: RuntimeError: boom" in text and "| per-story | 2 |" in text


def test_the_device_check_runs_in_its_cpu_form(tmp_path: pathlib.Path) -> None:
    # `python -m bench.gpu_benchmark --device-check` (issue 23): without CUDA, the same code on the
    # tiny presets; its own section, between its own markers, next to what the file holds.
    from bench import gpu_benchmark

    out, raw = tmp_path / "benchmarks.md", tmp_path / "check.json"
    out.write_text(f"# Benchmarks\n\nNotes stay.\n\n{gpu_benchmark.START_MARK}\nold\n{gpu_benchmark.END_MARK}\n",
                   encoding="utf-8")
    assert gpu_benchmark.main(["--device-check", "--device", "cpu", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.count(gpu_benchmark.CHECK_START_MARK) == 1 and "\nold\n" in text  # the other section stays
    data = json.loads(raw.read_text(encoding="utf-8"))
    assert data["device_check"] is True
    models = [r["setup"]["model"] for r in data["results"]]
    assert models == [s.model for s in gpu_benchmark.DEVICE_CHECK_CPU_SETUPS]
    for result in data["results"]:
        rows, setup = result["rows"], result["setup"]
        assert result["error"] is None and rows["ratio"] > 0 and rows["host_seconds"] > 0
        assert "offload_seconds" not in rows  # no offload run in the check
        assert rows["step_syncs_storysync"] is None and rows["frame_peak_host_reserved"] is None  # CPU: n/a
        assert sorted(int(b) for b in result["fps"]) == sorted(setup["batches"])
        assert re.search(rf"^\| {setup['model']} \| {setup['size']}x{setup['size']} \| {setup['steps']} \| float32 \|",
                         text, re.M)
    assert "n/a (CPU) / n/a (CPU)" in text


def test_the_gpu_mode_runs_in_its_quick_cpu_variant(tmp_path: pathlib.Path) -> None:
    from bench import gpu_benchmark

    out, raw = tmp_path / "benchmarks.md", tmp_path / "gpu.json"
    out.write_text("# Benchmarks\n\nNotes stay.\n", encoding="utf-8")
    assert gpu_benchmark.main(["--quick", "--device", "cpu", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nNotes stay.\n") and text.count(gpu_benchmark.START_MARK) == 1
    setup = gpu_benchmark.QUICK_SETUPS[0]
    size = f"{setup.size}x{setup.size}"
    number = r"[0-9][0-9.,]*"
    # The ratio row: vanilla, StorySync, their ratio, the host placement and offload, all measured.
    assert re.search(rf"^\| {setup.model} \| {size} \| {setup.steps} \| float32 \| {setup.pairs} \|( {number} \|){{5}}$",
                     text, re.M)
    # Memory: no device counter on a CPU, and it says so; the resident anchor bytes are counted.
    memory = re.search(rf"^\| {setup.model} \| {size} \|( n/a \(CPU\) \|){{4}} (.+)$", text, re.M)
    assert memory, text
    data = json.loads(raw.read_text(encoding="utf-8"))["results"][0]
    rows = data["rows"]
    assert rows["bundle_bytes"] > 0 and rows["step_bytes"] > 0
    # The host placement holds at most two steps on the device, the device placement all of them.
    assert rows["resident_bytes_device"] == rows["bundle_bytes"]
    assert rows["resident_bytes_host"] <= 2 * rows["step_bytes"] < rows["bundle_bytes"]
    # Frames per second at every batch of the setup.
    assert sorted(int(b) for b in data["fps"]) == list(setup.batches) and all(v > 0 for v in data["fps"].values())
    assert re.search(rf"^\| {setup.model} \| {size} \|( {number} \|){{{len(setup.batches) + 1}}}$", text, re.M)


def test_the_methods_benchmark_measures_every_method_against_vanilla() -> None:
    from bench import methods_benchmark

    result = methods_benchmark.measure("tiny-sdxl", 64, 2, 3)
    rounds = result["rounds"]
    assert len(rounds) == 3 and all(r[m][k] > 0 for r in rounds for m in r for k in ("wall", "cpu"))
    # Each ratio is the median over rounds of the method's time over vanilla's in the same round.
    assert set(result["ratio_to_vanilla"]) == set(methods_benchmark.METHODS)
    for method, ratios in result["ratio_to_vanilla"].items():
        for kind, ratio in ratios.items():
            per_round = sorted(r[method][kind] / r["vanilla"][kind] for r in rounds)
            assert ratio == pytest.approx(per_round[1]), (method, kind)
        assert result["median_frame_seconds"][method] == pytest.approx(sorted(r[method]["wall"] for r in rounds)[1])
    # Vanilla has no anchors; each other method published a bundle of its own.
    assert set(result["anchors"]) == {"storysync", "consistory", "storydiffusion"}
    assert all(a["bundle_bytes"] > 0 for a in result["anchors"].values())


def test_the_hotpath_benchmark_counts_a_frames_ops(tmp_path: pathlib.Path) -> None:
    from bench import hotpath_benchmark

    raw = tmp_path / "hotpath.json"
    assert hotpath_benchmark.main(["--quick", "--json", str(raw)]) == 0
    data = json.loads(raw.read_text(encoding="utf-8"))
    models = set(hotpath_benchmark.QUICK.models)
    assert set(data["aten_ops_per_frame"]) == set(data["vanilla_aten_ops_per_frame"]) == models
    assert set(data["sync_ops_per_frame"]) == models
    for model in models:
        ops, vanilla = data["aten_ops_per_frame"][model], data["vanilla_aten_ops_per_frame"][model]
        assert isinstance(ops, int) and isinstance(vanilla, int) and 0 < vanilla < ops, model
        census = data["models"][model]["storysync"]
        assert sum(census["aten_ops_by_phase"].values()) == ops  # every op falls in one phase
        sync = data["sync_ops_per_frame"][model]
        assert sync and all(isinstance(n, int) and n > 0 for n in sync.values()), sync
        assert all(isinstance(n, int) and n > 0 for site in census["sync_sites"].values() for n in site.values())
        # The frame path waits for the device in no shared layer and at no step (issue 23's
        # budget); the anchors' publish waits once per step, the first included (it copies every
        # resolution the latent tiles into), and its bundle copies are queued.
        in_layers = [g for g in census["sync_ops_per_layer_call"] if g["first"] != "(no attention layer)"]
        assert in_layers == [], in_layers
        assert data["sync_ops_per_step"][model]["storysync"] == 0
        anchors = data["models"][model]["anchors"]
        per_step = {p: sum(k.values()) for p, k in anchors["sync_ops_by_phase"].items() if p.startswith("step ")}
        assert per_step and all(n <= 1 for n in per_step.values()), per_step
        assert anchors["queued_copies"].get("d2h_queued", 0) > 0
        frames = data["models"][model]["frames"]
        assert set(frames) == {"vanilla", "storysync_device", "storysync_host"}
        assert all(f["seconds"] > 0 for f in frames.values())
    book = data["bookkeeping_seconds_per_frame"]
    assert set(book) == {"device", "host"} and all(isinstance(s, float) and s > 0 for s in book.values())
    assert set(data["bookkeeping_budget"]) >= {"device", "host"}
