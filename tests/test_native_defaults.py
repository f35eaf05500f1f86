"""Sampling settings a story leaves out come from the model, as its stock pipeline picks them:
size = unet sample_size x VAE scale factor, steps and guidance = the pipeline's ``__call__``
defaults. Precedence: RenderOptions (the CLI) > the story's ``defaults`` > the model."""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path

import pytest
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.engine.job import prepare_job
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.info import load_model_info, model_info_from_pipeline
from storysync_dist.models.presets import UnknownModelError, load_pipeline
from storysync_dist.models.unet import FAMILY_SAMPLING_DEFAULTS, sampling_defaults
from storysync_dist.models.unet_presets import _SDXL_BASE_UNET, _SDXL_BASE_VAE

STORY = {
    "id": "owl",
    "subjects": [{"name": "owl", "description": "a small brown owl", "tokens": ["owl"]}],
    "frames": [
        {"id": "branch", "prompt": "{owl} on a branch"},
        {"id": "moon", "prompt": "{owl} flying past the moon"},
        {"id": "barn", "prompt": "{owl} in a barn"},
    ],
}
# Family -> (the stock guidance scale); the tiny presets' UNets have sample_size 32, VAE factor 8.
EXPECTED_GUIDANCE = {"tiny-sdxl": 5.0, "tiny-sd": 7.5}

_PIPES: dict[str, object] = {}


def pipe_of(model: str) -> object:
    if model not in _PIPES:
        _PIPES[model] = load_pipeline(model)
    return _PIPES[model]


def write_story(tmp: Path, **defaults: object) -> str:
    story = dict(STORY)
    if defaults:
        story["defaults"] = defaults
    path = tmp / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return str(path)


def stock_size(pipe: object) -> tuple[int, int]:
    """What the stock pipeline renders at when called without height/width (diffusers' own rule)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        side = pipe.default_sample_size * pipe.vae_scale_factor
    else:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd"])
def test_a_story_without_sizes_renders_at_the_pipelines_own_size(model: str, tmp_path: Path) -> None:
    pipe = pipe_of(model)
    height, width = stock_size(pipe)
    assert (height, width) == (256, 256)
    out = tmp_path / "out"
    # No height, width or guidance in the story; steps=2 only to keep the test fast.
    result = render_story(write_story(tmp_path), RenderOptions(model=model, out=str(out), steps=2, progress=False),
                          pipe=pipe)
    assert sorted(result.rendered) == ["barn", "branch", "moon"]
    rows = open_dataset(out).to_table().to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (width, height)
        assert (row["width"], row["height"]) == (width, height)
        config = json.loads(row["config"])
        assert config["steps"] == 2 and (config["height"], config["width"]) == (height, width)
        assert config["guidance_scale"] == EXPECTED_GUIDANCE[model]
        assert config["negative_prompt"] is None  # left out: stock "no negative prompt", not ""
    entry = json.loads((out / "manifest.json").read_text())["stories"]["owl"]
    assert entry["config"]["height"] == height and entry["config"]["guidance_scale"] == EXPECTED_GUIDANCE[model]


def test_resolution_order_cli_then_story_then_model(tmp_path: Path) -> None:
    story = write_story(tmp_path, steps=3, height=128, negative_prompt="")
    options = RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), height=64, progress=False)
    plan = prepare_job(story, options)
    s = plan.settings
    assert s.height == 64  # the CLI beats the story's 128
    assert s.steps == 3  # the story, over the model's 50
    assert s.width == 256 and s.guidance_scale == 5.0  # neither says: the model's own
    assert s.negative_prompt == ""  # an explicit empty negative prompt stays one
    assert all(job.negative_prompt == "" for job in plan.jobs.values())
    assert (plan.spec.defaults.height, plan.spec.defaults.width, plan.spec.defaults.steps) == (64, 256, 3)
    config = json.loads(plan.config_json)
    assert (config["height"], config["width"], config["steps"], config["guidance_scale"]) == (64, 256, 3, 5.0)
    assert plan.identity.height == 64 and plan.identity.width == 256 and plan.identity.steps == 3
    assert not (tmp_path / "out").exists()  # planning writes nothing

    # With nothing on the command line and nothing in the story, everything is the model's.
    bare = prepare_job(write_story(tmp_path), RenderOptions(model="tiny-sd", out=str(tmp_path / "out")))
    assert (bare.settings.steps, bare.settings.height, bare.settings.width) == (50, 256, 256)
    assert bare.settings.guidance_scale == 7.5 and bare.settings.negative_prompt is None
    assert all(job.negative_prompt is None for job in bare.jobs.values())


def test_a_model_default_changes_the_fingerprint_like_an_explicit_value(tmp_path: Path) -> None:
    # An omitted size is the model's size, not "unknown": the same frame as writing it out.
    implicit = prepare_job(write_story(tmp_path), RenderOptions(model="tiny-sdxl", out=str(tmp_path / "o"), steps=2))
    explicit = prepare_job(write_story(tmp_path, height=256, width=256, guidance_scale=5.0),
                           RenderOptions(model="tiny-sdxl", out=str(tmp_path / "o"), steps=2))
    assert implicit.fingerprints == explicit.fingerprints
    assert implicit.config_json == explicit.config_json
    other = prepare_job(write_story(tmp_path), RenderOptions(model="tiny-sdxl", out=str(tmp_path / "o"), steps=2,
                                                             height=128))
    assert set(other.fingerprints.values()).isdisjoint(implicit.fingerprints.values())
    empty_negative = prepare_job(write_story(tmp_path, negative_prompt=""),
                                 RenderOptions(model="tiny-sdxl", out=str(tmp_path / "o"), steps=2))
    assert set(empty_negative.fingerprints.values()).isdisjoint(implicit.fingerprints.values())


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd"])
def test_model_info_from_the_folder_and_from_the_loaded_pipeline_agree(model: str) -> None:
    folder, loaded = load_model_info(model), model_info_from_pipeline(pipe_of(model))
    for name in ("size_factor", "default_height", "default_width", "default_steps", "default_guidance_scale"):
        assert getattr(folder, name) == getattr(loaded, name), name
    assert folder.defaults.guidance_scale == EXPECTED_GUIDANCE[model]
    prompt = "a small brown owl on a branch"
    assert folder.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids


def test_sdxl_base_configs_give_1024_px_50_steps_guidance_5() -> None:
    # SDXL base 1.0's real unet/vae configs (not loaded: random-sdxl needs ~10 GB).
    d = sampling_defaults("StableDiffusionXLPipeline", _SDXL_BASE_UNET, _SDXL_BASE_VAE)
    assert (d.height, d.width, d.steps, d.guidance_scale) == (1024, 1024, 50, 5.0)
    # random-sdxl's folder holds those configs and no weights: the driver plans a 1024 px job.
    info = load_model_info("random-sdxl")
    assert (info.default_height, info.default_width, info.default_steps) == (1024, 1024, 50)


def test_a_driver_plans_sdxl_base_at_its_native_size_without_weights(tmp_path: Path) -> None:
    plan = prepare_job(write_story(tmp_path), RenderOptions(model="random-sdxl", out=str(tmp_path / "out")))
    assert (plan.settings.height, plan.settings.width, plan.settings.steps) == (1024, 1024, 50)
    assert plan.settings.guidance_scale == 5.0
    assert len(plan.frame_jobs) + len(plan.anchor_writes) == 3


def test_sd_sample_size_pairs_and_subclasses() -> None:
    vae = {"block_out_channels": [128, 256, 512, 512]}
    d = sampling_defaults("StableDiffusionPipeline", {"sample_size": [96, 64]}, vae)
    assert (d.height, d.width, d.steps, d.guidance_scale) == (768, 512, 50, 7.5)

    class MyXL(StableDiffusionXLPipeline):
        pass

    assert sampling_defaults(MyXL, {"sample_size": 64}, vae).guidance_scale == 5.0
    with pytest.raises(UnknownModelError, match="StableDiffusionXLImg2ImgPipeline is not a supported pipeline"):
        sampling_defaults("StableDiffusionXLImg2ImgPipeline", {"sample_size": 64}, vae)


@pytest.mark.parametrize("pipeline_class", [StableDiffusionXLPipeline, StableDiffusionPipeline])
def test_the_family_table_is_the_installed_diffusers_call_defaults(pipeline_class: type) -> None:
    params = inspect.signature(pipeline_class.__call__).parameters
    stock = (params["num_inference_steps"].default, params["guidance_scale"].default)
    assert FAMILY_SAMPLING_DEFAULTS[pipeline_class.__name__] == stock


def test_a_dry_run_shows_the_resolved_settings(tmp_path: Path, capsys) -> None:
    from storysync_dist.cli import main

    out = tmp_path / "out"
    assert main(["render", write_story(tmp_path), "--model", "random-sdxl", "--out", str(out), "--dry-run"]) == 0
    assert "settings: 1024x1024 px, 50 steps, guidance 5" in capsys.readouterr().out
    assert not out.exists()
