"""The FLUX family (models/flux.py) on the offline tiny-flux preset: stock equality (schnell's
model card call, 256 T5 tokens; dev's 512), the text length a story may ask for, anchor_dtype
following the model's dtype, the transformer's attention backend, subject maps and RoPE'd shared
keys against dense references, StorySync renders layer by layer against the plain references of
test_mechanism_references, the CLI, random-flux's size."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _replay import assert_render_replays, replayed
from _stories import fox_story
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed
from PIL import Image

from storysync_dist.cli import main
from storysync_dist.core.anchors import AnchorBundle
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.state import ROLE_ANCHORS, StorySyncState
from storysync_dist.engine.renderer import FrameJob, RenderSettings, StoryRenderer
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.flux import FluxAdapter, FluxFamily, FluxStorySyncProcessor
from storysync_dist.models.flux_presets import FLUX_PRESETS
from storysync_dist.models.presets import load_pipeline, preset_path
from storysync_dist.models.registry import adapter_for, model_info

STEPS, SIZE = 2, 64


@pytest.fixture(scope="module")
def adapter() -> FluxAdapter:
    ad = adapter_for(load_pipeline("tiny-flux"))
    assert isinstance(ad, FluxAdapter)
    return ad


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def job(adapter: FluxAdapter, index: int, scene: str, seed: int) -> FrameJob:
    prompt = f"a photo of a ginger cat {scene}"
    ids = adapter.tokenizer(prompt).input_ids
    cat = adapter.tokenizer("cat", add_special_tokens=False).input_ids
    positions = [k for k in range(len(ids)) if ids[k : k + len(cat)] == cat]
    assert positions
    return FrameJob(f"f{index}", index, prompt, None, seed, [positions])


def jobs(adapter: FluxAdapter) -> list[FrameJob]:
    scenes = ["on a beach", "in a kitchen", "in a garden", "on a roof"]
    return [job(adapter, i, s, 100 + i) for i, s in enumerate(scenes)]


def settings(guidance: float = 0.0, size: int = SIZE) -> RenderSettings:
    return RenderSettings("tiny-flux", STEPS, size, size, guidance)


def stock(pipe, frame: FrameJob, guidance: float = 0.0, size: int = SIZE, max_sequence_length: int = 256):
    """The stock call as the model card makes it: FLUX.1-schnell's ``max_sequence_length=256``
    (tiny-flux is schnell-shaped); FLUX.1-dev's is the pipeline's default, 512."""
    return pipe(
        prompt=[frame.prompt], num_inference_steps=STEPS, height=size, width=size, guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(frame.seed)], max_sequence_length=max_sequence_length,
    ).images[0]


# ---- family info ------------------------------------------------------------------------------
def test_info_from_folder_matches_the_pipeline(adapter: FluxAdapter) -> None:
    folder, loaded = model_info("tiny-flux"), adapter.info
    for info in (folder, loaded):
        assert info.family == "flux" and info.size_factor == 16
        assert (info.text_len, info.max_text_len) == (256, 512)  # schnell-shaped: schnell's 256 T5 tokens
        assert (info.default_height, info.default_width) == (1024, 1024)
        assert (info.default_steps, info.default_guidance_scale) == (4, 0.0)  # schnell-like
        assert info.negative_prompt is False
        assert info.share_layers == ("single_transformer_blocks",) and info.mask_layers == ("transformer_blocks",)
    text = "a small red fox in the snow"
    assert folder.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids == adapter.tokenizer(text).input_ids
    assert adapter.latent_hw(64, 128) == (4, 8)
    assert preset_path("tiny-flux").joinpath("tokenizer_2").is_dir()
    from_folder = load_pipeline(str(preset_path("tiny-flux")))
    assert type(from_folder).__name__ == "FluxPipeline" and from_folder.vae_scale_factor == 8


def test_defaults_follow_the_stock_call() -> None:
    import inspect

    from diffusers import FluxPipeline

    from storysync_dist.models.flux import DEFAULT_SAMPLE_SIZE, DEV_DEFAULTS, MAX_SEQUENCE_LENGTH

    params = inspect.signature(FluxPipeline.__call__).parameters
    assert DEV_DEFAULTS == (params["num_inference_steps"].default, params["guidance_scale"].default)
    assert MAX_SEQUENCE_LENGTH == params["max_sequence_length"].default  # dev's, and the pipeline's limit
    assert "true_cfg_scale" in params and params["true_cfg_scale"].default == 1.0  # no CFG batch by default
    pipe = load_pipeline("tiny-flux")
    assert DEFAULT_SAMPLE_SIZE == pipe.default_sample_size


# ---- mechanisms off == stock ------------------------------------------------------------------
def test_every_mechanism_off_equals_stock_diffusers(adapter: FluxAdapter) -> None:
    frame = jobs(adapter)[2]
    ours = StoryRenderer(adapter, StorySyncConfig.vanilla(), settings()).render_frame(frame, None).image
    assert ours.size == (SIZE, SIZE)
    assert np.array_equal(pixels(ours), pixels(stock(adapter.pipe, frame)))
    assert all(type(p) is FluxAttnProcessor for p in adapter.pipe.transformer.attn_processors.values())


def test_guidance_embedding_model_equals_stock_and_has_no_cfg_batch() -> None:
    # A dev-like tiny model: guidance embedding and the dynamic (mu) shift; guidance 3.5 > 1 must
    # not make a CFG batch (FLUX feeds the scale to the embedding).
    preset = FLUX_PRESETS["tiny-flux"]
    components = {**preset.components, "transformer": {**preset.components["transformer"], "guidance_embeds": True},
                  "scheduler": {**preset.components["scheduler"], "shift": 3.0, "use_dynamic_shifting": True}}
    pipe = dataclasses.replace(preset, components=components).build()
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # as from_pretrained leaves them (T5's dropout)
    dev = FluxAdapter(pipe)
    assert (dev.info.default_steps, dev.info.default_guidance_scale, dev.info.text_len) == (28, 3.5, 512)
    frame = jobs(dev)[1]
    ours = StoryRenderer(dev, StorySyncConfig.vanilla(), settings(3.5)).render_frame(frame, None).image
    assert np.array_equal(pixels(ours), pixels(stock(pipe, frame, 3.5, max_sequence_length=512)))
    # BLI with lambda = 1 for every step follows the vanilla branch (within float rounding).
    config = StorySyncConfig(share_attention=False, harmonize=False, bli_fraction=1.0, bli_lambda=1.0)
    bli = StoryRenderer(dev, config, settings(3.5)).render_anchors([frame])[0][0].image
    assert np.abs(pixels(bli) - pixels(ours)).max() <= 1


# ---- FLUX.1-schnell's text length: 256 T5 tokens, as its model card calls it -----------------------
def _story_file(tmp_path: Path, **defaults) -> Path:
    path = tmp_path / f"story{len(list(tmp_path.glob('story*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(fox_story(3, steps=STEPS, height=SIZE, width=SIZE, **defaults)))
    return path


def test_schnell_vanilla_frames_are_the_model_card_call(adapter: FluxAdapter, tmp_path: Path) -> None:
    # --method vanilla through the Python API against FLUX.1-schnell's model card call,
    # pipe(prompt, ..., max_sequence_length=256); a story may ask for 512, the pipeline's default.
    from _pixels import frame_pixels

    from storysync_dist.api import RenderOptions, render_story
    from storysync_dist.engine.job import prepare_job

    for asked, out in ((None, "card"), (512, "long")):
        story = str(_story_file(tmp_path, **({} if asked is None else {"max_sequence_length": asked})))
        options = RenderOptions(model="tiny-flux", out=str(tmp_path / out), method="vanilla", progress=False)
        plan = prepare_job(story, options, pipe=adapter.pipe)
        assert plan.settings.max_sequence_length == (asked or 256)
        assert f'"max_sequence_length": {asked or 256}' in plan.config_json
        render_story(story, options, pipe=adapter.pipe)
        got = frame_pixels(tmp_path / out)
        for frame_id, frame in plan.jobs.items():
            assert np.array_equal(got[frame_id], pixels(stock(adapter.pipe, frame, max_sequence_length=asked or 256)))
    # The two lengths give other pixels (T5 padding tokens take part in the joint attention), so
    # the text length is part of the frame's identity.
    assert not np.array_equal(frame_pixels(tmp_path / "card")["snow"], frame_pixels(tmp_path / "long")["snow"])
    card = prepare_job(str(_story_file(tmp_path)), RenderOptions(model="tiny-flux", out=str(tmp_path / "x"),
                                                                 method="vanilla", progress=False))
    assert card.fingerprints["snow"] != plan.fingerprints["snow"]


@pytest.mark.parametrize(("model", "asked", "message"), [
    ("tiny-flux", 513, "takes at most 512 text tokens"),
    ("tiny-sdxl", 128, "has a fixed text length (77 tokens"),
    ("tiny-kandinsky3", 256, "has a fixed text length (128 tokens"),
])
def test_a_text_length_the_pipeline_does_not_take_is_refused(tmp_path: Path, model: str, asked: int,
                                                             message: str) -> None:
    from storysync_dist.api import RenderOptions
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.errors import StorySyncUserError

    story = str(_story_file(tmp_path, max_sequence_length=asked))
    with pytest.raises(StorySyncUserError, match=re.escape(f"defaults.max_sequence_length={asked}: --model {model} "
                                                           + message)):
        prepare_job(story, RenderOptions(model=model, out=str(tmp_path / "o"), progress=False))


# ---- anchor_dtype follows the model ------------------------------------------------------------------
def test_anchor_dtype_follows_the_model_dtype(adapter: FluxAdapter, tmp_path: Path) -> None:
    from storysync_dist.api import RenderOptions
    from storysync_dist.engine.job import prepare_job

    config = StorySyncConfig()
    assert config.anchor_dtype is None  # the model's
    assert [config.with_anchor_dtype(d).anchor_dtype for d in ("bfloat16", "float16", "float32")] == [
        "bfloat16", "float16", "float16"]
    assert StorySyncConfig(anchor_dtype="float32").with_anchor_dtype("bfloat16").anchor_dtype == "float32"
    # Jobs resolve it before the config column and the fingerprints: a bfloat16 FLUX publishes
    # bfloat16 anchors; a float32 one float16 anchors, as before.
    story = str(_story_file(tmp_path))
    for pipe, want in ((load_pipeline("tiny-flux", dtype=torch.bfloat16), torch.bfloat16), (adapter.pipe, torch.float16)):
        plan = prepare_job(story, RenderOptions(model="tiny-flux", out=str(tmp_path / str(want)), progress=False),
                           pipe=pipe)
        name = str(want).removeprefix("torch.")
        assert plan.config.anchor_dtype == name and f'"anchor_dtype": "{name}"' in plan.config_json
        _, bundle = StoryRenderer(adapter_for(pipe), plan.config, plan.settings).render_anchors(plan.anchor_jobs)
        layers = [layer for step in bundle.steps.values() for layer in step.layers.values()]
        assert layers and all(layer.hidden.dtype == layer.features.dtype == want for layer in layers)
        back = AnchorBundle.from_bytes(bundle.to_bytes())
        assert next(iter(back.steps[0].layers.values())).hidden.dtype == want
    # A state built outside a job, its config left to the model, stores by the same rule.
    state = _state(StorySyncConfig(share_layers=("single",), mask_layers=("dual",)), [1, 2], [1])
    hidden = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    state.record_anchor_layer("single.0", 4, hidden, hidden, torch.ones(2, 4, dtype=torch.bool))
    assert state.published[0].layers["single.0"].hidden.dtype == torch.bfloat16


def test_prompts_must_fit_the_text_length(tmp_path: Path) -> None:
    # At schnell's 256 tokens a longer prompt is refused (not truncated, which would cut subject
    # tokens out of the masks); a story that asks for 512 takes it.
    from storysync_dist.api import RenderOptions
    from storysync_dist.engine.job import prepare_job
    from storysync_dist.errors import StorySyncUserError

    story = fox_story(1, steps=STEPS, height=SIZE, width=SIZE)
    story["frames"][0]["prompt"] = "{fox} " + "in the snow " * 90
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(story))
    options = RenderOptions(model="tiny-flux", out=str(tmp_path / "o"), progress=False)
    with pytest.raises(StorySyncUserError, match="takes at most 256"):
        prepare_job(str(path), options)
    story["defaults"]["max_sequence_length"] = 512
    path.write_text(yaml.safe_dump(story))
    assert prepare_job(str(path), options).settings.max_sequence_length == 512


# ---- the transformer's attention backend ------------------------------------------------------------
def test_the_default_backend_gives_the_pixels_of_plain_sdpa(adapter: FluxAdapter, monkeypatch) -> None:
    # StorySync's joint attention goes through diffusers' dispatch with the layer's backend; with the
    # stock default (native) the frames equal those of the torch SDPA call it replaced.
    import storysync_dist.models.flux as flux

    def render() -> list[np.ndarray]:
        story = jobs(adapter)
        renderer = StoryRenderer(adapter, StorySyncConfig(), settings())
        anchors, bundle = renderer.render_anchors(story[:2])
        return [pixels(a.image) for a in anchors] + [pixels(renderer.render_frame(story[2], bundle).image)]

    dispatched = render()
    monkeypatch.setattr(flux, "_attend", lambda q, k, v, backend=None: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(dispatched, render()))


def test_an_attention_backend_set_on_the_transformer_reaches_every_processor(monkeypatch) -> None:
    import diffusers.models.transformers.transformer_flux as stock_flux
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    import storysync_dist.models.flux as flux

    seen: list[tuple[str, object]] = []

    def spy(where: str, dispatch):
        def call(*args, **kwargs):
            seen.append((where, kwargs.get("backend")))
            return dispatch(*args, **kwargs)
        return call

    monkeypatch.setattr(flux, "dispatch_attention_fn", spy("storysync", flux.dispatch_attention_fn))
    monkeypatch.setattr(stock_flux, "dispatch_attention_fn", spy("stock", stock_flux.dispatch_attention_fn))
    before = _AttentionBackendRegistry._active_backend
    pipe = load_pipeline("tiny-flux")
    try:
        pipe.transformer.set_attention_backend("_native_math")  # also makes it the active backend
        _AttentionBackendRegistry.set_active_backend(before)  # so only the processors' own attribute says it
        ad = FluxAdapter(pipe)
        story = jobs(ad)
        renderer = StoryRenderer(ad, StorySyncConfig(), settings())
        _, bundle = renderer.render_anchors(story[:2])
        renderer.render_frame(story[2], bundle)
        StoryRenderer(ad, StorySyncConfig.vanilla(), settings()).render_frame(story[2], None)
    finally:
        _AttentionBackendRegistry.set_active_backend(before)
    assert {where for where, _ in seen} == {"storysync", "stock"}  # StorySync's path and stock layers
    assert all(backend == AttentionBackendName._NATIVE_MATH for _, backend in seen)
    # uninstall put the stock processors back, with their backend
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH
               for p in pipe.transformer.attn_processors.values())


# ---- dense references on a real FluxAttention ----------------------------------------------------
def _rope_reference(x: torch.Tensor, ids: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """RoPE by complex rotation of consecutive pairs: (N, H, d) at 3-axis ``ids`` (N, 3)."""
    angles = []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles.append(ids[:, axis, None].double() * freqs)
    theta = torch.cat(angles, dim=-1)  # (N, d/2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)[:, None]).flatten(-2).float()


AXES, HEADS, HEAD_DIM, TEXT, GRID = [4, 6, 6], 2, 16, 5, (3, 4)


def _ids() -> torch.Tensor:
    img = torch.zeros(*GRID, 3)
    img[..., 1] += torch.arange(GRID[0])[:, None]
    img[..., 2] += torch.arange(GRID[1])[None, :]
    return torch.cat([torch.zeros(TEXT, 3), img.reshape(-1, 3)])


def _attention(dual: bool) -> FluxAttention:
    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim if dual else None, dim_head=HEAD_DIM, heads=HEADS,
                         out_dim=dim, context_pre_only=False if dual else None, bias=True, eps=1e-6,
                         pre_only=not dual)
    for p in attn.parameters():  # random norm scales too, so the reference checks where they apply
        torch.nn.init.normal_(p, 0.0, 0.3 if p.ndim > 1 else 1.0)
    return attn.eval()


def _state(config: StorySyncConfig, seeds: list[int], positions: list[int]) -> StorySyncState:
    return StorySyncState(config, role=ROLE_ANCHORS, seeds=seeds, token_positions=[[positions]] * len(seeds),
                          latent_hw=GRID, num_steps=4, guidance=False, text_len=TEXT)


def _split(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (HEADS, HEAD_DIM))


@torch.no_grad()
def test_subject_maps_from_joint_attention_match_a_dense_reference() -> None:
    attn, ids = _attention(dual=True), _ids()
    rotary = FluxPosEmbed(10000, AXES)(ids)
    n = GRID[0] * GRID[1]
    img, txt = torch.randn(2, n, HEADS * HEAD_DIM), torch.randn(2, TEXT, HEADS * HEAD_DIM)
    config = StorySyncConfig(layout_interpolation=False, share_layers=("single",), mask_layers=("dual",))
    state = _state(config, [1, 2], [1, 3])
    proc = FluxStorySyncProcessor("dual.0", state, shares=False, maps=True, text_len=TEXT)
    out_img, out_txt = proc(attn, img, txt, image_rotary_emb=rotary)
    stock_img, stock_txt = FluxAttnProcessor()(attn, img, txt, image_rotary_emb=rotary)
    assert torch.allclose(out_img, stock_img, atol=1e-5) and torch.allclose(out_txt, stock_txt, atol=1e-5)
    (layer, maps), = state._maps[n]
    assert layer == "dual.0" and maps.shape == (2, n, 1)
    # Reference: image queries (to_q, norm_q, RoPE at their grid ids) x text keys (add_k_proj,
    # norm_added_k; text ids are 0 so RoPE is the identity), softmax over the text keys, head mean.
    q = _rope_reference(attn.norm_q(_split(attn.to_q(img))), ids[TEXT:], AXES)
    k = attn.norm_added_k(_split(attn.add_k_proj(txt)))
    probs = torch.softmax(torch.einsum("bnhd,bthd->bhnt", q, k) / math.sqrt(HEAD_DIM), dim=-1).mean(dim=1)
    expected = (probs[..., 1] + probs[..., 3])[..., None] / 2
    assert torch.allclose(maps, expected, atol=1e-5)


@torch.no_grad()
def test_shared_keys_keep_their_rope_positions() -> None:
    # Single-stream block, two anchors sharing subject tokens (no dropout, no RFH, no BLI): image
    # i attends to its own [text | image] keys and image j's subject keys at j's grid positions.
    attn, ids = _attention(dual=False), _ids()
    rotary = FluxPosEmbed(10000, AXES)(ids)
    n = GRID[0] * GRID[1]
    x = torch.randn(2, TEXT + n, HEADS * HEAD_DIM)
    config = StorySyncConfig(layout_interpolation=False, harmonize=False, share_dropout=0.0, mask_dropout=0.0,
                             share_layers=("single",), mask_layers=("dual",))
    state = _state(config, [1, 2], [1])
    subject = torch.zeros(2, n)
    subject[0, [0, 5, 6]] = 1.0
    subject[1, [2, 7, 11]] = 1.0
    state.set_subject_map(subject, GRID)
    masks = state.masks(n)
    assert masks.sum().item() == 6
    out = FluxStorySyncProcessor("single.0", state, shares=True, maps=False, text_len=TEXT)(
        attn, x, image_rotary_emb=rotary)
    q = _rope_reference(attn.norm_q(_split(attn.to_q(x))), ids, AXES)
    k = _rope_reference(attn.norm_k(_split(attn.to_k(x))), ids, AXES)
    v = _split(attn.to_v(x))
    for i, j in ((0, 1), (1, 0)):
        shared = TEXT + masks[j].nonzero()[:, 0]
        keys, values = torch.cat([k[i], k[j][shared]]), torch.cat([v[i], v[j][shared]])
        probs = torch.softmax(torch.einsum("nhd,mhd->hnm", q[i], keys) / math.sqrt(HEAD_DIM), dim=-1)
        expected = torch.einsum("hnm,mhd->nhd", probs, values).flatten(1)
        assert torch.allclose(out[i, TEXT:], expected[TEXT:], atol=1e-4)
        # The text queries attend as stock: the shared subject tokens are for the image queries.
        probs = torch.softmax(torch.einsum("nhd,mhd->hnm", q[i], k[i]) / math.sqrt(HEAD_DIM), dim=-1)
        assert torch.allclose(out[i, :TEXT], torch.einsum("hnm,mhd->nhd", probs, v[i]).flatten(1)[:TEXT], atol=1e-4)
        assert not torch.allclose(out[i, TEXT:], torch.einsum("hnm,mhd->nhd", probs, v[i]).flatten(1)[TEXT:],
                                  atol=1e-3)
    # A frame rebuilds the anchors' keys from the published pre-RoPE hidden states: the same keys.
    positions = masks[1].nonzero()[:, 0]
    keys, values = FluxStorySyncProcessor.anchor_keys(attn, x[1, TEXT + positions], positions, rotary, TEXT)
    assert torch.allclose(keys, k[1][TEXT + positions].flatten(1), atol=1e-5)
    assert torch.allclose(values, v[1][TEXT + positions].flatten(1), atol=1e-6)
    # Without the positions (RoPE at 0) they would differ: the test sees RoPE.
    wrong, _ = FluxStorySyncProcessor.anchor_keys(attn, x[1, TEXT + positions], positions * 0, rotary, TEXT)
    assert not torch.allclose(wrong, keys, atol=1e-3)


# ---- StorySync frames ---------------------------------------------------------------------------
def test_storysync_frames_are_deterministic_independent_and_round_trip(adapter: FluxAdapter) -> None:
    story = jobs(adapter)
    renderer = StoryRenderer(adapter, StorySyncConfig(), settings())
    with replayed(adapter) as replay:
        anchors, bundle = renderer.render_anchors(story[:2])
        in_sequence = [renderer.render_frame(f, bundle) for f in story[2:]]
    # Every joint attention of the anchors' and the frames' renders returned what the plain
    # reference computes from its inputs (sharing with RoPE'd anchor keys, RFH, BLI, dropouts),
    # and sharing and RFH did act, in the single-stream blocks only.
    assert_render_replays(replay)
    assert all(c.name.startswith("single_transformer_blocks") for c in replay.calls if c.did.shared or c.did.moved)
    assert [a.is_anchor for a in anchors] == [True, True]
    layers = bundle.steps[0].layers
    assert layers and all(name.startswith("single_transformer_blocks") for name in layers)
    again = renderer.render_frame(story[3], bundle)
    alone = StoryRenderer(adapter, StorySyncConfig(), settings()).render_frame(story[3], bundle)
    assert np.array_equal(pixels(in_sequence[1].image), pixels(again.image))
    assert np.array_equal(pixels(in_sequence[1].image), pixels(alone.image))
    assert alone.mask is not None and alone.mask.shape == (SIZE, SIZE) and alone.mask.any()
    imported = AnchorBundle.from_bytes(bundle.to_bytes())
    fresh = StoryRenderer(adapter, StorySyncConfig(), settings()).render_frame(story[3], imported)
    assert np.array_equal(pixels(fresh.image), pixels(alone.image))


@pytest.mark.parametrize("changes", [
    {"bli_target": "output"},
    {"mask_source": "previous"},
    {"share_layers": ("transformer_blocks", "single_transformer_blocks"), "mask_source": "previous"},
], ids=["bli-on-outputs", "previous-masks", "share-in-dual-blocks-too"])
def test_config_variants_do_what_the_method_says(adapter: FluxAdapter, changes: dict) -> None:
    # Each variant's anchors and frame, layer by layer, against the plain reference.
    story = jobs(adapter)
    config = StorySyncConfig(**changes)
    renderer = StoryRenderer(adapter, config, settings())
    with replayed(adapter) as replay:
        _, bundle = renderer.render_anchors(story[:2])
        frame = renderer.render_frame(story[2], bundle).image
    assert_render_replays(replay)
    assert frame.size == (SIZE, SIZE)
    if config.mask_source == "previous":  # no mask, hence no sharing, at step 0
        assert not any(c.did.shared or c.did.moved for c in replay.calls if c.step == 0)
    if "transformer_blocks" in (config.share_layers or ()):
        assert any(name.startswith("transformer_blocks") for name in bundle.steps[1].layers)
        assert any(c.did.shared for c in replay.calls if c.name.startswith("transformer_blocks"))


# ---- CLI -----------------------------------------------------------------------------------------
STORY = fox_story(3)


def test_cli_renders_and_refuses_a_negative_prompt(tmp_path: Path) -> None:
    story = tmp_path / "story.yaml"
    story.write_text(yaml.safe_dump(STORY))
    args = ["--model", "tiny-flux", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]
    assert main(["render", str(story), "--out", str(tmp_path / "out"), *args]) == 0
    rows = open_dataset(tmp_path / "out").to_table().to_pylist()
    assert {r["frame_id"] for r in rows} == {"meadow", "stream", "snow"}
    assert all(Image.open(io.BytesIO(r["image"]["bytes"])).size == (64, 64) for r in rows)
    negative = tmp_path / "negative.yaml"
    negative.write_text(yaml.safe_dump({**STORY, "defaults": {"negative_prompt": "blurry"}}))
    assert main(["render", str(negative), "--out", str(tmp_path / "neg"), *args]) == 2


# ---- random-flux ---------------------------------------------------------------------------------
def test_random_flux_is_the_full_flux1_architecture() -> None:
    preset = FLUX_PRESETS["random-flux"]
    assert preset.in_memory
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**preset.components["transformer"])
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320  # FLUX.1-dev
    info = FluxFamily().info_from_folder(preset_path("random-flux"), {"_class_name": "FluxPipeline"})
    assert (info.default_steps, info.default_guidance_scale, info.default_height) == (28, 3.5, 1024)
