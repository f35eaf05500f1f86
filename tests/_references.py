"""Plain references for the mechanisms of section 3 of the paper, written out: a dense softmax
with a log-mask (Eq. 7-8), RFH with Otsu's gate in exact arithmetic (Eq. 9-11), a blend of the
queries (Eq. 12), RoPE, and the seeded dropout draws. ``replayed(adapter)`` recomputes every
StorySync self-attention of a real render from the inputs it was given and checks the product's
output against them, so a build that drops sharing, RFH or BLI in any layer, step or family fails
the family tests (test_engine, test_flux, test_kandinsky3, test_families);
test_mechanism_references.py checks the processors one call at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention

from storysync_dist.core.anchors import SharedLayerState
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.dropout import KIND_RFH, KIND_SHARE
from storysync_dist.core.state import CONSISTENT, ROLE_ANCHORS, ROLE_FRAMES, VANILLA, StorySyncState


# ---- the plain pieces -------------------------------------------------------------------------
def plain_keep(count: int, rate: float, *parts: int) -> torch.Tensor:
    """The seeded dropout of section 3.3 written out: ``count`` uniform draws from a CPU generator
    seeded with the top 63 bits of blake2b-64 of the decimal parts ("seed,step,layer,kind"); a
    draw below ``rate`` drops its token. Pinned: a change would change every frame already made."""
    if rate <= 0:
        return torch.ones(count, dtype=torch.bool)
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.rand(count, generator=generator) >= rate


def plain_layer(name: str) -> int:
    """The integer a layer's dropouts are seeded with: CRC-32 of its processor name."""
    return zlib.crc32(name.encode())


def plain_otsu_mask(aggregated: torch.Tensor) -> torch.Tensor:
    """Eq. 2-4's last step: per image, the patches above Otsu's threshold (``otsu_thresholds``),
    compared in the map's precision; no resize (the map is at the layer's grid)."""
    rows = []
    for row in aggregated:
        (threshold,) = otsu_thresholds(row.double().numpy())  # a test's random map has no exact tie
        rows.append(row > torch.tensor(threshold, dtype=row.dtype))
    return torch.stack(rows)


def log_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         admitted: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7-8 per head, dense: softmax(q k^T / sqrt(d) + log Gamma) v in float64.
    q (N, H*d), k and v (M, H*d), ``admitted`` (M,) boolean Gamma (None: every key)."""
    d = q.shape[-1] // heads
    log_gamma = torch.zeros(k.shape[0], dtype=torch.float64)
    if admitted is not None:
        log_gamma = torch.log(admitted.double())
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[:, sl].double() @ k[:, sl].double().T / math.sqrt(d) + log_gamma
        outs.append(torch.softmax(scores, dim=-1) @ v[:, sl].double())
    return torch.cat(outs, dim=-1)


def otsu_thresholds(values: np.ndarray, nbins: int = 256, slack: float = 0.0) -> list[float]:
    """Otsu's threshold written out, in exact arithmetic: the values binned into ``nbins`` over
    [min, max]; for every split after bin k the between-class variance w1 w2 (m1 - m2)^2,
    computed on bin indices as fractions (bin centres are affine in the index, so the ranking is
    the centres'); the threshold is the centre of bin k of the best split. Splits after an empty
    bin part the values as the split before it does, so each partition counts once, at its first
    k (where an argmax over the splits stops). Two different partitions can tie exactly on a few
    values; a float implementation then picks one by rounding, so each is returned.

    ``slack``: how far (absolute) another float implementation's values may lie from these (the
    same math summed in another order). A value that close to a bin edge may fall in either bin
    there, and the threshold of each such binning is returned too (the usual one first)."""
    lo, hi = float(values.min()), float(values.max())
    position = (values.astype(np.float64) - lo) / (hi - lo) * nbins
    index = np.clip(np.floor(position), 0, nbins - 1).astype(int)
    # Values within the slack of an inner bin edge (moved lo/hi included): either side of it.
    reach = 2 * slack / (hi - lo) * nbins if slack > 0 else 0.0
    edge = np.rint(position)
    near = [i for i in np.flatnonzero(np.abs(position - edge) <= reach) if 0 < edge[i] < nbins][:8]
    thresholds: list[float] = []
    for flips in itertools.product((False, True), repeat=len(near)):
        moved = index.copy()
        for i, flip in zip(near, flips):
            if flip:
                moved[i] = int(edge[i]) - 1 if index[i] == int(edge[i]) else int(edge[i])
        for k in _otsu_splits(np.bincount(moved, minlength=nbins), nbins):
            t = lo + (k + 0.5) * ((hi - lo) / nbins)
            if t not in thresholds:
                thresholds.append(t)
    return thresholds


def _otsu_splits(counts: np.ndarray, nbins: int) -> list[int]:
    """The best splits of ``otsu_thresholds`` for a histogram, in exact arithmetic."""
    doubled = 2 * np.arange(nbins) + 1  # twice each bin's centre index
    best, splits = Fraction(-1), []
    w1 = s1 = 0
    w_all, s_all = int(counts.sum()), int((counts * doubled).sum())
    for k in range(nbins - 1):
        if counts[k] == 0:
            continue  # the same partition as the split before
        w1, s1 = w1 + int(counts[k]), s1 + int(counts[k] * doubled[k])
        w2, s2 = w_all - w1, s_all - s1
        if w2 == 0:
            break
        between = w1 * w2 * (Fraction(s1, w1) - Fraction(s2, w2)) ** 2
        if between > best:
            best, splits = between, [k]
        elif between == best:
            splits.append(k)
    return splits


# How far a float32 RFH match score may lie from the reference's when another implementation sums
# the same products in another order (a dense, padded or batched matrix product; a softmax over
# masked columns): a few float32 steps of a probability <= 1.
SCORE_SLACK = 64 * float(np.finfo(np.float32).eps)


def plain_rfh(features: torch.Tensor, mask: torch.Tensor, refs: list[torch.Tensor], gamma: float, tau: float,
              keep: torch.Tensor) -> list[torch.Tensor]:
    """Eq. 9-11 for one image: each active patch r (subject, not dropped) is compared with every
    patch of each reference set by normalized inner product, softmax with temperature tau
    (Eq. 9), best match and its probability (Eq. 10); a match counts where that probability is
    above Otsu's threshold over the image's patches (a constant row: everywhere), and
    R(r) + gamma (mean over counting references of R_j(match) - R(r)) replaces R(r) (Eq. 11).
    Reference sets without a patch are left out. Returns float64, one output per way an exact
    Otsu tie, or a score within float32 rounding of a bin edge or of the threshold, or of another
    patch's score (``SCORE_SLACK``), can fall (``otsu_thresholds``), the usual one first.

    The scores are computed, and compared with the threshold, in the features' precision: the
    probabilities of a few nearly alike patches lie within a few float32 steps of a bin centre
    now and then, so a replay feeds this the product's own float32 features and the gate falls
    the same way."""
    base = features.double()
    active = (mask & keep).nonzero(as_tuple=True)[0]
    refs = [r.to(features.dtype) for r in refs if r.shape[0] > 0]
    if active.numel() == 0 or not refs:
        return [base]
    regions = features[active]
    options = []
    for ref in refs:
        cosine = F.normalize(regions, dim=-1) @ F.normalize(ref, dim=-1).T  # normalized inner products
        compat = torch.softmax(cosine / tau, dim=-1)
        score, match = compat.max(dim=-1)
        # Two reference patches within the slack of the best: either may be the match.
        matches = [match]
        if ref.shape[0] > 1:
            top = compat.topk(2, dim=-1)
            close = ((top.values[:, 0] - top.values[:, 1]).double() <= 2 * SCORE_SLACK).nonzero(as_tuple=True)[0][:4]
            for flips in itertools.product((False, True), repeat=close.numel()):
                if any(flips):
                    other = match.clone()
                    for i, flip in zip(close.tolist(), flips):
                        if flip:
                            other[i] = top.indices[i, 1] if match[i] == top.indices[i, 0] else top.indices[i, 0]
                    matches.append(other)
        if score.max() == score.min():
            gates = [torch.ones_like(score, dtype=torch.bool)]
        else:
            gates = []
            for t in otsu_thresholds(score.double().numpy(), slack=SCORE_SLACK):
                gate = score > torch.tensor(t, dtype=score.dtype)
                # A score within the slack of the threshold may fall on either side of it.
                near = ((score.double() - t).abs() <= 2 * SCORE_SLACK).nonzero(as_tuple=True)[0][:6]
                for flips in itertools.product((False, True), repeat=near.numel()):
                    option = gate.clone()
                    for i, flip in zip(near.tolist(), flips):
                        option[i] = option[i] ^ flip
                    if not any(torch.equal(option, g) for g in gates):
                        gates.append(option)
        options.append([(ref[m].double() - regions.double(), gate) for gate in gates for m in matches])
    outs = []
    for choice in itertools.product(*options):
        delta = sum(gate[:, None] * diff for diff, gate in choice)
        votes = sum(gate.double() for _, gate in choice).clamp(min=1.0)
        out = base.clone()
        out[active] = regions.double() + gamma * delta / votes[:, None]
        outs.append(out)
    return outs


def plain_output_blend(out: torch.Tensor, st: StorySyncState, lam: float) -> torch.Tensor:
    """Eq. 12 on a layer's output: each consistent row becomes (1 - lam) of itself plus lam of its
    vanilla twin, per guidance branch; the vanilla rows are unchanged. ``out``: (rows, tokens, dim)."""
    blended = out.clone()
    for g in st.guidance_branches:
        c, v = st.rows(g, CONSISTENT), st.rows(g, VANILLA)
        blended[c] = (1 - lam) * out[c] + lam * out[v]
    return blended


def rfh_window(cfg: StorySyncConfig, step: int, num_steps: int) -> bool:
    """RFH runs at the steps of [rfh_start, rfh_end) of the run."""
    return cfg.harmonize and cfg.rfh_start * num_steps <= step < cfg.rfh_end * num_steps


def bli_runs(cfg: StorySyncConfig, step: int, num_steps: int) -> bool:
    """BLI runs (and the vanilla branch is in the batch) at the first T = round(bli_fraction x
    steps) steps (Eq. 12)."""
    return cfg.layout_interpolation and step < min(num_steps, round(cfg.bli_fraction * num_steps))


@dataclass
class Did:
    """What a reference layer did: the shared keys it let in, the RFH patches it moved, and the
    other right outputs where an exact Otsu tie can fall either way: (batch row, whole output)."""

    shared: int = 0
    moved: int = 0
    alternatives: list[tuple[int, Any]] = field(default_factory=list)
    # (what, product's tensor, reference's tensor) checked on the way: the features RFH started from.
    stages: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _anchor_layer(st: StorySyncState, name: str) -> SharedLayerState | None:
    step = st.bundle.step(st.step) if st.bundle is not None else None
    return step.layers.get(name) if step is not None else None


def _per_anchor(layer: SharedLayerState, branch: int, num_anchors: int) -> list[torch.Tensor]:
    owners = layer.index // layer.num_tokens
    return [layer.features[branch][owners == a].float() for a in range(num_anchors)]


def _harmonize_rows(features: torch.Tensor, st: StorySyncState, name: str, masks: torch.Tensor,
                    did: Did) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """RFH of every consistent image of the shared guidance branches, from the features the
    layer's attention made: anchors against the other anchors (a simultaneous update), frames
    against the anchors' published features of the same guidance branch. Returns the features
    and the other right feature rows where Otsu ties (row, features)."""
    cfg = st.config
    before, after = features, features.double().clone()
    others: list[tuple[int, torch.Tensor]] = []
    for gi, g in enumerate(st.shared_guidance):
        rows = st.rows(g, CONSISTENT)
        layer = _anchor_layer(st, name) if st.role == ROLE_FRAMES else None
        for i, seed in enumerate(st.seeds):
            if st.role == ROLE_ANCHORS:
                refs = [before[rows.start + j][masks[j]] for j in range(st.num_images) if j != i]
            elif layer is not None:
                refs = _per_anchor(layer, gi, int(st.bundle.meta["num_anchors"]))
            else:
                continue
            keep = plain_keep(masks.shape[1], cfg.rfh_dropout, seed, st.step, plain_layer(name), KIND_RFH)
            row = rows.start + i
            first, *rest = plain_rfh(before[row], masks[i], refs, cfg.rfh_gamma, cfg.rfh_tau, keep)
            after[row] = first
            others += [(row, alt) for alt in rest]
            did.moved += int((after[row] != before[row].double()).any(dim=-1).sum())
    return after, others


def _shared_set(st: StorySyncState, name: str, g: str, i: int, n: int, own_keys: list[torch.Tensor],
                own_values: list[torch.Tensor], masks: torch.Tensor, project) -> tuple:
    """The candidate keys/values image i may share with and their Gamma (Eq. 5, 13): anchors, every
    token of the other anchors, admitted where subject and kept; frames, every published anchor
    token, admitted where kept. ``own_keys[j]`` are the keys of image j's consistent row."""
    cfg = st.config
    seed = st.seeds[i]
    if st.role == ROLE_ANCHORS:
        keep = plain_keep(st.num_images * n, cfg.share_dropout, seed, st.step, plain_layer(name), KIND_SHARE)
        keep = keep.view(st.num_images, n)
        others = [j for j in range(st.num_images) if j != i]
        if not others:
            return None
        keys = torch.cat([own_keys[j] for j in others])
        values = torch.cat([own_values[j] for j in others])
        admitted = torch.cat([masks[j] & keep[j] for j in others])
        return keys, values, admitted
    layer = _anchor_layer(st, name)
    if layer is None or layer.index.numel() == 0:
        return None
    keys, values = project(layer, st.shared_guidance.index(g))
    keep = plain_keep(layer.index.numel(), cfg.share_dropout, seed, st.step, plain_layer(name), KIND_SHARE)
    return keys, values, keep


# ---- the UNet / Kandinsky 3 self-attention (models/attention.py) ----------------------------------
def expected_self_attention(attn: Attention, x: torch.Tensor, st: StorySyncState, name: str, shares: bool,
                            masks: torch.Tensor | None = None, rfh_in: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, Did]:
    """What a StorySync self-attention must return for ``x`` (B, N, C) at the state's step, written
    plainly: BLI on the queries or outputs (Eq. 12) for the first T steps (``bli_runs``),
    sharing by a log-masked dense softmax (Eq. 5-8, 13), RFH (Eq. 9-11). ``masks`` (F, N) replaces
    the state's subject masks (default: ``st.masks``, whose making test_current_masks checks);
    ``rfh_in`` are the features the product harmonized (see ``call_and_expect``)."""
    assert attn.norm_q is None and attn.norm_k is None
    cfg, did = st.config, Did()
    n, heads = x.shape[1], attn.heads
    q_all, k_all, v_all = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    bli = bli_runs(cfg, st.step, st.num_steps)
    sharing = shares and st.sharing_ready and (cfg.share_attention or cfg.harmonize)
    if sharing and masks is None:
        masks = st.masks(n)

    def project(layer: SharedLayerState, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = layer.hidden[branch].to(x.dtype)
        return attn.to_k(hidden), attn.to_v(hidden)

    features = torch.zeros(x.shape[0], n, attn.inner_dim, dtype=torch.float64)
    for g in st.guidance_branches:
        for branch in st.branches:
            rows = st.rows(g, branch)
            consistent = st.rows(g, CONSISTENT)
            for i in range(st.num_images):
                row = rows.start + i
                q = q_all[row]
                if branch == CONSISTENT and bli and cfg.bli_target == "query":
                    q = (1 - cfg.bli_lambda) * q + cfg.bli_lambda * q_all[st.rows(g, VANILLA).start + i]
                keys, values, admitted = k_all[row], v_all[row], torch.ones(n, dtype=torch.bool)
                if sharing and cfg.share_attention and branch == CONSISTENT and g in st.shared_guidance:
                    own_k = [k_all[consistent.start + j] for j in range(st.num_images)]
                    own_v = [v_all[consistent.start + j] for j in range(st.num_images)]
                    shared = _shared_set(st, name, g, i, n, own_k, own_v, masks, project)
                    if shared is not None:
                        keys, values = torch.cat([keys, shared[0]]), torch.cat([values, shared[1]])
                        admitted = torch.cat([admitted, shared[2]])
                        did.shared += int(shared[2].sum())
                features[row] = log_masked_attention(q, keys, values, heads, admitted)

    def finish(features: torch.Tensor) -> torch.Tensor:
        out = attn.to_out[0](features.float())
        if bli and cfg.bli_target == "output":
            out = plain_output_blend(out, st, cfg.bli_lambda)
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor

    return _finish_all(features, sharing and rfh_window(cfg, st.step, st.num_steps), st, name, masks, did, finish,
                       rfh_in)


def _finish_all(features: torch.Tensor, harmonize: bool, st: StorySyncState, name: str, masks: torch.Tensor | None,
                did: Did, finish, rfh_in: torch.Tensor | None) -> tuple[Any, Did]:
    """RFH (when it runs) and the rest of the layer, for the usual features and for each other
    right features row where an Otsu tie can fall either way. ``rfh_in``: the features the
    product harmonized; they must be the reference's, and RFH then starts from them."""
    others: list[tuple[int, torch.Tensor]] = []
    if harmonize:
        if rfh_in is not None:
            did.stages.append(("the features RFH starts from", rfh_in, features))
            features = rfh_in
        features, others = _harmonize_rows(features, st, name, masks, did)
    for row, alt in others:
        variant = features.clone()
        variant[row] = alt
        did.alternatives.append((row, finish(variant)))
    return finish(features), did


# ---- FLUX joint attention (models/flux.py) ---------------------------------------------------------
def plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE written out: each consecutive pair (a, b) of a head's channels turns by the angle of
    its position, (a cos - b sin, b cos + a sin). x (M, H, d); cos, sin (M, d), equal within a pair."""
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])
    c, s = cos[:, None, 0::2].double(), sin[:, None, 0::2].double()
    a, b = x.double()[..., 0::2], x.double()[..., 1::2]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)


def expected_flux_attention(attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                            rotary: tuple[torch.Tensor, torch.Tensor], st: StorySyncState, name: str, shares: bool,
                            text_len: int, masks: torch.Tensor | None = None, rfh_in: torch.Tensor | None = None,
                            ) -> tuple[Any, Did]:
    """What a FLUX StorySync attention must return, written plainly: joint [text | image]
    attention with RoPE, BLI on the image queries or outputs (Eq. 12), the image queries of the
    consistent rows attending to the shared image tokens at their own grid positions (Eq. 5-8,
    13), RFH on the image tokens' outputs (Eq. 9-11). The text queries attend as stock."""
    cfg, did = st.config, Did()
    dual = encoder_hidden_states is not None
    hd, heads = attn.head_dim, attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, hd))

    q = attn.norm_q(split(attn.to_q(hidden_states)))
    k = attn.norm_k(split(attn.to_k(hidden_states)))
    v = split(attn.to_v(hidden_states))
    if dual:
        q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
        k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
        v = torch.cat([split(attn.add_v_proj(encoder_hidden_states)), v], dim=1)
    n = q.shape[1] - text_len
    bli = bli_runs(cfg, st.step, st.num_steps)
    if bli and cfg.bli_target == "query":
        q = q.clone()
        for g in st.guidance_branches:
            c, van = st.rows(g, CONSISTENT), st.rows(g, VANILLA)
            q[c, text_len:] = (1 - cfg.bli_lambda) * q[c, text_len:] + cfg.bli_lambda * q[van, text_len:]
    cos, sin = rotary
    q = torch.stack([plain_rope(row, cos, sin) for row in q]).float()
    k = torch.stack([plain_rope(row, cos, sin) for row in k]).float()
    sharing = shares and st.sharing_ready and (cfg.share_attention or cfg.harmonize)
    if sharing and masks is None:
        masks = st.masks(n)

    def project(layer: SharedLayerState, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = layer.hidden[branch].to(hidden_states.dtype)
        positions = text_len + layer.index % layer.num_tokens
        keys = plain_rope(attn.norm_k(split(attn.to_k(hidden))), cos[positions], sin[positions])
        return keys.float().flatten(1), attn.to_v(hidden)

    flat_k, flat_v = k.flatten(2), v.flatten(2)
    out = torch.zeros(q.shape[0], q.shape[1], heads * hd, dtype=torch.float64)
    for g in st.guidance_branches:
        consistent = st.rows(g, CONSISTENT)
        for branch in st.branches:
            rows = st.rows(g, branch)
            for i in range(st.num_images):
                row = rows.start + i
                out[row] = log_masked_attention(q[row].flatten(1), flat_k[row], flat_v[row], heads)
                if sharing and cfg.share_attention and branch == CONSISTENT and g in st.shared_guidance:
                    own_k = [flat_k[consistent.start + j, text_len:] for j in range(st.num_images)]
                    own_v = [flat_v[consistent.start + j, text_len:] for j in range(st.num_images)]
                    shared = _shared_set(st, name, g, i, n, own_k, own_v, masks, project)
                    if shared is not None:
                        keys = torch.cat([flat_k[row], shared[0]])
                        values = torch.cat([flat_v[row], shared[1]])
                        admitted = torch.cat([torch.ones(flat_k.shape[1], dtype=torch.bool), shared[2]])
                        out[row, text_len:] = log_masked_attention(q[row, text_len:].flatten(1), keys, values,
                                                                   heads, admitted)
                        did.shared += int(shared[2].sum())

    def finish(features: torch.Tensor) -> Any:
        image = features.float()
        if dual:
            image = attn.to_out[0](image)
        if bli and cfg.bli_target == "output":
            image = plain_output_blend(image, st, cfg.bli_lambda)
        if dual:
            return image, attn.to_add_out(out[:, :text_len].float())
        return torch.cat([out[:, :text_len].float(), image], dim=1)

    return _finish_all(out[:, text_len:], sharing and rfh_window(cfg, st.step, st.num_steps), st, name, masks, did,
                       finish, rfh_in)
