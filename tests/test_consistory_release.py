"""``--method consistory`` as NVlabs released ConsiStory, in the four pieces that fit a one-pass
renderer, each against a plain reference written here (loops, dense ops, skimage's Otsu):

(a) its sampler: DDIM built from the model's scheduler config plus FreeU, for consistory only, on
    the families with FreeU, part of the fingerprint and the bundle, and gone for the next story;
(b) share dropout drawn once per step and resolution (its ``last_mask_dropout``), for every layer
    and querying image, the same bits on the anchors and on the frames;
(c) vanilla query blending: steps 1..steps//10, decoder self-attentions only, the vanilla queries
    from a stock pass on the same latents, weights ``linspace(0.9, 0.81836735, steps//10 + 1)``;
(d) masks from the maps averaged over layers and the last 20 steps, each subject Otsu-thresholded
    at each resolution and united.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from _stories import cat_job, fox_story
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from skimage.filters import threshold_otsu

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.core.anchors import AnchorBundle, BundleError
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.dropout import KIND_SHARE, dropout_seed, keep_mask, resolution_keep
from storysync_dist.core.layout import bli_schedule
from storysync_dist.core.masks import aggregate_subject_maps, subject_mask
from storysync_dist.core.methods import METHODS, method_config, method_sampling
from storysync_dist.core.state import ROLE_ANCHORS, ROLE_FRAMES, StorySyncState, layer_id
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.renderer import BundleMismatchError, RenderSettings, StoryRenderer, bundle_meta
from storysync_dist.errors import StorySyncUserError
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.attention import StorySyncSelfAttnProcessor
from storysync_dist.models.customize import apply_model_setup
from storysync_dist.models.denoise import BranchLatents
from storysync_dist.models.loading import load_pipeline
from storysync_dist.models.registry import adapter_for
from tests.test_core_math import make_attention, reference_self_attention

torch.set_grad_enabled(False)

UP = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
UP2 = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor"
DOWN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
RELEASE_STRENGTHS = (0.9, 0.81836735)  # its QueryStore's strength_start, strength_end
FREEU = (0.6, 0.4, 1.1, 1.2)


def _state(config: StorySyncConfig, role: str, seeds: list[int], num_steps: int, *,
           bundle: AnchorBundle | None = None, token_positions: list | None = None, latent_hw=(4, 4),
           text_len: int = 77, guidance: bool = False) -> StorySyncState:
    return StorySyncState(
        config.with_layers(("up_blocks",), ("up_blocks", "down_blocks")), role=role, seeds=seeds,
        token_positions=token_positions or [[[1]] for _ in seeds], latent_hw=latent_hw, num_steps=num_steps,
        guidance=guidance, bundle=bundle, text_len=text_len,
    )


# ---- (c) the blending schedule --------------------------------------------------------------------
def release_blending(n_steps: int) -> dict[int, float]:
    """ConsiStory's release, as a loop: QueryStore(t_range=[0, n_steps // 10], strengths
    linspace(0.9, 0.81836735, n_steps // 10 + 1)) injects at the steps where its extended attention
    runs (t_range (1, n_steps)), at strength strengths[t - 0]."""
    t_range = (0, n_steps // 10)
    strengths = np.linspace(*RELEASE_STRENGTHS, (t_range[1] - t_range[0]) + 1)
    out = {}
    for t in range(n_steps):
        extended = 1 <= t <= n_steps
        if extended and t_range[0] <= t <= t_range[1]:
            out[t] = float(strengths[t - t_range[0]])
    return out


def leading_blending(n_steps: int, fraction: float, lam: float) -> dict[int, float]:
    """StorySync's BLI as it always was: the first round(fraction * steps) steps, constant lambda."""
    return {t: lam for t in range(n_steps) if t < min(n_steps, round(fraction * n_steps))}


def test_bli_schedule_of_consistory_is_the_release_loop() -> None:
    config = method_config("consistory")
    got = config.bli_schedule(50)
    assert list(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(list(got.values()), np.linspace(0.9, 0.81836735, 6)[1:], rtol=0, atol=1e-15)
    for n in range(1, 121):
        want, have = release_blending(n), config.bli_schedule(n)
        assert list(have) == list(want), n
        np.testing.assert_allclose(list(have.values()), list(want.values()), rtol=0, atol=1e-15)
        # The batch holds the vanilla rows at the blending steps only (they run on the same latents).
        state = _state(config, ROLE_ANCHORS, [1, 2], n)
        for t in range(n):
            state.step = t
            assert state.has_vanilla == (t in want), (n, t)


@pytest.mark.parametrize("window", ["leading", "while_sharing"])
@pytest.mark.parametrize("lam_end", [None, 0.5])
def test_bli_schedule_matches_a_plain_loop(window: str, lam_end: float | None) -> None:
    for n in (1, 2, 7, 10, 20, 33, 50):
        for fraction in (0.0, 0.1, 0.25, 0.3, 1.0):
            for first in (0, 1, 3):
                got = bli_schedule(n, fraction, 0.9, lam_end, window, first)
                if window == "leading":
                    last, start = min(n, round(fraction * n)) - 1, 0
                else:
                    last, start = min(n - 1, int(np.floor(fraction * n + 1e-9))), first
                weights = np.full(last + 1, 0.9) if lam_end is None else np.linspace(0.9, lam_end, last + 1)
                want = {t: float(weights[t]) for t in range(start, last + 1)}
                assert list(got) == list(want), (n, fraction, first)
                np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-15)
    # StorySync's own BLI is what it was.
    for n in (1, 4, 20, 50):
        assert StorySyncConfig().bli_schedule(n) == leading_blending(n, 0.3, 0.7)
        assert StorySyncConfig().bli_steps(n) == min(n, round(0.3 * n))


def test_bli_in_shared_layers_only_and_none_outside_the_window() -> None:
    """A decoder (shared) self-attention blends at a blending step; an encoder one runs the stock
    attention on every row, vanilla rows included; outside the window the batch has no vanilla rows."""
    attn = make_attention()
    n, dim, steps = 16, 16, 20
    config = method_config("consistory")
    state = _state(config, ROLE_ANCHORS, [1, 2], steps)
    state.step = 1
    state.set_subject_map(torch.rand(2, n, generator=torch.Generator().manual_seed(3)), (4, 4))
    x = torch.randn(state.batch_size, n, dim, generator=torch.Generator().manual_seed(4))
    assert state.batch_size == 4 and state.bli_weight(True) == pytest.approx(np.linspace(0.9, 0.81836735, 3)[1])
    assert state.bli_weight(False) is None
    got = StorySyncSelfAttnProcessor(DOWN, state, shares=False)(attn, x)
    torch.testing.assert_close(got, AttnProcessor2_0()(attn, x))
    state.step = 3
    assert not state.has_vanilla and state.batch_size == 2 and state.bli_weight(True) is None


def test_mirrored_vanilla_branch_runs_on_the_consistent_latents() -> None:
    """``bli_latents: consistent``: at a blending step the vanilla rows get the consistent branch's
    model input and their prediction is dropped; the consistent trajectory is a plain loop's."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    vanilla_at = {1, 2, 5}

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * 3 + t.float() / 100)

    ours = BranchLatents(scheduler, latents, False, {}, mirror_vanilla=True)
    for i, t in enumerate(scheduler.timesteps):
        branches = ("vanilla", "consistent") if i in vanilla_at else ("consistent",)
        model_in = ours.model_input(branches, t)
        chunks = model_in.chunk(len(branches))
        if len(branches) == 2:
            assert torch.equal(chunks[0], chunks[1])
        noise = model(model_in, t).chunk(len(branches))
        ours.step(branches, noise, t)
        ours.drop("vanilla")

    plain = copy.deepcopy(scheduler)
    x = latents
    for t in plain.timesteps:
        x = plain.step(model(plain.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    torch.testing.assert_close(ours.latents["consistent"], x, rtol=0, atol=0)


def test_consistory_render_puts_vanilla_rows_on_the_same_latents_at_blending_steps_only() -> None:
    """On tiny-sdxl, 20 steps: the UNet batch holds [vanilla | consistent] rows (both guidance
    halves) at steps 1 and 2 only, and the vanilla rows are the consistent rows' input."""
    pipe = load_pipeline("tiny-sdxl")
    settings = RenderSettings(model="tiny-sdxl", steps=20, height=64, width=64, guidance_scale=5.0)
    adapter = adapter_for(pipe)
    renderer = StoryRenderer(adapter, method_config("consistory"), settings)
    anchors = [cat_job(adapter, 0, "in a garden", 11), cat_job(adapter, 1, "on a sofa", 12)]
    inputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        renderer.render_anchors(anchors)
    finally:
        hook.remove()
    for step, x in enumerate(inputs[:20]):  # pass 1 (the two-pass form renders the latents again)
        if step in (1, 2):
            assert x.shape[0] == 8, step  # [uncond | cond] x [vanilla | consistent] x 2 anchors
            for half in x.chunk(2):
                vanilla, consistent = half.chunk(2)
                assert torch.equal(vanilla, consistent), step
        else:
            assert x.shape[0] == 4, step


# ---- (b) share dropout once per step and resolution ----------------------------------------------
def release_keep(seed: int, step: int, num_tokens: int, rate: float) -> torch.Tensor:
    """The per-anchor draw, written out: rand >= rate from a generator keyed by (seed, step, N)."""
    generator = torch.Generator().manual_seed(dropout_seed(seed, step, num_tokens, 5))
    return torch.rand(num_tokens, generator=generator) >= rate


def _resolution_config() -> StorySyncConfig:
    return StorySyncConfig(harmonize=False, layout_interpolation=False, share_dropout=0.5,
                           share_dropout_scope="resolution", mask_dropout=0.0, mask_source="previous")


def test_resolution_keep_is_one_draw_per_anchor_step_and_resolution() -> None:
    seeds, step, n = [4, 9, 2], 3, 64
    keep = resolution_keep(seeds, step, n, 0.5)
    assert keep.shape == (3, n)
    for j, seed in enumerate(seeds):
        assert torch.equal(keep[j], release_keep(seed, step, n, 0.5))
    assert 0.35 < float(keep.float().mean()) < 0.65
    assert not torch.equal(resolution_keep(seeds, step + 1, n, 0.5), keep)


def test_anchors_share_one_draw_for_every_layer_and_querying_image() -> None:
    """Three anchors, two shared layers of one resolution: image i attends to its own tokens and
    to M_j & keep_j of every other anchor j, with the same keep_j for every i and both layers: a
    dense softmax with a log-mask over every anchor's tokens."""
    attn = make_attention()
    n, dim, seeds, step = 16, 16, [1, 2, 3], 2
    state = _state(_resolution_config(), ROLE_ANCHORS, seeds, 10)
    state.step = step
    state.set_subject_map(torch.rand(3, n, generator=torch.Generator().manual_seed(6)), (4, 4))
    masks = state.masks(n)
    keeps = [release_keep(seed, step, n, 0.5) for seed in seeds]
    for name, seed in ((UP, 7), (UP2, 8)):
        x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(seed))
        out = StorySyncSelfAttnProcessor(name, state, shares=True)(attn, x)
        for i in range(3):
            others = [j for j in range(3) if j != i]
            extra = torch.cat([x[j] for j in others])
            gamma = torch.cat([torch.ones(n, dtype=torch.bool)] + [masks[j] & keeps[j] for j in others])
            expected = attn.to_out[0](reference_self_attention(attn, x[i], extra, gamma))
            torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)


def test_frames_redraw_the_anchors_keep_whatever_their_seed() -> None:
    """A frame attends to exactly the anchor tokens the anchors kept at that step and resolution:
    the draw is read at the published positions, the same for every frame (and every layer)."""
    attn = make_attention()
    n, dim, seeds, step = 16, 16, [1, 2], 3
    anchors = _state(_resolution_config(), ROLE_ANCHORS, seeds, 10)
    anchors.step = step
    anchors.set_subject_map(torch.rand(2, n, generator=torch.Generator().manual_seed(9)), (4, 4))
    StorySyncSelfAttnProcessor(UP, anchors, shares=True)(attn, torch.randn(2, n, dim))
    layer = anchors.published[step].layers[UP]
    bundle = AnchorBundle(meta={"num_anchors": 2, "anchor_seeds": seeds}, steps=dict(anchors.published))
    keep = torch.cat([release_keep(s, step, n, 0.5) for s in seeds])[layer.index]
    y = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(10))
    outs = []
    for frame_seed in (5, 6):
        frame = _state(_resolution_config(), ROLE_FRAMES, [frame_seed], 10, bundle=bundle)
        frame.step = step
        frame.set_subject_map(torch.rand(1, n), (4, 4))
        assert all(torch.equal(k, keep) for k in frame.frame_share_keeps(UP, layer_id(UP), layer))
        outs.append(StorySyncSelfAttnProcessor(UP, frame, shares=True)(attn, y))
    shared = layer.hidden[0].float()[keep]
    torch.testing.assert_close(outs[0][0], attn.to_out[0](reference_self_attention(attn, y[0], shared, None)),
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_layer_scope_draws_as_before() -> None:
    """``share_dropout_scope: layer`` (StorySync's default): one draw per querying seed, step, layer."""
    config = StorySyncConfig(share_dropout=0.3)
    assert config.share_dropout_scope == "layer"
    state = _state(config, ROLE_ANCHORS, [4, 5], 10)
    state.step = 2
    got = state.anchor_share_keeps(layer_id(UP), 16)
    for seed, keep in zip([4, 5], got):
        assert torch.equal(keep, keep_mask((2, 16), 0.3, seed, 2, layer_id(UP), KIND_SHARE))


# ---- (d) masks from a window of steps ---------------------------------------------------------------
def release_masks(step_store: dict[str, list[torch.Tensor]], token_indices: list[list[int]], window: int,
                  src: int, targets: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The release's AttentionStore.aggregate_last_steps_attention, as written: the mean over the
    layers' last ``window`` maps; per image, each concept token's map, bilinearly upsampled to each
    resolution, ``map > threshold_otsu(map)``, united over the concepts."""
    attention_maps = torch.cat([torch.stack(x[-window:]) for x in step_store.values()]).mean(dim=0)
    out = {}
    for tgt in targets:
        masks = []
        for i in range(attention_maps.shape[0]):
            maps = torch.stack([attention_maps[i, :, k].view(src, src) for k in token_indices[i] if k != -1])
            maps = F.interpolate(maps.unsqueeze(1), size=tgt, mode="bilinear").squeeze(1)
            concept = [torch.from_numpy(m.numpy() > threshold_otsu(m.numpy())).view(-1) for m in maps]
            masks.append(torch.stack(concept).max(dim=0).values)
        out[tgt * tgt] = torch.stack(masks)
    return out


def test_window_masks_match_the_release_store() -> None:
    """Two images (the second with one subject of two), two 4x4 layers and a finer one that is not
    used, 8 steps, a window of 3: after each step the next step's masks at 4x4 and 8x8 are the
    release's."""
    window, text_len, steps = 3, 8, 8
    positions = [[[1], [3]], [[2]]]  # image 0: subjects at tokens 1 and 3; image 1: one subject at 2
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, mask_dropout=0.0, mask_source="window",
                             mask_window=window)
    state = _state(config, ROLE_FRAMES, [1, 2], steps, token_positions=positions, latent_hw=(8, 8),
                   text_len=text_len, bundle=AnchorBundle(meta={"num_anchors": 1, "anchor_seeds": [0]}))
    assert config.first_shared_step() == 1
    gen = torch.Generator().manual_seed(11)
    store: dict[str, list[torch.Tensor]] = defaultdict(list)
    for step in range(steps):
        for layer, tokens in (("down_blocks.2.a", 16), ("up_blocks.0.a", 16), ("up_blocks.1.a", 64)):
            probs = torch.softmax(torch.randn(2, tokens, text_len, generator=gen) * 3, dim=-1)
            state.record_map(tokens, probs @ state.token_weights, layer)
            if tokens == 16:
                store[layer].append(probs)
        state.end_step()
        want = release_masks(store, [[1, 3], [2, -1]], window, 4, (4, 8))
        for tokens in (16, 64):
            assert torch.equal(state.masks(tokens), want[tokens]), (step, tokens)
    assert state.mask_tokens == 16


def test_previous_masks_are_unchanged() -> None:
    """``mask_source: previous`` still thresholds the sum over subjects of step t-1's maps."""
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, mask_dropout=0.0, mask_source="previous")
    state = _state(config, ROLE_FRAMES, [1], 4, token_positions=[[[1], [2]]], latent_hw=(8, 8), text_len=4,
                   bundle=AnchorBundle(meta={"num_anchors": 1, "anchor_seeds": [0]}))
    maps = [torch.rand(1, 16, 2) for _ in range(2)]
    for m in maps:
        state.record_map(16, m, "l")
    state.end_step()
    assert torch.equal(state.masks(64), subject_mask(aggregate_subject_maps(maps), (4, 4), (8, 8)))


# ---- (a) the release's sampler -----------------------------------------------------------------------
STEPS, SIZE = 12, 64  # 12 steps: consistory blends at step 1 (12 // 10)


def write_story(folder: Path, frames: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(fox_story(frames, steps=STEPS, height=SIZE, width=SIZE)))
    return path


def options(out: Path, method: str, **extra) -> RenderOptions:
    return RenderOptions(out=str(out), method=method, model=extra.pop("model", "tiny-sdxl"), progress=False,
                         frame_batch=1, **extra)


def dataset_pixels(out: Path) -> dict[str, np.ndarray]:
    rows = open_dataset(str(out)).to_table().to_pylist()
    return {r["frame_id"]: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).astype(np.int16) for r in rows}


def test_the_sampler_override_is_consistory_s_on_freeu_families_only(tmp_path: Path) -> None:
    story = str(write_story(tmp_path))
    sampling = method_sampling("consistory")
    assert sampling is not None and sampling.scheduler == "DDIMScheduler" and sampling.freeu == FREEU
    for method in METHODS:
        plan = prepare_job(story, options(tmp_path / method, method))
        ours = method == "consistory"
        assert plan.settings.scheduler == ("DDIMScheduler" if ours else None), method
        assert plan.settings.freeu == (FREEU if ours else None), method
        description = plan.identity.to_dict()
        assert ("freeu" in description) == ours and ("scheduler" in description) == ours
        column = json.loads(plan.config_json)
        assert column.get("freeu") == (list(FREEU) if ours else None) and ("scheduler" in column) == ours
    # Families without FreeU keep their own sampler.
    for model in ("tiny-flux", "tiny-kandinsky3"):
        plan = prepare_job(story, options(tmp_path / model, "consistory", model=model))
        assert plan.settings.scheduler is None and plan.settings.freeu is None, model
    # A scheduler the user names wins over the method's (FreeU stays the method's).
    plan = prepare_job(story, options(tmp_path / "named", "consistory", scheduler="EulerAncestralDiscreteScheduler"))
    assert plan.settings.scheduler == "EulerAncestralDiscreteScheduler" and plan.settings.freeu == FREEU


def test_a_bundle_made_with_freeu_serves_only_jobs_with_it(tmp_path: Path) -> None:
    story = str(write_story(tmp_path))
    plan = prepare_job(story, options(tmp_path / "c", "consistory"))
    made = json.loads(json.dumps(bundle_meta(plan.config, plan.settings, plan.anchor_jobs)))  # as a file holds it
    bundle = AnchorBundle(meta=made)
    StoryRenderer.check_bundle_meta(bundle, plan.config, plan.settings)
    with pytest.raises(BundleMismatchError, match="FreeU"):
        StoryRenderer.check_bundle_meta(bundle, plan.config, dataclasses.replace(plan.settings, freeu=None))
    # A bundle file keeps the factors, and one with malformed factors is refused when read.
    assert AnchorBundle.from_bytes(AnchorBundle(meta=made).to_bytes()).meta["freeu"] == list(FREEU)
    with pytest.raises(BundleError, match="freeu"):
        AnchorBundle.from_bytes(AnchorBundle(meta={**made, "freeu": [1, 2]}).to_bytes())


def test_apply_model_setup_turns_freeu_and_ddim_on_and_off() -> None:
    pipe = load_pipeline("tiny-sdxl")
    base = pipe.scheduler
    apply_model_setup(pipe, "DDIMScheduler", (), FREEU)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert dict(pipe.scheduler.config) == dict(DDIMScheduler.from_config(base.config).config)
    assert all(getattr(block, "s1", None) == 0.6 and getattr(block, "b2", None) == 1.2 for block in pipe.unet.up_blocks)
    apply_model_setup(pipe, None, ())
    assert pipe.scheduler is base
    assert all(getattr(block, k, None) is None for block in pipe.unet.up_blocks for k in ("s1", "s2", "b1", "b2"))
    with pytest.raises(StorySyncUserError, match="FreeU"):
        apply_model_setup(load_pipeline("tiny-flux"), None, (), FREEU)


def test_consistory_renders_in_one_process_with_its_settings_and_leaves_the_pipeline_stock(tmp_path: Path) -> None:
    """``--method consistory`` on tiny-sdxl in this process: every new setting in the ``config``
    column, DDIM + FreeU on the pipeline while it renders; a vanilla story rendered next on the same
    pipeline equals one rendered on a fresh pipeline, pixel for pixel."""
    story = str(write_story(tmp_path))
    pipe = load_pipeline("tiny-sdxl")
    used: list[tuple[str, float | None]] = []
    original = pipe.unet.forward

    def spy(*args, **kwargs):
        used.append((type(pipe.scheduler).__name__, getattr(pipe.unet.up_blocks[0], "s1", None)))
        return original(*args, **kwargs)

    pipe.unet.forward = spy
    result = render_story(story, options(tmp_path / "consistory", "consistory"), pipe=pipe)
    pipe.unet.forward = original
    assert sorted(result.rendered) == ["meadow", "snow", "stream"]
    assert used and set(used) == {("DDIMScheduler", 0.6)}
    rows = open_dataset(str(tmp_path / "consistory")).to_table().to_pylist()
    column = json.loads(rows[0]["config"])
    assert column["method"] == "consistory" and column["scheduler"] == "DDIMScheduler" and column["freeu"] == list(FREEU)
    settings = column["storysync"]
    assert {k: settings[k] for k in ("mask_source", "share_dropout_scope", "bli_window", "bli_layers", "bli_latents",
                                     "bli_lambda_end", "share_dropout")} == {
        "mask_source": "window", "share_dropout_scope": "resolution", "bli_window": "while_sharing",
        "bli_layers": "shared", "bli_latents": "consistent", "bli_lambda_end": 0.81836735, "share_dropout": 0.5}
    assert "mask_window" not in settings  # 20, the default: left out (StorySyncConfig._LATER_DEFAULTS)
    # The same story with vanilla, on this pipeline after consistory and on a fresh one.
    render_story(story, options(tmp_path / "after", "vanilla"), pipe=pipe)
    assert not isinstance(pipe.scheduler, DDIMScheduler) and getattr(pipe.unet.up_blocks[0], "s1", None) is None
    render_story(story, options(tmp_path / "alone", "vanilla"), pipe=load_pipeline("tiny-sdxl"))
    after, alone = dataset_pixels(tmp_path / "after"), dataset_pixels(tmp_path / "alone")
    assert after.keys() == alone.keys() and all(np.array_equal(after[k], alone[k]) for k in alone)
    # ... and FreeU did change the picture on this model (the equality above is not trivial).
    pipe.enable_freeu(*FREEU)
    render_story(story, options(tmp_path / "freeu", "vanilla"), pipe=pipe)
    freeu = dataset_pixels(tmp_path / "freeu")
    assert any(not np.array_equal(freeu[k], alone[k]) for k in alone)


def test_stock_configs_keep_their_dict_and_fingerprint_keys() -> None:
    """The options added for the release are left out of ``to_dict`` at their defaults: StorySync's
    config column, fingerprints and bundle metadata are what they were."""
    added = {"share_dropout_scope", "bli_window", "bli_lambda_end", "bli_layers", "bli_latents", "mask_window"}
    for config in (StorySyncConfig(), StorySyncConfig.vanilla(), method_config("storydiffusion")):
        assert not added & set(config.to_dict())
        assert StorySyncConfig.from_dict(config.to_dict()) == config
    consistory = method_config("consistory")
    assert added - {"mask_window"} <= set(consistory.to_dict())
    assert StorySyncConfig.from_dict(consistory.to_dict()) == consistory
