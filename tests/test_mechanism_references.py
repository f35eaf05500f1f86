"""Plain references for the mechanisms of section 3, and tests for those that had none: RFH on
frames against the anchors' features, the seeded subject-mask dropout, the ``no-mask`` ablation,
FLUX BLI at a fractional lambda and FLUX RFH. Each runs the real processor class on a real
diffusers attention module with random tensors and compares it with the reference written here:
a dense softmax with a log-mask (Eq. 7-8), RFH with Otsu's gate in exact arithmetic (Eq. 9-11),
a blend of the queries (Eq. 12) and the seeded draws, written out.

The same references check real renders (``replayed``): every StorySync self-attention of a render
is recomputed here from the inputs it was given, so a build that drops sharing, RFH or BLI in any
layer, any step or any family fails the family tests (test_engine, test_flux, test_kandinsky3,
test_families), not only these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _references import expected_flux_attention, expected_self_attention, plain_keep, plain_otsu_mask
from _replay import assert_layer_output, call_and_expect
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed

from storysync_dist.core.anchors import AnchorBundle, AnchorStep, SharedLayerState
from storysync_dist.core.config import StorySyncConfig, resolve_config
from storysync_dist.core.dropout import KIND_MASK
from storysync_dist.core.state import COND, CONSISTENT, ROLE_ANCHORS, ROLE_FRAMES, VANILLA, StorySyncState
from storysync_dist.models.attention import StorySyncSelfAttnProcessor
from storysync_dist.models.flux import FluxStorySyncProcessor
from tests.test_core_math import make_attention

# Float32 processors against float64 references: the last bits of a layer's output.
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module", autouse=True)
def no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


# ---- processor tests: the UNet self-attention ---------------------------------------------------------
NAME = "up_blocks.0.attn1.processor"
N, DIM, GRID = 16, 16, (4, 4)


def _bundle(gen: torch.Generator, guidance: int, n: int = N, dim: int = DIM, name: str = NAME,
            step: int = 1) -> AnchorBundle:
    """Two anchors' published state of one layer at one step: random hidden states and features
    (half precision, as published) at random subject tokens."""
    index = (torch.rand(2 * n, generator=gen) > 0.5).nonzero(as_tuple=True)[0]
    layer = SharedLayerState(
        index=index, hidden=torch.randn(guidance, index.numel(), dim, generator=gen).half(),
        features=torch.randn(guidance, index.numel(), dim, generator=gen).half(), num_tokens=n,
    )
    return AnchorBundle(meta={"num_anchors": 2}, steps={step: AnchorStep(step, {name: layer})})


def _state(config: StorySyncConfig, role: str, seeds: list[int], *, grid: tuple[int, int] = GRID,
           aggregated: torch.Tensor | None = None, bundle: AnchorBundle | None = None, guidance: bool = False,
           step: int = 1, text_len: int = 77) -> StorySyncState:
    """A state at ``step`` whose subject map is ``aggregated`` (F, h*w), at the layer's grid."""
    st = StorySyncState(config, role=role, seeds=list(seeds), token_positions=[[[1]]] * len(seeds),
                        latent_hw=grid, num_steps=4, guidance=guidance, bundle=bundle, text_len=text_len)
    if aggregated is not None:
        st.set_subject_map(aggregated, grid)
    st.step = step
    return st


def _untouched_outside(got: torch.Tensor, plain: torch.Tensor, masks: torch.Tensor, rows: list[slice]) -> None:
    """RFH moved some subject patches of the consistent rows, and nothing else: ``plain`` is the
    same layer without RFH."""
    moved = ~torch.isclose(got, plain, rtol=RTOL, atol=ATOL).all(dim=-1)  # (B, N)
    assert moved.any()
    subject = torch.zeros_like(moved)
    for rs in rows:
        subject[rs] = masks
    assert not (moved & ~subject).any()


@pytest.mark.parametrize("share", [True, False], ids=["sharing", "rfh-only"])
def test_frame_rfh_against_the_anchors_features_matches_the_plain_reference(share: bool) -> None:
    """Frames harmonize against the anchors' published features (Eq. 11 with I_j the anchors:
    one reference set per anchor, per guidance branch) with the default gamma, tau and seeded RFH
    dropout, on top of sharing with the default share dropout, or alone."""
    attn = make_attention()
    gen = torch.Generator().manual_seed(30)
    config = StorySyncConfig(share_attention=share, layout_interpolation=False, mask_dropout=0.0,
                             share_layers=("up_blocks",))
    assert config.harmonize and config.rfh_dropout > 0 and config.share_dropout > 0
    bundle = _bundle(gen, guidance=2)
    aggregated = torch.rand(2, N, generator=gen)
    st = _state(config, ROLE_FRAMES, [5, 6], aggregated=aggregated, bundle=bundle, guidance=True)
    x = torch.randn(st.batch_size, N, DIM, generator=gen)
    masks = plain_otsu_mask(aggregated)
    got, want, did = call_and_expect(StorySyncSelfAttnProcessor(NAME, st, shares=True), attn, x, masks=masks)
    assert_layer_output(got, want, did)
    assert did.moved > 0 and (did.shared > 0) == share
    # Without RFH the output would be outside the tolerance on subject patches only.
    plain_state = _state(config.replace(harmonize=False), ROLE_FRAMES, [5, 6], aggregated=aggregated,
                         bundle=bundle, guidance=True)
    plain, _ = expected_self_attention(attn, x, plain_state, NAME, shares=True, masks=masks)
    _untouched_outside(got, plain, masks, [st.rows("uncond", CONSISTENT), st.rows("cond", CONSISTENT)])


def test_frame_rfh_reads_the_anchors_features() -> None:
    """R_j of Eq. 11 for a frame are the features the anchors published: other features in the
    bundle (same tokens, same hidden states) give another output, each the reference's."""
    attn = make_attention()
    gen = torch.Generator().manual_seed(31)
    config = StorySyncConfig(share_attention=False, layout_interpolation=False, mask_dropout=0.0,
                             share_layers=("up_blocks",))
    bundle = _bundle(gen, guidance=1)
    layer = bundle.steps[1].layers[NAME]
    other = AnchorBundle(meta=bundle.meta, steps={1: AnchorStep(1, {NAME: SharedLayerState(
        layer.index, layer.hidden, torch.randn(layer.features.shape, generator=gen).half(), layer.num_tokens)})})
    aggregated = torch.rand(1, N, generator=gen)
    x = torch.randn(1, N, DIM, generator=gen)
    outs = []
    for b in (bundle, other):
        st = _state(config, ROLE_FRAMES, [5], aggregated=aggregated, bundle=b)
        got, want, did = call_and_expect(StorySyncSelfAttnProcessor(NAME, st, shares=True), attn, x,
                                         masks=plain_otsu_mask(aggregated))
        assert_layer_output(got, want, did)
        outs.append(got)
        assert did.moved > 0
    assert not torch.allclose(outs[0], outs[1], rtol=RTOL, atol=ATOL)


# ---- the subject-mask dropout (section 3.3) ---------------------------------------------------------
def test_mask_dropout_is_a_seeded_draw_per_image_step_and_resolution() -> None:
    """The default mask_dropout (0.1) drops subject patches from M_i, one draw per (image seed,
    step, layer size); the anchors share, harmonize and publish with the dropped masks."""
    config = StorySyncConfig(layout_interpolation=False, share_layers=("up_blocks",))
    assert config.mask_dropout == 0.1
    gen = torch.Generator().manual_seed(32)
    side, seeds = 16, [3, 4]
    n = side * side
    aggregated = torch.rand(2, n, generator=gen)
    st = _state(config, ROLE_ANCHORS, seeds, grid=(side, side), aggregated=aggregated, step=2)
    undropped = plain_otsu_mask(aggregated)
    keeps = torch.stack([plain_keep(n, 0.1, seed, 2, n, KIND_MASK) for seed in seeds])
    assert torch.equal(st.masks(n), undropped & keeps)
    assert (undropped & ~keeps).any(dim=1).all()  # every image lost subject patches
    assert not torch.equal(keeps[0], keeps[1])  # one draw per image
    assert not torch.equal(keeps[0], plain_keep(n, 0.1, seeds[0], 3, n, KIND_MASK))  # and per step

    # Through the processor: sharing, RFH and the published tokens all follow the dropped masks.
    attn = make_attention()
    x = torch.randn(2, n, DIM, generator=gen)
    got, want, did = call_and_expect(StorySyncSelfAttnProcessor(NAME, st, shares=True), attn, x,
                                     masks=undropped & keeps)
    assert_layer_output(got, want, did)
    assert did.shared > 0 and did.moved > 0
    without, _ = expected_self_attention(attn, x, st, NAME, shares=True, masks=undropped)
    assert not torch.allclose(got, without, rtol=RTOL, atol=ATOL)
    published = st.published[2].layers[NAME]
    assert torch.equal(published.index, (undropped & keeps).reshape(-1).nonzero(as_tuple=True)[0])


# ---- the no-mask ablation (Table 3a) -------------------------------------------------------------------
def test_no_mask_ablation_shares_and_harmonizes_over_every_token() -> None:
    """``--ablation no-mask``: no cross-attention map is collected; the anchors attend to every
    token of each other (Gamma all ones: Eq. 6 unmasked, less the share dropout), publish every
    token, and a frame attends to all of them and harmonizes every patch against them."""
    config = resolve_config(ablation="no-mask").replace(layout_interpolation=False, share_layers=("up_blocks",))
    assert not config.use_masks and not config.needs_masks and config.share_dropout > 0
    gen = torch.Generator().manual_seed(33)
    attn = make_attention()
    st = _state(config, ROLE_ANCHORS, [1, 2], step=0)
    assert not st.wants_maps(N) and st.sharing_ready  # no map, and sharing from step 0 all the same
    x = torch.randn(2, N, DIM, generator=gen)
    got, want, did = call_and_expect(StorySyncSelfAttnProcessor(NAME, st, shares=True), attn, x,
                                     masks=torch.ones(2, N, dtype=torch.bool))
    assert_layer_output(got, want, did)
    assert 0 < did.shared < 2 * N and did.moved > 0  # every token a candidate; the share dropout took some
    assert st.published[0].layers[NAME].index.tolist() == list(range(2 * N))

    bundle = AnchorBundle(meta={"num_anchors": 2}, steps=dict(st.published))
    frame = _state(config, ROLE_FRAMES, [9], bundle=bundle, step=0)
    y = torch.randn(1, N, DIM, generator=gen)
    got, want, did = call_and_expect(StorySyncSelfAttnProcessor(NAME, frame, shares=True), attn, y,
                                     masks=torch.ones(1, N, dtype=torch.bool))
    assert_layer_output(got, want, did)
    assert did.shared > 0 and did.moved > 0


# ---- FLUX ---------------------------------------------------------------------------------------------
AXES, HEADS, HEAD_DIM, TEXT, FLUX_GRID = [4, 6, 6], 2, 16, 5, (3, 4)
FLUX_N, FLUX_DIM = FLUX_GRID[0] * FLUX_GRID[1], HEADS * HEAD_DIM


def _flux_attention(dual: bool) -> FluxAttention:
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=FLUX_DIM, added_kv_proj_dim=FLUX_DIM if dual else None, dim_head=HEAD_DIM,
                         heads=HEADS, out_dim=FLUX_DIM, context_pre_only=False if dual else None, bias=True, eps=1e-6,
                         pre_only=not dual)
    for p in attn.parameters():  # random norm scales too, so the reference sees where they apply
        torch.nn.init.normal_(p, 0.0, 0.3 if p.ndim > 1 else 1.0)
    return attn.eval()


def _flux_rotary() -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(*FLUX_GRID, 3)
    img[..., 1] += torch.arange(FLUX_GRID[0])[:, None]
    img[..., 2] += torch.arange(FLUX_GRID[1])[None, :]
    return FluxPosEmbed(10000, AXES)(torch.cat([torch.zeros(TEXT, 3), img.reshape(-1, 3)]))


def _consistent_image(out: Any) -> torch.Tensor:
    """The consistent row's image tokens of a FLUX attention output ([vanilla | consistent] rows)."""
    return out[0][1] if isinstance(out, tuple) else out[1, TEXT:]


@pytest.mark.parametrize("lam", [0.25, 0.7])
@pytest.mark.parametrize("block", ["single", "dual"])
def test_flux_bli_at_a_fractional_lambda_matches_the_plain_reference(lam: float, block: str) -> None:
    """FLUX BLI (Eq. 12 on the image queries) at a fractional lambda with sharing on: the
    consistent row's image queries are (1 - lambda) Q_c + lambda Q_v and attend to its own joint
    keys and the anchors' subject keys; the vanilla row and the text queries are stock."""
    dual = block == "dual"
    attn, rotary = _flux_attention(dual), _flux_rotary()
    gen = torch.Generator().manual_seed(34)
    name = f"{block}.0"
    config = StorySyncConfig(harmonize=False, bli_fraction=1.0, bli_lambda=lam, mask_dropout=0.0,
                             share_layers=(block,), mask_layers=("none",))
    bundle = _bundle(gen, guidance=1, n=FLUX_N, dim=FLUX_DIM, name=name)
    aggregated = torch.rand(1, FLUX_N, generator=gen)
    st = _state(config, ROLE_FRAMES, [5], grid=FLUX_GRID, aggregated=aggregated, bundle=bundle, text_len=TEXT)
    assert st.branches == (VANILLA, CONSISTENT)
    if dual:
        args = (torch.randn(2, FLUX_N, FLUX_DIM, generator=gen), torch.randn(2, TEXT, FLUX_DIM, generator=gen))
    else:
        args = (torch.randn(2, TEXT + FLUX_N, FLUX_DIM, generator=gen), None)
    proc = FluxStorySyncProcessor(name, st, shares=True, maps=False, text_len=TEXT)
    got, want, did = call_and_expect(proc, attn, *args, image_rotary_emb=rotary)
    assert_layer_output(got, want, did)
    assert did.shared > 0
    stock = FluxAttnProcessor()(attn, *args, image_rotary_emb=rotary)
    if dual:
        torch.testing.assert_close(got[0][0], stock[0][0], rtol=RTOL, atol=ATOL)  # the vanilla row
    else:
        torch.testing.assert_close(got[0], stock[0], rtol=RTOL, atol=ATOL)  # the vanilla row
        torch.testing.assert_close(got[1, :TEXT], stock[1, :TEXT], rtol=RTOL, atol=ATOL)  # text queries
    # lambda is what weighs the blend: 1 - lambda gives another output.
    other = _state(config.replace(bli_lambda=1 - lam), ROLE_FRAMES, [5], grid=FLUX_GRID, aggregated=aggregated,
                   bundle=bundle, text_len=TEXT)
    flipped, _ = expected_flux_attention(attn, *args, rotary, other, name, True, TEXT)
    assert not torch.allclose(_consistent_image(flipped), _consistent_image(got), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("role", [ROLE_FRAMES, ROLE_ANCHORS])
def test_flux_rfh_matches_the_plain_reference(role: str) -> None:
    """FLUX RFH on the image tokens' attention outputs of a single-stream block, with the default
    gamma, tau and dropouts: a frame against the anchors' published features, the anchors against
    each other; the text tokens and the background patches are left alone."""
    attn, rotary = _flux_attention(False), _flux_rotary()
    gen = torch.Generator().manual_seed(35)
    name = "single.0"
    config = StorySyncConfig(layout_interpolation=False, mask_dropout=0.0, share_layers=("single",),
                             mask_layers=("none",))
    frames = role == ROLE_FRAMES
    bundle = _bundle(gen, guidance=1, n=FLUX_N, dim=FLUX_DIM, name=name) if frames else None
    seeds = [5] if frames else [5, 6]
    aggregated = torch.rand(len(seeds), FLUX_N, generator=gen)
    st = _state(config, role, seeds, grid=FLUX_GRID, aggregated=aggregated, bundle=bundle, text_len=TEXT)
    x = torch.randn(st.batch_size, TEXT + FLUX_N, FLUX_DIM, generator=gen)
    masks = plain_otsu_mask(aggregated)
    proc = FluxStorySyncProcessor(name, st, shares=True, maps=False, text_len=TEXT)
    got, want, did = call_and_expect(proc, attn, x, image_rotary_emb=rotary, masks=masks)
    assert_layer_output(got, want, did)
    assert did.moved > 0 and did.shared > 0
    plain_state = _state(config.replace(harmonize=False), role, seeds, grid=FLUX_GRID, aggregated=aggregated,
                         bundle=bundle, text_len=TEXT)
    plain, _ = expected_flux_attention(attn, x, None, rotary, plain_state, name, True, TEXT, masks=masks)
    torch.testing.assert_close(got[:, :TEXT], plain[:, :TEXT], rtol=RTOL, atol=ATOL)  # the text tokens
    _untouched_outside(got[:, TEXT:], plain[:, TEXT:], masks, [st.rows(COND, CONSISTENT)])
