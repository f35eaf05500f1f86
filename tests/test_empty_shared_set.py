"""An empty shared set (empty subject masks, every shared key dropped) is a normal case: that image
attends to its own tokens only, and renders do not fail at small sizes."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.anchors import AnchorBundle, AnchorStep, SharedLayerState
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.sharing import pad_token_sets, shared_attention
from storysync_dist.core.state import ROLE_ANCHORS, ROLE_FRAMES, StorySyncState
from storysync_dist.io.sink import FRAME_SCHEMA
from storysync_dist.models.attention import StorySyncSelfAttnProcessor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"
LAYER = "up_blocks.0.attn1.processor"


def dense_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, admitted: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(d) + log(admitted)) V for one image and head, in float64."""
    scores = q.double() @ keys.double().T / math.sqrt(q.shape[-1]) + torch.log(admitted.double())
    return torch.softmax(scores, dim=-1) @ values.double()


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- core: shared_attention ------------------------------------------------------------------


def test_only_padding_or_zero_width_is_exactly_stock_attention() -> None:
    b, h, n, d, m = 2, 2, 6, 4, 3
    q, k, v = randn(b, h, n, d, seed=1), randn(b, h, n, d, seed=2), randn(b, h, n, d, seed=3)
    stock = F.scaled_dot_product_attention(q, k, v)
    k_sh, v_sh = randn(b, h, m, d, seed=4), randn(b, h, m, d, seed=5)
    every_slot_padding = torch.zeros(b, m, dtype=torch.bool)
    assert torch.equal(shared_attention(q, k, v, k_sh, v_sh, every_slot_padding), stock)
    empty = torch.zeros(b, h, 0, d, dtype=torch.float64)
    assert torch.equal(shared_attention(q, k, v, empty, empty, torch.zeros(b, 0, dtype=torch.bool)), stock)
    assert torch.equal(shared_attention(q, k, v, None, None, None), stock)
    # And stock is what it claims to be: the dense softmax over the own tokens.
    for i in range(b):
        for head in range(h):
            expected = dense_reference(q[i, head], k[i, head], v[i, head], torch.ones(n, dtype=torch.bool))
            torch.testing.assert_close(stock[i, head], expected)


def test_mixed_batch_matches_dense_log_mask() -> None:
    # Image 0 shares 3 tokens; image 1 has none, so its row of the padded set is all padding.
    h, n, d = 2, 5, 4
    c = h * d
    q, k, v = randn(2, h, n, d, seed=6), randn(2, h, n, d, seed=7), randn(2, h, n, d, seed=8)
    tokens_k, tokens_v = randn(3, c, seed=9), randn(3, c, seed=10)
    k_pad, valid = pad_token_sets([tokens_k, tokens_k[:0]])
    v_pad, _ = pad_token_sets([tokens_v, tokens_v[:0]])
    assert valid.tolist() == [[True, True, True], [False, False, False]]
    k_sh = k_pad.view(2, 3, h, d).transpose(1, 2)
    v_sh = v_pad.view(2, 3, h, d).transpose(1, 2)
    ours = shared_attention(q, k, v, k_sh, v_sh, valid)

    for i in range(2):
        for head in range(h):
            keys = torch.cat([k[i, head], k_sh[i, head]])
            values = torch.cat([v[i, head], v_sh[i, head]])
            admitted = torch.cat([torch.ones(n, dtype=torch.bool), valid[i]])
            torch.testing.assert_close(ours[i, head], dense_reference(q[i, head], keys, values, admitted))
    # The image without shared tokens gets its own-token attention, nothing of image 0's tokens.
    own = F.scaled_dot_product_attention(q[1:], k[1:], v[1:])
    torch.testing.assert_close(ours[1:], own, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours[:1], F.scaled_dot_product_attention(q[:1], k[:1], v[:1]))


# ---- the processor on a real diffusers Attention ---------------------------------------------


def make_attention(dim: int = 16, heads: int = 2) -> Attention:
    torch.manual_seed(8)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()


def anchor_state(config: StorySyncConfig, masks: torch.Tensor) -> StorySyncState:
    n = masks.shape[1]
    state = StorySyncState(
        config, role=ROLE_ANCHORS, seeds=[1, 2], token_positions=[[[1]], [[1]]],
        latent_hw=(4, 4), num_steps=4, guidance=False,
    )
    state.set_subject_map(torch.rand(2, n, generator=torch.Generator().manual_seed(3)), (4, 4))
    state.step = 1
    # The masks of this step: what the cross-attention maps gave after mask dropout.
    state._mask_cache[n] = masks
    return state


@torch.no_grad()
def test_processor_with_empty_anchor_masks_is_stock() -> None:
    attn, n = make_attention(), 16
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(11))
    config = StorySyncConfig(layout_interpolation=False, share_dropout=0.0, mask_dropout=0.0, rfh_dropout=0.0)
    state = anchor_state(config, torch.zeros(2, n, dtype=torch.bool))
    out = StorySyncSelfAttnProcessor(LAYER, state, shares=True)(attn, x)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x), rtol=1e-6, atol=1e-6)
    # The anchors publish an empty subject set for this layer and step.
    assert state.published[1].layers[LAYER].index.numel() == 0


@torch.no_grad()
def test_processor_every_key_dropped_is_stock() -> None:
    attn, n = make_attention(), 16
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(12))
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, share_dropout=1.0, mask_dropout=0.0)
    state = anchor_state(config, torch.ones(2, n, dtype=torch.bool))
    out = StorySyncSelfAttnProcessor(LAYER, state, shares=True)(attn, x)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_processor_mixed_anchor_batch_matches_reference() -> None:
    # Anchor 0's mask is empty: it still sees anchor 1's subject tokens, while anchor 1 has
    # nothing to borrow and must get stock attention.
    attn, n, dim = make_attention(), 16, 16
    x = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(13))
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[1, [2, 5, 6, 11]] = True
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, share_dropout=0.0, mask_dropout=0.0)
    state = anchor_state(config, masks)
    out = StorySyncSelfAttnProcessor(LAYER, state, shares=True)(attn, x)

    heads, d = attn.heads, dim // attn.heads

    def reference(i: int, extra: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([x[i], extra])
        q, k, v = attn.to_q(x[i]), attn.to_k(tokens), attn.to_v(tokens)
        admitted = torch.ones(tokens.shape[0], dtype=torch.bool)
        per_head = [dense_reference(q[:, s], k[:, s], v[:, s], admitted).float()
                    for s in (slice(j * d, (j + 1) * d) for j in range(heads))]
        return attn.to_out[0](torch.cat(per_head, dim=-1))

    torch.testing.assert_close(out[0], reference(0, x[1][masks[1]]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], reference(1, x[0][:0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], AttnProcessor2_0()(attn, x)[1], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_processor_frame_with_every_anchor_token_dropped_is_stock() -> None:
    attn, n, dim = make_attention(), 16, 16
    gen = torch.Generator().manual_seed(14)
    index = torch.tensor([1, 4, 7, 20, 30])
    layer = SharedLayerState(
        index=index, hidden=torch.randn(1, index.numel(), dim, generator=gen).half(),
        features=torch.zeros(1, index.numel(), dim).half(), num_tokens=n,
    )
    bundle = AnchorBundle(meta={"num_anchors": 2}, steps={1: AnchorStep(1, {LAYER: layer})})
    config = StorySyncConfig(harmonize=False, layout_interpolation=False, share_dropout=1.0, mask_dropout=0.0)
    state = StorySyncState(
        config, role=ROLE_FRAMES, seeds=[5, 6], token_positions=[[[1]], [[1]]],
        latent_hw=(4, 4), num_steps=4, guidance=False, bundle=bundle,
    )
    state.set_subject_map(torch.rand(2, n, generator=gen), (4, 4))
    state.step = 1
    x = torch.randn(2, n, dim, generator=gen)
    out = StorySyncSelfAttnProcessor(LAYER, state, shares=True)(attn, x)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x), rtol=1e-6, atol=1e-6)


# ---- end to end on tiny-sdxl at 64x64 ----------------------------------------------------------


def read_rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "data", schema=FRAME_SCHEMA)
    return {row["frame_id"]: row for row in table.to_pylist()}


def png_64(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (64, 64)
    return np.asarray(image.convert("RGB"))


def test_cli_renders_the_example_at_64px(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["render", str(EXAMPLE), "--model", "tiny-sdxl", "--steps", "4", "--height", "64",
                 "--width", "64", "--no-progress", "--out", str(out)])
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 6
    for row in rows.values():
        png_64(row["image"]["bytes"])


STORY = """\
id: fox-tiny
subjects:
  - {name: fox, description: "a red fox", tokens: ["fox"]}
defaults: {steps: 4, height: 64, width: 64, guidance_scale: 5.0, seed: 0}
frames:
  - {id: snow, prompt: "{fox} in the snow"}
  - {id: den, prompt: "{fox} in a den"}
  - {id: river, prompt: "{fox} by a river"}
"""


@pytest.fixture(scope="module")
def story_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("story") / "fox.yaml"
    path.write_text(STORY, encoding="utf-8")
    return path


def api_render(story: Path, out: Path, config: StorySyncConfig) -> dict[str, np.ndarray]:
    render_story(str(story), RenderOptions(model="tiny-sdxl", out=str(out), config=config, progress=False))
    rows = read_rows(out)
    assert set(rows) == {"snow", "den", "river"}
    return {frame_id: png_64(row["image"]["bytes"]) for frame_id, row in rows.items()}


def test_api_render_with_every_shared_key_dropped(story_file: Path, tmp_path: Path) -> None:
    dropped = StorySyncConfig(share_dropout=1.0, rfh_dropout=0.0, mask_dropout=0.0)
    images = api_render(story_file, tmp_path / "dropped", dropped)
    # Every shared key dropped is no sharing at all: the frames equal a render with sharing
    # switched off and RFH, BLI and the masks unchanged.
    no_sharing = api_render(story_file, tmp_path / "off", dropped.replace(share_attention=False))
    for frame_id, image in images.items():
        assert np.array_equal(image, no_sharing[frame_id]), frame_id
