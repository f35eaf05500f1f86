"""Kandinsky 3 (``models/kandinsky3.py``) on its offline tiny preset, ``tiny-kandinsky3``.

Fast: 64 px, 2-3 steps. Mechanisms off equal the stock ``Kandinsky3Pipeline`` pixels (with and
without a negative prompt, one prompt and a batch); the processors sit on the right modules, told
apart by name; subject maps respect the text mask; every self-attention of a StorySync render
matches the plain references of test_mechanism_references; frames are deterministic, do not depend
on their companions and survive a bundle round trip; the CLI renders.
"""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _replay import assert_frames_independent
from _stories import fox_story
from diffusers import Kandinsky3Pipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from storysync_dist.api import RenderOptions
from storysync_dist.cli import main
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.masks import subject_attention
from storysync_dist.core.state import ROLE_ANCHORS, StorySyncState
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.renderer import StoryRenderer
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.attention import StorySyncSelfAttnProcessor as Kandinsky3SelfAttnProcessor
from storysync_dist.models.attention import SubjectMapProcessor
from storysync_dist.models.kandinsky3 import (
    DEFAULT_GUIDANCE,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    Kandinsky3Family,
    is_cross_attention,
    is_self_attention,
)
from storysync_dist.models.presets import load_pipeline, preset_path
from storysync_dist.models.registry import adapter_for, family_for_pipeline, model_info

PRESET = "tiny-kandinsky3"
SIZE, STEPS = 64, 3

STORY = fox_story(steps=STEPS, height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def pipe() -> Kandinsky3Pipeline:
    pipe = load_pipeline(PRESET)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _stock(pipe, prompts, negatives, seeds, guidance=3.0) -> list[np.ndarray]:
    kwargs = {"prompt": list(prompts), "num_inference_steps": STEPS, "height": SIZE, "width": SIZE,
              "guidance_scale": guidance, "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds]}
    if negatives is not None:
        kwargs["negative_prompt"] = list(negatives)
    return [_pixels(im) for im in pipe(**kwargs).images]


def _ours(pipe, prompts, negatives, seeds, config=None, guidance=3.0) -> list[np.ndarray]:
    adapter = adapter_for(pipe)
    info = adapter.info
    config = (config or StorySyncConfig.vanilla()).with_layers(info.share_layers, info.mask_layers)
    state = StorySyncState(
        config, role=ROLE_ANCHORS, seeds=list(seeds), token_positions=[[[1]] for _ in prompts],
        latent_hw=adapter.latent_hw(SIZE, SIZE), num_steps=STEPS, guidance=guidance > 1, text_len=info.text_len,
    )
    adapter.install(state)
    try:
        result = adapter.generate(state, list(prompts), negatives, list(seeds), num_steps=STEPS, height=SIZE,
                                  width=SIZE, guidance_scale=guidance)
    finally:
        adapter.uninstall()
    return [_pixels(im) for im in result.images]


# ---- the family ------------------------------------------------------------------------------------
def test_family_info_from_folder_and_pipeline_agree(pipe) -> None:
    assert family_for_pipeline(pipe).name == "kandinsky3"
    folder_info = model_info(PRESET)
    pipe_info = Kandinsky3Family().info_from_pipeline(pipe)
    for info in (folder_info, pipe_info):
        assert info.family == "kandinsky3" and info.text_len == 128 and info.size_factor == 64
        assert info.defaults.height == info.defaults.width == 1024
        assert (info.default_steps, info.default_guidance_scale) == (25, 3.0)
        assert info.negative_prompt and info.tokenizer.model_max_length == 128
        assert info.share_layers == ("up_blocks",) and info.mask_layers == ("down_blocks.2",)
    text = "A photo of a small red fox in the snow"
    assert folder_info.tokenizer(text).input_ids == pipe_info.tokenizer(text).input_ids
    # The defaults are the stock __call__'s.
    params = inspect.signature(Kandinsky3Pipeline.__call__).parameters
    assert params["height"].default == params["width"].default == DEFAULT_SIZE
    assert params["num_inference_steps"].default == DEFAULT_STEPS
    assert params["guidance_scale"].default == DEFAULT_GUIDANCE
    # The preset is saved and reloaded with from_pretrained, and renders the size asked for.
    assert (preset_path(PRESET) / "movq" / "config.json").is_file()
    assert pipe.text_encoder.config.d_model == pipe.unet.config.encoder_hid_dim


def test_the_preset_scheduler_is_the_hubs(pipe) -> None:
    # kandinsky-community/kandinsky-3 scheduler/scheduler_config.json, as the hub states it; the keys
    # it does not name are DDPMScheduler's defaults (models/kandinsky3.py).
    hub = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": True,
           "steps_offset": 1, "timestep_spacing": "leading", "variance_type": "fixed_small"}
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert {key: pipe.scheduler.config[key] for key in hub} == hub
    defaults = {name: p.default for name, p in inspect.signature(type(pipe.scheduler).__init__).parameters.items()
                if name != "self" and name not in hub}
    assert {key: pipe.scheduler.config[key] for key in defaults} == defaults
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps.tolist() == list(range(951, 0, -50))  # "leading" with steps_offset 1


# ---- mechanisms off == stock ---------------------------------------------------------------------
@pytest.mark.parametrize("negatives", [None, ["blurry"]], ids=["no-negative-prompt", "negative-prompt"])
def test_mechanisms_off_equal_stock_one_prompt(pipe, negatives) -> None:
    prompts = ["a photo of a small red fox in the snow"]
    ours, stock = _ours(pipe, prompts, negatives, [5]), _stock(pipe, prompts, negatives, [5])
    assert ours[0].shape == (SIZE, SIZE, 3)
    assert np.array_equal(ours[0], stock[0])


@pytest.mark.parametrize("negatives", [None, ["blurry", "dark"]], ids=["no-negative-prompt", "negative-prompt"])
def test_mechanisms_off_equal_stock_batch(pipe, negatives) -> None:
    # Prompts of the same token count: the stock batch then cuts no image's text differently.
    prompts = ["a fox in the snow", "a fox by the sea"]
    assert np.array_equal(np.stack(_ours(pipe, prompts, negatives, [3, 4])),
                          np.stack(_stock(pipe, prompts, negatives, [3, 4])))


def test_mechanisms_off_prompts_of_different_lengths_equal_each_stock_render_alone(pipe) -> None:
    # The stock batch would average each image's pooled text over the longest prompt; ours renders
    # each image as the stock pipeline renders it alone (the engine batches frames freely).
    prompts = ["a fox", "a small red fox in a city at night with lights"]
    ours = _ours(pipe, prompts, ["blurry", "dark and noisy"], [3, 4])
    for i, prompt in enumerate(prompts):
        alone = _stock(pipe, [prompt], [["blurry", "dark and noisy"][i]], [[3, 4][i]])[0]
        assert np.abs(ours[i] - alone).max() <= 1


def test_without_guidance_equal_stock(pipe) -> None:
    prompts = ["a fox in the snow"]
    assert np.array_equal(_ours(pipe, prompts, None, [2], guidance=1.0)[0], _stock(pipe, prompts, None, [2], 1.0)[0])


def test_bli_branch_draws_its_own_scheduler_noise(pipe) -> None:
    # BLI with lambda 0 runs the vanilla branch beside the consistent one and moves nothing: DDPM's
    # per-step variance noise must still be the stock draws for the consistent branch.
    config = StorySyncConfig(share_attention=False, harmonize=False, layout_interpolation=True, bli_lambda=0.0)
    prompts = ["a fox in the snow", "a fox by the sea"]
    ours = _ours(pipe, prompts, None, [3, 4], config=config)
    assert np.array_equal(np.stack(ours), np.stack(_stock(pipe, prompts, None, [3, 4])))


def test_uninstall_restores_the_stock_processors(pipe) -> None:
    stock = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    _ours(pipe, ["a fox in the snow"], None, [1], config=StorySyncConfig())
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == stock


# ---- processors on the right modules ---------------------------------------------------------------
def test_self_and_cross_attention_told_apart_by_module_name(pipe) -> None:
    unet = pipe.unet
    names = list(unet.attn_processors)
    self_names = [n for n in names if is_self_attention(n)]
    cross_names = [n for n in names if is_cross_attention(n)]
    assert "add_time_condition.attention.processor" in names
    assert not set(self_names) & set(cross_names)
    assert set(names) - set(self_names) - set(cross_names) == {"add_time_condition.attention.processor"}
    # Every block of the tiny UNet with attention has one self-attention (attentions.0) and
    # layers_per_block cross-attentions.
    levels = len(unet.config.block_out_channels)
    assert len(self_names) == 2 * (levels - 1)
    assert len(cross_names) == 2 * (levels - 1) * unet.config.layers_per_block

    # Which module really attends to its own input: record whether the context is the input.
    seen: dict[str, bool] = {}

    class Probe(AttnProcessor2_0):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **k):
            seen[self.name] = encoder_hidden_states is hidden_states
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    stock = dict(unet.attn_processors)
    unet.set_attn_processor({n: Probe(n) for n in names})
    try:
        pipe(prompt=["a fox"], num_inference_steps=1, height=SIZE, width=SIZE)
    finally:
        unet.set_attn_processor(stock)
    assert {n for n, own in seen.items() if own} == set(self_names)

    adapter = adapter_for(pipe)
    info = adapter.info
    state = StorySyncState(StorySyncConfig().with_layers(info.share_layers, info.mask_layers), role=ROLE_ANCHORS,
                           seeds=[0, 1], token_positions=[[[1]], [[1]]], latent_hw=adapter.latent_hw(SIZE, SIZE),
                           num_steps=STEPS, guidance=True, text_len=128)
    adapter.install(state)
    try:
        installed = unet.attn_processors
        for name in self_names:
            assert isinstance(installed[name], Kandinsky3SelfAttnProcessor)
            assert installed[name].shares == name.startswith("up_blocks")
        for name in cross_names:
            expected = SubjectMapProcessor if name.startswith("down_blocks.2") else AttnProcessor2_0
            assert type(installed[name]) is expected
    finally:
        adapter.uninstall()


# ---- subject maps with the text mask -------------------------------------------------------------
def test_masked_subject_maps_match_a_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, heads, patches, length, dim = 2, 3, 16, 10, 8
    query = torch.randn(batch, heads, patches, dim, generator=gen)
    key = torch.randn(batch, heads, length, dim, generator=gen)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[0, :4], valid[1, :7] = True, True
    bias = ((1 - valid.float()) * -10000.0)[:, None]  # as Kandinsky3UNet.forward makes it, (B, 1, L)
    weights = torch.zeros(batch, 128, 2)  # the state's 128 positions: subjects at tokens 1 and {2, 3}
    weights[:, 1, 0] = 1.0
    weights[:, [2, 3], 1] = 0.5

    maps = subject_attention(query, key, weights, bias)
    assert maps.shape == (batch, patches, 2)
    for b in range(batch):
        keys = key[b][:, valid[b]]  # padding tokens removed altogether
        probs = torch.softmax(query[b] @ keys.transpose(-1, -2) / math.sqrt(dim), dim=-1).mean(dim=0)
        expected = torch.stack([probs[:, 1], probs[:, [2, 3]].mean(dim=-1)], dim=-1)
        torch.testing.assert_close(maps[b], expected, rtol=1e-5, atol=1e-6)
    # Without the mask the padding would take probability mass: the maps would differ.
    assert not torch.allclose(subject_attention(query, key, weights), maps, atol=1e-3)


# ---- StorySync frames -------------------------------------------------------------------------------
def _story(tmp_path: Path) -> Path:
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump(STORY))
    return path


def test_storysync_frames(pipe, tmp_path: Path) -> None:
    adapter = adapter_for(pipe)
    plan = prepare_job(str(_story(tmp_path)), RenderOptions(model=PRESET, out=str(tmp_path / "o"), progress=False),
                       pipe=pipe)
    assert plan.config.share_layers == ("up_blocks",) and plan.config.mask_layers == ("down_blocks.2",)
    # The StorySync processors sat on exactly the self-attentions (context = their own input),
    # each call returned what the plain reference computes, a frame's pixels depend on its own
    # inputs only, and sharing and RFH acted in the decoder only.
    replay, bundle = assert_frames_independent(adapter, plan)
    assert {c.name for c in replay.calls} == {n for n in pipe.unet.attn_processors if is_self_attention(n)}
    assert all(c.name.startswith("up_blocks") for c in replay.calls if c.did.shared or c.did.moved)
    alone = StoryRenderer(adapter, plan.config, plan.settings).render_frame(plan.jobs["city"], bundle).image
    assert alone.size == (SIZE, SIZE)
    # The anchors published every shared layer at every step.
    first = bundle.step(0)
    assert first is not None and set(first.layers) == {
        n for n in pipe.unet.attn_processors if is_self_attention(n) and n.startswith("up_blocks")
    }


def test_cli_render(tmp_path: Path) -> None:
    out = tmp_path / "out"
    story = _story(tmp_path)
    assert main(["render", str(story), "--model", PRESET, "--out", str(out), "--steps", "2", "--height", "64",
                 "--width", "64", "--no-progress"]) == 0
    rows = open_dataset(out).to_table().to_pylist()
    assert {r["frame_id"] for r in rows} == {f["id"] for f in STORY["frames"]}
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (64, 64)
