"""Each equation of the paper against a plain reference written here (loops, dense softmax with a
log-mask) on random tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from skimage.filters import threshold_otsu

from storysync_dist.core.anchors import AnchorBundle, AnchorStep, SharedLayerState
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.dropout import keep_mask
from storysync_dist.core.harmonize import harmonize_batch, harmonize_regions
from storysync_dist.core.layout import interpolate_layout
from storysync_dist.core.masks import (
    aggregate_subject_maps,
    subject_attention,
    subject_mask,
    subject_token_weights,
    token_grid,
)
from storysync_dist.core.otsu import otsu_split, otsu_threshold
from storysync_dist.core.sharing import (
    anchor_admitted,
    cross_image_tokens,
    every_anchor_token,
    masked_shared_attention,
    pad_token_sets,
    propagation_mask,
    shared_attention,
)
from storysync_dist.core.state import CONSISTENT, ROLE_ANCHORS, ROLE_FRAMES, VANILLA, StorySyncState
from storysync_dist.models.attention import StorySyncSelfAttnProcessor

torch.set_grad_enabled(False)


def dense_masked_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, gamma: torch.Tensor):
    """Eq. 7-8 literally: softmax(q K_all^T / sqrt(d) + log Gamma) V_all for one image and head."""
    scores = q @ k_all.T / math.sqrt(q.shape[-1]) + torch.log(gamma.double())
    return torch.softmax(scores, dim=-1) @ v_all


# ---- Otsu ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "normal", "bimodal", "skewed"])
def test_otsu_matches_skimage(kind: str) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(6):
        if kind == "uniform":
            x = rng.random(1000)
        elif kind == "normal":
            x = rng.normal(size=4096)
        elif kind == "bimodal":
            x = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.8, 0.1, 300)])
        else:
            x = rng.exponential(size=1024) ** 2
        rows.append(x[: 1000])
    data = np.stack(rows)
    ours = otsu_threshold(torch.from_numpy(data)).numpy()
    for row, thr in zip(data, ours):
        expected = threshold_otsu(row)
        width = (row.max() - row.min()) / 256
        assert abs(thr - expected) <= 1e-9 * max(1.0, abs(expected)) or abs(thr - expected) <= width
        # The resulting foreground sets agree almost everywhere.
        assert np.mean((row > thr) == (row > expected)) > 0.995


def test_otsu_bimodal_separates_modes_and_constant_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    low = torch.rand(500, generator=gen) * 0.1
    high = 0.9 + torch.rand(200, generator=gen) * 0.1
    thr = otsu_threshold(torch.cat([low, high]))
    assert 0.1 <= thr <= 0.9
    assert otsu_threshold(torch.full((3, 10), 0.5)).tolist() == [0.5, 0.5, 0.5]


# ---- subject masks, Eq. 2-4 -------------------------------------------------------------------
def test_subject_attention_and_aggregation_match_loops() -> None:
    gen = torch.Generator().manual_seed(2)
    b, h, n, length, d = 2, 3, 16, 7, 8
    positions = [[[1], [3, 4]], [[2], [5]]]  # per image, per subject
    layers = []
    for _ in range(3):
        q = torch.randn(b, h, n, d, generator=gen)
        k = torch.randn(b, h, length, d, generator=gen)
        layers.append((q, k))
    weights = subject_token_weights(positions, length)
    maps = [subject_attention(q, k, weights) for q, k in layers]
    ours = aggregate_subject_maps(maps)

    expected = torch.zeros(b, n)
    for img in range(b):
        for subject_positions in positions[img]:
            per_layer = []
            for q, k in layers:
                acc = torch.zeros(n)
                for head in range(h):
                    for patch in range(n):
                        scores = torch.tensor([q[img, head, patch] @ k[img, head, t] / math.sqrt(d) for t in range(length)])
                        probs = torch.exp(scores - scores.max())
                        probs = probs / probs.sum()
                        acc[patch] += sum(probs[p] for p in subject_positions) / len(subject_positions)
                per_layer.append(acc / h)  # Eq. 2, averaged over heads
            expected[img] += sum(per_layer) / len(per_layer)  # Eq. 3 then Eq. 4
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_subject_mask_resizes_then_thresholds_per_image() -> None:
    gen = torch.Generator().manual_seed(3)
    agg = torch.rand(2, 4 * 4, generator=gen)
    agg[0, :5] += 3.0
    same = subject_mask(agg, (4, 4), (4, 4))
    for img in range(2):
        row = agg[img].numpy().astype(np.float64)
        assert torch.equal(same[img], torch.from_numpy(row > threshold_otsu(row)))
    up = subject_mask(agg, (4, 4), (8, 8))
    assert up.shape == (2, 64) and up.dtype == torch.bool
    assert token_grid(128, (16, 32)) == (8, 16)
    assert token_grid(32, (16, 32)) == (4, 8)
    with pytest.raises(ValueError):
        token_grid(64, (16, 32))


# ---- sharing, Eq. 5-8 and 13 ----------------------------------------------------------------
def test_propagation_mask_eq5() -> None:
    masks = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    gamma = propagation_mask(masks, 1)
    assert gamma.tolist() == [True, False, False, True, True, True, True, True, False]


@pytest.mark.parametrize("with_dropout", [False, True])
def test_shared_attention_matches_dense_log_mask(with_dropout: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    a, h, n, d = 3, 2, 12, 8
    q = torch.randn(a, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(a, h, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(a, h, n, d, generator=gen, dtype=torch.float64)
    masks = torch.rand(a, n, generator=gen) > 0.5
    keeps = [keep_mask((a, n), 0.4 if with_dropout else 0.0, 7, i) for i in range(a)]

    def merged(x):
        return x.transpose(1, 2).reshape(a, n, h * d)

    sets_k = [cross_image_tokens(merged(k), masks, i, keeps[i]) for i in range(a)]
    sets_v = [cross_image_tokens(merged(v), masks, i, keeps[i]) for i in range(a)]
    k_pad, valid = pad_token_sets(sets_k)
    v_pad, _ = pad_token_sets(sets_v)
    k_sh = k_pad.view(a, -1, h, d).transpose(1, 2)
    v_sh = v_pad.view(a, -1, h, d).transpose(1, 2)
    ours = shared_attention(q, k, v, k_sh, v_sh, valid)

    for i in range(a):
        gamma = propagation_mask(masks & keeps[i], i)  # own tokens always admitted
        for head in range(h):
            k_all = k[:, head].reshape(a * n, d)
            v_all = v[:, head].reshape(a * n, d)
            expected = dense_masked_attention(q[i, head], k_all, v_all, gamma)
            torch.testing.assert_close(ours[i, head], expected)


def test_anchor_form_eq13_frames_attend_to_anchor_subject_tokens_only() -> None:
    gen = torch.Generator().manual_seed(5)
    h, n, d = 2, 10, 4
    anchors_k = torch.randn(2, h, n, d, generator=gen, dtype=torch.float64)
    anchors_v = torch.randn(2, h, n, d, generator=gen, dtype=torch.float64)
    anchor_masks = torch.rand(2, n, generator=gen) > 0.4
    q = torch.randn(1, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, h, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, h, n, d, generator=gen, dtype=torch.float64)
    # K_sub, V_sub of Eq. 13: the anchors' subject tokens.
    k_sub = torch.cat([anchors_k[j][:, anchor_masks[j]] for j in range(2)], dim=1)[None]
    v_sub = torch.cat([anchors_v[j][:, anchor_masks[j]] for j in range(2)], dim=1)[None]
    ours = shared_attention(q, k, v, k_sub, v_sub, None)
    for head in range(h):
        k_all = torch.cat([k[0, head], anchors_k[0, head], anchors_k[1, head]])
        v_all = torch.cat([v[0, head], anchors_v[0, head], anchors_v[1, head]])
        gamma = torch.cat([torch.ones(n, dtype=torch.bool), anchor_masks[0], anchor_masks[1]])
        torch.testing.assert_close(ours[0, head], dense_masked_attention(q[0, head], k_all, v_all, gamma))


# ---- RFH, Eq. 9-11 ---------------------------------------------------------------------------
def reference_rfh(features, mask, refs, gamma, tau, keep):
    out = features.clone()
    active = [r for r in range(features.shape[0]) if mask[r] and keep[r]]
    per_ref = []
    for ref in refs:
        matches, scores = [], []
        for r in active:
            sims = []
            for w in range(ref.shape[0]):
                a, b = features[r], ref[w]
                sims.append(float(a @ b / (a.norm() * b.norm())))  # normalized inner product
            exps = [math.exp(s / tau) for s in sims]
            probs = [e / sum(exps) for e in exps]  # Eq. 9
            best = max(range(len(probs)), key=lambda w: probs[w])  # Eq. 10
            matches.append(best)
            scores.append(probs[best])
        scores_np = np.array(scores)
        thr = threshold_otsu(scores_np) if scores_np.max() > scores_np.min() else -np.inf
        per_ref.append((matches, scores_np > thr))
    for idx, r in enumerate(active):
        deltas = [ref[m[idx]] - features[r] for ref, (m, passed) in zip(refs, per_ref) if passed[idx]]
        if deltas:
            out[r] = features[r] + gamma * 1.0 * (sum(deltas) / len(deltas))  # Eq. 11, M_i(r) = 1
    return out


def test_harmonize_regions_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(6)
    n, c = 40, 6
    features = torch.randn(n, c, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, generator=gen) > 0.3
    keep = keep_mask(n, 0.2, 11, 3)
    refs = [torch.randn(m, c, generator=gen, dtype=torch.float64) for m in (15, 22)]
    ours = harmonize_regions(features, mask, refs, gamma=0.3, tau=0.1, keep=keep)
    expected = reference_rfh(features, mask, refs, 0.3, 0.1, keep)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # Background patches (outside M_i) are never touched.
    assert torch.equal(ours[~mask], features[~mask])
    assert not torch.equal(ours[mask & keep], features[mask & keep])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harmonize_batch_matches_loop_reference_per_image_and_reference(seed: int) -> None:
    # The dense form (every image, branch and reference set at once, padded sets, pairs that
    # leave a reference out) equals the loop reference image by image.
    gen = torch.Generator().manual_seed(20 + seed)
    g, f, n, c = 2, 3, 30, 6
    lengths = [7, 0, 12]  # one anchor published no subject token
    q = max(lengths)
    features = torch.randn(g, f, n, c, generator=gen, dtype=torch.float64)
    active = torch.rand(f, n, generator=gen) > 0.4
    refs = torch.randn(g, len(lengths), q, c, generator=gen, dtype=torch.float64)
    valid = torch.arange(q)[None, :] < torch.tensor(lengths)[:, None]
    pairs = torch.tensor([[True, True, True], [False, True, True], [True, True, False]])
    ours = harmonize_batch(features, active, refs, valid, 0.3, 0.1, pairs)
    for gi in range(g):
        for fi in range(f):
            used = [refs[gi, a, : lengths[a]] for a in range(len(lengths)) if pairs[fi, a] and lengths[a]]
            expected = reference_rfh(features[gi, fi], active[fi], used, 0.3, 0.1, torch.ones(n, dtype=torch.bool))
            torch.testing.assert_close(ours[gi, fi], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[:, ~active], features[:, ~active])


def test_otsu_within_is_the_threshold_of_the_entries_within() -> None:
    gen = torch.Generator().manual_seed(21)
    values = torch.rand(5, 300, generator=gen, dtype=torch.float64) ** 2
    within = torch.rand(5, 300, generator=gen) > 0.5
    within[3] = False  # no entry: constant
    within[4] = False
    within[4, :2] = True
    values[4, :2] = 0.25  # equal entries: constant
    thr, constant = otsu_split(values, within=within)
    for row in range(3):
        assert thr[row] == otsu_threshold(values[row][within[row]])
        assert not constant[row]
    assert constant[3] and constant[4] and thr[4] == 0.25


def test_dense_anchor_sharing_matches_dense_log_mask() -> None:
    # Anchors attend to their own tokens and to the other anchors' kept subject tokens through a
    # log-mask over all of them (no boolean indexing): Eq. 7-8 for each anchor and head.
    gen = torch.Generator().manual_seed(22)
    a, h, n, d = 3, 2, 10, 8
    q, k, v = (torch.randn(a, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    masks = torch.rand(a, n, generator=gen) > 0.5
    keeps = torch.stack([keep_mask((a, n), 0.3, 9, i) for i in range(a)])
    ours = masked_shared_attention(q, k, v, every_anchor_token(k), every_anchor_token(v), anchor_admitted(masks, keeps))
    for i in range(a):
        gamma = propagation_mask(masks & keeps[i], i)  # own tokens always admitted
        for head in range(h):
            expected = dense_masked_attention(q[i, head], k[:, head].reshape(a * n, d), v[:, head].reshape(a * n, d), gamma)
            torch.testing.assert_close(ours[i, head], expected)


def test_reference_slots_gather_each_anchors_published_tokens() -> None:
    gen = torch.Generator().manual_seed(23)
    a, n, c = 3, 16, 4
    masks = torch.rand(a, n, generator=gen) > 0.6
    masks[1] = False  # an anchor without subject tokens
    index = masks.reshape(-1).nonzero(as_tuple=True)[0]
    layer = SharedLayerState(index, torch.randn(2, index.numel(), c), torch.randn(2, index.numel(), c), n)
    slots, valid = layer.reference_slots(a)
    for anchor, expected in enumerate(layer.per_anchor_features(1, a)):
        assert torch.equal(layer.features[1][slots[anchor]][valid[anchor]], expected)
    assert valid.sum().item() == index.numel()


# ---- BLI, Eq. 12 -----------------------------------------------------------------------------
def test_interpolate_layout_eq12() -> None:
    gen = torch.Generator().manual_seed(7)
    xc, xv = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    torch.testing.assert_close(interpolate_layout(xc, xv, 0.7), 0.3 * xc + 0.7 * xv)


# ---- the processor on a real diffusers Attention ---------------------------------------------
def make_attention(dim: int = 16, heads: int = 2) -> Attention:
    torch.manual_seed(8)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()


def reference_self_attention(
    attn: Attention, x: torch.Tensor, extra: torch.Tensor | None, gamma: torch.Tensor | None,
    query: torch.Tensor | None = None,
):
    """Stock self-attention of one image over its own tokens plus ``extra`` tokens, log-masked;
    ``query`` (N, C) replaces the image's own queries ``to_q(x)`` when given."""
    heads, d = attn.heads, attn.inner_dim // attn.heads
    tokens = x if extra is None else torch.cat([x, extra])
    q = attn.to_q(x) if query is None else query
    k, v = attn.to_k(tokens), attn.to_v(tokens)
    outs = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        g = torch.ones(tokens.shape[0], dtype=torch.bool) if gamma is None else gamma
        outs.append(dense_masked_attention(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(), g).float())
    return torch.cat(outs, dim=-1)


def test_processor_anchor_sharing_matches_reference() -> None:
    attn = make_attention()
    n, dim = 16, 16
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, share_dropout=0.0, mask_dropout=0.0)
    state = StorySyncState(
        config, role=ROLE_ANCHORS, seeds=[1, 2], token_positions=[[[1]], [[1]]],
        latent_hw=(4, 4), num_steps=4, guidance=False,
    )
    gen = torch.Generator().manual_seed(9)
    state.set_subject_map(torch.rand(2, n, generator=gen), (4, 4))
    state.step = 1
    masks = state.masks(n)
    x = torch.randn(2, n, dim, generator=gen)
    proc = StorySyncSelfAttnProcessor("up_blocks.0.attn1.processor", state, shares=True)
    out = proc(attn, x)
    for i in range(2):
        j = 1 - i
        extra = x[j][masks[j]]
        gamma = torch.cat([torch.ones(n, dtype=torch.bool), torch.ones(extra.shape[0], dtype=torch.bool)])
        expected = attn.to_out[0](reference_self_attention(attn, x[i], extra, gamma))
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    # The anchors published their subject tokens for this step.
    layer = state.published[1].layers["up_blocks.0.attn1.processor"]
    assert layer.index.shape[0] == int(masks.sum())
    torch.testing.assert_close(layer.hidden[0].float(), x.reshape(-1, dim)[layer.index], rtol=1e-3, atol=1e-3)


def test_processor_frame_with_output_bli_matches_reference() -> None:
    """``bli_target="output"``: Eq. 12 read as a blend of the two branches' layer outputs."""
    attn = make_attention()
    n, dim = 16, 16
    config = StorySyncConfig(
        harmonize=False, share_dropout=0.0, mask_dropout=0.0, bli_fraction=1.0, bli_target="output"
    )
    gen = torch.Generator().manual_seed(10)
    anchor_hidden = torch.randn(2, n, dim, generator=gen).half()
    anchor_mask = torch.rand(2, n, generator=gen) > 0.5
    index = anchor_mask.reshape(-1).nonzero(as_tuple=True)[0]
    layer = SharedLayerState(
        index=index, hidden=anchor_hidden.reshape(1, -1, dim)[:, index],
        features=torch.zeros(1, index.numel(), dim).half(), num_tokens=n,
    )
    bundle = AnchorBundle(meta={"num_anchors": 2}, steps={1: AnchorStep(1, {"up.attn1.processor": layer})})
    state = StorySyncState(
        config.replace(share_layers=("up",)), role=ROLE_FRAMES, seeds=[5], token_positions=[[[1]]],
        latent_hw=(4, 4), num_steps=4, guidance=False, bundle=bundle,
    )
    state.set_subject_map(torch.rand(1, n, generator=gen), (4, 4))
    state.step = 1
    assert state.branches == (VANILLA, CONSISTENT)
    x = torch.randn(2, n, dim, generator=gen)  # rows: [vanilla, consistent]
    proc = StorySyncSelfAttnProcessor("up.attn1.processor", state, shares=True)
    out = proc(attn, x)
    vanilla = attn.to_out[0](reference_self_attention(attn, x[0], None, None))
    extra = anchor_hidden.reshape(-1, dim)[index].float()
    consistent = attn.to_out[0](reference_self_attention(attn, x[1], extra, None))
    torch.testing.assert_close(out[0], vanilla, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], 0.3 * consistent + 0.7 * vanilla, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lam", [0.7, 0.25])
def test_processor_frame_with_query_bli_matches_reference(lam: float) -> None:
    """``bli_target="query"`` (the default, Figure 2): the consistent branch attends to its own
    keys and the anchors' shared keys at full weight, with queries (1 - lambda) Q_consistent +
    lambda Q_vanilla; both guidance branches; the vanilla rows stay stock."""
    attn = make_attention()
    n, dim = 16, 16
    config = StorySyncConfig(harmonize=False, share_dropout=0.0, mask_dropout=0.0, bli_fraction=1.0,
                             bli_lambda=lam, share_layers=("up",))
    assert config.bli_target == "query"
    gen = torch.Generator().manual_seed(11)
    anchor_hidden = torch.randn(2, 2, n, dim, generator=gen).half()  # (guidance, anchor, N, C)
    index = (torch.rand(2, n, generator=gen) > 0.5).reshape(-1).nonzero(as_tuple=True)[0]
    layer = SharedLayerState(
        index=index, hidden=anchor_hidden.reshape(2, -1, dim)[:, index],
        features=torch.zeros(2, index.numel(), dim).half(), num_tokens=n,
    )
    bundle = AnchorBundle(meta={"num_anchors": 2}, steps={0: AnchorStep(0, {"up.attn1.processor": layer})})
    state = StorySyncState(
        config, role=ROLE_FRAMES, seeds=[5], token_positions=[[[1]]],
        latent_hw=(4, 4), num_steps=4, guidance=True, bundle=bundle,
    )
    state.set_subject_map(torch.rand(1, n, generator=gen), (4, 4))
    assert state.step == 0 and state.sharing_ready  # current-step masks: sharing from step 0
    x = torch.randn(4, n, dim, generator=gen)  # rows: [uncond vanilla, uncond consistent, cond vanilla, cond consistent]
    out = StorySyncSelfAttnProcessor("up.attn1.processor", state, shares=True)(attn, x)
    for g, (v_row, c_row) in enumerate([(0, 1), (2, 3)]):
        blended = (1 - lam) * attn.to_q(x[c_row]) + lam * attn.to_q(x[v_row])
        extra = anchor_hidden[g].reshape(-1, dim)[index].float()
        expected = attn.to_out[0](reference_self_attention(attn, x[c_row], extra, None, query=blended))
        torch.testing.assert_close(out[c_row], expected, rtol=1e-4, atol=1e-5)
        vanilla = attn.to_out[0](reference_self_attention(attn, x[v_row], None, None))
        torch.testing.assert_close(out[v_row], vanilla, rtol=1e-4, atol=1e-5)
    # A layer that does not share blends its queries the same way and attends to its own tokens.
    plain = StorySyncSelfAttnProcessor("down.attn1.processor", state, shares=False)(attn, x)
    for v_row, c_row in [(0, 1), (2, 3)]:
        blended = (1 - lam) * attn.to_q(x[c_row]) + lam * attn.to_q(x[v_row])
        expected = attn.to_out[0](reference_self_attention(attn, x[c_row], None, None, query=blended))
        torch.testing.assert_close(plain[c_row], expected, rtol=1e-4, atol=1e-5)


# ---- dropouts and the bundle -----------------------------------------------------------------
def test_keep_mask_is_seeded_and_has_the_rate() -> None:
    a = keep_mask(20000, 0.3, 1, 2, 3)
    assert torch.equal(a, keep_mask(20000, 0.3, 1, 2, 3))
    assert not torch.equal(a, keep_mask(20000, 0.3, 1, 2, 4))
    assert abs(1 - a.float().mean().item() - 0.3) < 0.02
    assert keep_mask(5, 0.0, 1).all()


def test_bundle_round_trip_is_exact_and_rejects_other_files() -> None:
    gen = torch.Generator().manual_seed(12)
    layer = SharedLayerState(
        index=torch.tensor([0, 3, 17]), hidden=torch.randn(2, 3, 8, generator=gen).half(),
        features=torch.randn(2, 3, 4, generator=gen).half(), num_tokens=16,
    )
    meta = {
        "model": "m", "model_revision": None, "dtype": "float32", "steps": 2, "height": 64, "width": 64,
        "guidance_scale": 5.0, "negative_prompt": "", "config": StorySyncConfig().to_dict(), "num_anchors": 2,
        "anchor_ids": ["a", "b"], "anchor_prompts": ["p a", "p b"], "anchor_seeds": [1, 2],
        "anchor_token_positions": [[[1]], [[2]]],
    }
    bundle = AnchorBundle(meta=meta, steps={1: AnchorStep(1, {"a.b": layer})})
    back = AnchorBundle.from_bytes(bundle.to_bytes())
    assert back.meta == bundle.meta
    got = back.steps[1].layers["a.b"]
    assert torch.equal(got.index, layer.index) and torch.equal(got.hidden, layer.hidden)
    assert torch.equal(got.features, layer.features) and got.num_tokens == 16
    assert got.owners().tolist() == [0, 0, 1]
    with pytest.raises(ValueError):
        AnchorBundle.from_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}   ")


def test_config_defaults_are_the_papers_and_round_trip() -> None:
    config = StorySyncConfig()
    assert config.rfh_gamma == 0.3 and config.bli_lambda == 0.7
    assert StorySyncConfig.from_dict(config.to_dict()) == config
    assert config.bli_steps(50) == 15
    with pytest.raises(ValueError):
        StorySyncConfig(rfh_gamma=1.5)
    with pytest.raises(ValueError):
        StorySyncConfig.from_dict({"nope": 1})


def test_anchor_step_numpy_payload_round_trip_and_streamed_bundle() -> None:
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float16, torch.bfloat16):
        layer = SharedLayerState(
            index=torch.tensor([1, 4]), hidden=torch.randn(1, 2, 8, generator=gen).to(dtype),
            features=torch.randn(1, 2, 4, generator=gen).to(dtype), num_tokens=8,
        )
        payload = AnchorStep(3, {"l": layer}).to_numpy()
        assert isinstance(payload["layers"]["l"]["hidden"], np.ndarray)
        back = AnchorStep.from_numpy(payload)
        assert back.step == 3 and torch.equal(back.layers["l"].hidden, layer.hidden)
        assert back.layers["l"].hidden.dtype == dtype

    from storysync_dist.core.anchors import StreamedBundle

    calls = []

    def fetch(t):
        calls.append(t)
        return AnchorStep(t, {"l": layer}).to_numpy() if t > 0 else None

    streamed = StreamedBundle({"num_anchors": 1}, fetch)
    assert streamed.step(0) is None and streamed.step(0) is None
    assert streamed.step(2).layers["l"].num_tokens == 8
    streamed.step(2)
    assert calls == [0, 2] and streamed.pulled_bytes == layer.nbytes()
