"""Offline presets: real CLIP tokenizer, real diffusers pipelines with tiny seeded weights."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file

from storysync_dist.models import preset_build, presets
from storysync_dist.models.info import load_model_info
from storysync_dist.models.presets import PRESETS, UnknownModelError, load_pipeline, preset_path
from storysync_dist.models.tokenizer import build_clip_tokenizer

EXPECTED_CLASSES = {"tiny-sd": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
# The presets of every family that are saved and loaded back; random-* presets are only built in memory.
# Built from seeds and saved (not `toyworld`, a trained folder: tests/test_toyworld_model.py).
SAVED = sorted(name for name, preset in PRESETS.items() if not preset.in_memory and preset.folder is None)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("storysync-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(shared_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never touch the developer's ~/.cache; one build per session is shared by the tests below.
    monkeypatch.setenv("STORYSYNC_CACHE", str(shared_cache))


def test_clip_tokenizer_matches_openai_ids() -> None:
    tok = build_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.pad_token_id == 49407
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


def test_sdxl_second_tokenizer_pads_with_bang() -> None:
    tok = build_clip_tokenizer(pad_token="!")
    assert tok.pad_token_id == 0
    assert tok("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_preset_loads_real_pipeline(name: str) -> None:
    """The UNet presets: real classes, the engine's layout (other families test their own)."""
    pipe = load_pipeline(name)
    assert type(pipe) is EXPECTED_CLASSES[name]
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # Cross-attention at two decoder resolutions, as the engine's processors expect.
    up_cross = {key.split(".")[1] for key in pipe.unet.attn_processors if key.startswith("up_blocks.")}
    assert len(up_cross) == 2
    if name == "tiny-sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.tokenizer_2.pad_token == "!"
        assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
        assert pipe.scheduler.config.timestep_spacing == "leading"
    else:
        assert pipe.safety_checker is None
        assert isinstance(pipe.scheduler, PNDMScheduler)
        assert pipe.scheduler.config.skip_prk_steps


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.rglob("*.safetensors")):
        rel = file.relative_to(folder).as_posix()
        out.update({f"{rel}:{key}": value for key, value in load_file(file).items()})
    return out


@pytest.mark.parametrize("name", SAVED)
def test_preset_build_is_bit_identical(
    name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = []
    for sub in ("a", "b"):
        monkeypatch.setenv("STORYSYNC_CACHE", str(tmp_path / sub))
        folders.append(preset_path(name))
    assert folders[0] != folders[1] and folders[0].name == folders[1].name
    first, second = (_tensors(folder) for folder in folders)
    assert first.keys() == second.keys() and len(first) > 100
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_losing_a_build_race_keeps_the_winner(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYSYNC_CACHE", str(tmp_path))
    target = preset_path("tiny-sd")
    before = (target / "model_index.json").stat().st_mtime_ns
    # A second process that finishes after the first renamed its copy into place.
    preset_build.build_into(PRESETS["tiny-sd"], target)
    assert (target / "model_index.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


@pytest.mark.parametrize("name", SAVED)
def test_stock_pipeline_renders(name: str) -> None:
    pipe = load_pipeline(name)
    out = pipe(
        "a photo of a cat",
        height=64,
        width=128,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (128, 64)


@pytest.mark.parametrize("name", SAVED)
def test_load_pipeline_from_saved_folder(name: str) -> None:
    pipe = load_pipeline(str(preset_path(name)))
    assert type(pipe) is PRESETS[name].pipeline_class


@pytest.mark.parametrize("model", ["not-a-model", "./missing/folder", "tiny-sdxxl"])
def test_unknown_model_is_rejected(model: str) -> None:
    message = (
        f"unknown model or preset {model!r}: not a local folder, not a hub id, "
        "and not one of the presets: " + ", ".join(sorted(PRESETS))
    )
    with pytest.raises(UnknownModelError, match=re.escape(message)):
        load_pipeline(model)


def test_hub_id_shape() -> None:
    assert presets.looks_like_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    assert not presets.looks_like_hub_id("./models/sdxl")
    assert not presets.looks_like_hub_id("/abs/path")
    assert not presets.looks_like_hub_id("tiny-sd")


def test_random_sdxl_has_sdxl_base_unet() -> None:
    # On the meta device: the architecture without allocating its 10 GB of float32 weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS["random-sdxl"].components["unet"])
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == (320, 640, 1280)
    assert tuple(cfg.transformer_layers_per_block) == (1, 2, 10)
    assert tuple(cfg.attention_head_dim) == (5, 10, 20)
    assert cfg.cross_attention_dim == 2048
    assert cfg.addition_embed_type == "text_time" and cfg.addition_time_embed_dim == 256
    assert cfg.projection_class_embeddings_input_dim == 2816
    assert cfg.use_linear_projection and cfg.sample_size == 128
    # SDXL base 1.0's UNet has 2,567,463,684 parameters.
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert PRESETS["random-sdxl"].in_memory and not PRESETS["tiny-sdxl"].in_memory


def test_random_sdxl_folder_has_configs_but_no_weights() -> None:
    folder = preset_path("random-sdxl")
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    assert not list(folder.rglob("*.safetensors"))
    info = load_model_info("random-sdxl")  # what a driver reads to validate prompts and sizes
    assert info.size_factor == 32
    assert info.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
