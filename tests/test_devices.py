"""The default dtype (``engine/devices.py``): on CUDA the model family's ``cuda_dtype`` (bfloat16
for FLUX, whose activations leave the float16 range; float16 for the UNet families and Kandinsky 3),
float32 elsewhere; and the anchors follow it (``anchor_dtype`` left to the model).

No GPU here: the planning tests name ``cuda`` as the device (nothing is checked against the machine
there), and the CLI test lets this machine pass for one with CUDA and loads the pipeline on the
CPU in the dtype the engine asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from storysync_dist.cli import main
from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.engine import devices, run
from storysync_dist.engine.devices import default_dtype, device_and_dtype
from storysync_dist.engine.job import RenderOptions, prepare_job
from storysync_dist.engine.plan import bundle_relpath
from storysync_dist.errors import StorySyncUserError
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.presets import load_pipeline, preset_path


def write_story(folder: Path) -> Path:
    story = {
        "id": "fox",
        "style": "A photo of",
        "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
        "defaults": {"steps": 2, "height": 64, "width": 64},
        "frames": [{"id": f"f{k}", "prompt": f"{{fox}} in place number {k}", "seed": 10 + k} for k in range(3)],
    }
    path = folder / "fox.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


def test_the_default_dtype_is_the_family_s_on_cuda_and_float32_elsewhere() -> None:
    assert default_dtype("cuda", "tiny-flux") == "bfloat16"
    assert default_dtype("cuda:1", "random-flux") == "bfloat16"
    assert default_dtype("cuda", str(preset_path("tiny-flux"))) == "bfloat16"  # a local folder
    for model in ("tiny-sdxl", "tiny-sd", "random-sdxl", "tiny-kandinsky3"):
        assert default_dtype("cuda", model) == "float16", model
    assert default_dtype("cuda") == "float16"  # no model named
    for device in ("cpu", "mps"):
        for model in ("tiny-flux", "tiny-sdxl", None):
            assert default_dtype(device, model) == "float32"
    with pytest.raises(StorySyncUserError, match="--model: unknown model or preset 'no-such-model'"):
        default_dtype("cuda", "no-such-model")


@pytest.mark.parametrize("model, dtype", [("tiny-flux", "bfloat16"), ("tiny-sdxl", "float16")])
def test_a_cuda_job_renders_frames_and_anchors_in_the_family_s_dtype(model: str, dtype: str, tmp_path: Path) -> None:
    story = str(write_story(tmp_path))
    plan = prepare_job(story, RenderOptions(model=model, out=str(tmp_path / "out")), device="cuda")
    assert plan.settings.dtype == dtype and plan.config.anchor_dtype == dtype
    column = json.loads(plan.config_json)
    assert column["dtype"] == dtype and column["storysync"]["anchor_dtype"] == dtype
    # --dtype still wins, and the anchors follow it.
    plan = prepare_job(story, RenderOptions(model=model, out=str(tmp_path / "out"), dtype="float32"), device="cuda")
    assert plan.settings.dtype == "float32" and plan.config.anchor_dtype == "float16"


def test_the_cli_renders_flux_on_cuda_in_bfloat16_with_bfloat16_anchors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "check_local_device", lambda device: None)  # this machine "has" CUDA
    assert device_and_dtype("cuda", None, "tiny-flux") == ("cuda", torch.bfloat16)
    loaded: list[tuple[str, torch.dtype]] = []

    def load_on_the_cpu(model: str, *, device: str, dtype: torch.dtype, offload: str) -> object:
        loaded.append((device, dtype))
        return load_pipeline(model, device="cpu", dtype=dtype, offload=offload)

    monkeypatch.setattr(run, "load_pipeline", load_on_the_cpu)
    out = tmp_path / "out"
    assert main(["render", str(write_story(tmp_path)), "--model", "tiny-flux", "--out", str(out), "--device", "cuda",
                 "--no-progress", "--save-anchors"]) == 0
    assert loaded == [("cuda", torch.bfloat16)]
    rows = open_dataset(out).to_table().to_pylist()
    assert len(rows) == 3
    for row in rows:
        column = json.loads(row["config"])
        assert column["dtype"] == "bfloat16" and column["storysync"]["anchor_dtype"] == "bfloat16"
    bundle = AnchorBundle.from_bytes((out / bundle_relpath("fox")).read_bytes())
    assert {layer.hidden.dtype for step in bundle.steps.values() for layer in step.layers.values()} == {torch.bfloat16}
