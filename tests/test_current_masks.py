"""Subject masks from the current step (paper section 3.1: "only from the current generation
timestep"), on the real tiny SDXL pipeline: the masks used at step t are an Otsu mask of the maps
recorded earlier in step t, and sharing starts at step 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _stories import cat_job

from storysync_dist.core.config import StorySyncConfig
from storysync_dist.core.state import StorySyncState
from storysync_dist.engine.renderer import FrameJob, RenderSettings, StoryRenderer
from storysync_dist.errors import StorySyncUserError
from storysync_dist.models.presets import load_pipeline
from storysync_dist.models.unet import UNetAdapter

STEPS, SIZE = 3, 128
EXACT = {"mask_dropout": 0.0}


@pytest.fixture(scope="module")
def xl() -> UNetAdapter:
    return UNetAdapter(load_pipeline("tiny-sdxl"))


def job(adapter: UNetAdapter, index: int, scene: str, seed: int) -> FrameJob:
    return cat_job(adapter, index, scene, seed)


def anchors(adapter: UNetAdapter) -> list[FrameJob]:
    return [job(adapter, 0, "on a beach", 3), job(adapter, 1, "in a kitchen", 4)]


def renderer(adapter: UNetAdapter, config: StorySyncConfig, steps: int = STEPS) -> StoryRenderer:
    return StoryRenderer(adapter, config, RenderSettings("tiny-sdxl", steps, SIZE, SIZE, 5.0))


def traced(r: StoryRenderer) -> list[tuple]:
    """Log, in call order, every map recorded, every shared layer entered and every mask used."""
    events: list[tuple] = []
    make_state = r._state

    def state_with_trace(*args: object) -> StorySyncState:
        st = make_state(*args)
        record, enter, masks = st.record_map, st.enter_shared_layer, st.masks

        def record_map(n: int, maps: torch.Tensor, layer: str = "") -> None:
            events.append(("map", st.step, layer, n, maps.detach().clone()))
            record(n, maps, layer)

        def enter_shared_layer(name: str) -> None:
            events.append(("enter", st.step, name))
            enter(name)

        def used_masks(n: int) -> torch.Tensor:
            mask = masks(n)
            events.append(("mask", st.step, n, mask.clone()))
            return mask

        st.record_map, st.enter_shared_layer, st.masks = record_map, enter_shared_layer, used_masks
        return st

    r._state = state_with_trace
    return events


def reference_otsu(row: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Otsu's method written out: 256 bins over [min, max], the bin centre that maximizes the
    between-class variance (the first such split); foreground is value > threshold."""
    lo, hi = row.min(), row.max()
    if hi == lo:
        return row > lo
    counts, _ = np.histogram(row, bins=nbins, range=(lo, hi))
    centers = lo + (np.arange(nbins) + 0.5) * (hi - lo) / nbins
    # Every split at once: class weights and sums of the bins below (1..nbins-1) and above it.
    w1 = np.cumsum(counts)[:-1].astype(np.float64)
    s1 = np.cumsum(counts * centers)[:-1]
    w2, s2 = counts.sum() - w1, (counts * centers).sum() - s1
    valid = (w1 > 0) & (w2 > 0)
    m1 = np.divide(s1, w1, out=np.zeros_like(s1), where=valid)
    m2 = np.divide(s2, w2, out=np.zeros_like(s2), where=valid)
    between = np.where(valid, w1 * w2 * (m1 - m2) ** 2, -1.0)
    split = int(np.argmax(between)) + 1  # argmax keeps the first maximum, as a strict ">" loop does
    threshold = centers[split - 1] if between.max() > -1.0 else centers[0]
    return row > threshold


def reference_mask(maps: list[torch.Tensor], grid: int, size: int) -> np.ndarray:
    """Eq. 3 (mean over layers), Eq. 4 (sum over subjects), bilinear resize, Otsu per image."""
    total = sum(m.double() for m in maps) / len(maps)  # (F, N, S)
    aggregated = total.sum(dim=-1).reshape(-1, 1, grid, grid).float()
    if grid != size:
        aggregated = F.interpolate(aggregated, size=(size, size), mode="bilinear", align_corners=False)
    flat = aggregated.flatten(1).double().numpy()
    return np.stack([reference_otsu(row) for row in flat])


def lowest_maps(events: list[tuple], step: int, before_first_shared: bool) -> tuple[list[torch.Tensor], list[str]]:
    recorded: list[tuple[str, int, torch.Tensor]] = []
    for event in events:
        if event[1] != step:
            continue
        if event[0] == "enter" and before_first_shared:
            break
        if event[0] == "map":
            recorded.append((event[2], event[3], event[4]))
    low = min(n for _, n, _ in recorded)
    return [m for _, n, m in recorded if n == low], [name for name, n, _ in recorded if n == low]


def test_masks_at_step_t_are_otsu_of_the_maps_recorded_earlier_in_step_t(xl: UNetAdapter) -> None:
    r = renderer(xl, StorySyncConfig(**EXACT))
    events = traced(r)
    _, bundle = r.render_anchors(anchors(xl))
    masks_used = [e for e in events if e[0] == "mask"]
    assert {e[1] for e in masks_used} == set(range(STEPS))  # masks, hence sharing, from step 0
    for step in range(STEPS):
        maps, layers = lowest_maps(events, step, before_first_shared=True)
        # In a UNet the encoder's lowest resolution and the mid block run before the decoder.
        assert layers and all(name.startswith(("down_blocks.2.", "mid_block.")) for name in layers), layers
        grid = round(maps[0].shape[1] ** 0.5)
        for _, _, n, mask in (e for e in masks_used if e[1] == step):
            side = round(n**0.5)
            assert np.array_equal(mask.cpu().numpy(), reference_mask(maps, grid, side)), (step, n)
    assert 0 in bundle.steps and bundle.steps[0].layers  # the anchors publish step 0


def test_previous_masks_come_from_the_whole_previous_step(xl: UNetAdapter) -> None:
    r = renderer(xl, StorySyncConfig(mask_source="previous", **EXACT))
    events = traced(r)
    _, bundle = r.render_anchors(anchors(xl))
    masks_used = [e for e in events if e[0] == "mask"]
    assert {e[1] for e in masks_used} == set(range(1, STEPS))  # nothing to share with at step 0
    assert 0 not in bundle.steps
    for step in range(1, STEPS):
        maps, layers = lowest_maps(events, step - 1, before_first_shared=False)
        assert any(name.startswith("up_blocks.") for name in layers)
        grid = round(maps[0].shape[1] ** 0.5)
        for _, _, n, mask in (e for e in masks_used if e[1] == step):
            assert np.array_equal(mask.cpu().numpy(), reference_mask(maps, grid, round(n**0.5)))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_a_frame_shares_with_the_anchors_at_step_0(xl: UNetAdapter) -> None:
    # One denoising step, sharing only: with current-step masks the frame attends to the anchors'
    # subject tokens at step 0 and differs from the stock frame; with previous-step masks there is
    # nothing to share at step 0 and it is the stock frame.
    frame = job(xl, 2, "in a garden", 9)
    share_only = {"harmonize": False, "layout_interpolation": False, "share_dropout": 0.0}
    vanilla = renderer(xl, StorySyncConfig.vanilla(), steps=1).render_frame(frame, None).image
    images = {}
    for source in ("current", "previous"):
        r = renderer(xl, StorySyncConfig(mask_source=source, **share_only), steps=1)
        _, bundle = r.render_anchors(anchors(xl))
        images[source] = r.render_frame(frame, bundle).image
    assert np.array_equal(pixels(images["previous"]), pixels(vanilla))
    assert np.abs(pixels(images["current"]) - pixels(vanilla)).max() > 0


def test_current_masks_need_a_mask_layer_before_the_first_shared_layer(xl: UNetAdapter) -> None:
    # The encoder's first self-attention runs before any cross-attention of the step.
    r = renderer(xl, StorySyncConfig(share_layers=("down_blocks", "up_blocks")), steps=1)
    with pytest.raises(StorySyncUserError, match=r"mask_source 'current'.*down_blocks\.1"):
        r.render_anchors(anchors(xl))
    # With previous-step masks the same layers are fine.
    r = renderer(xl, StorySyncConfig(share_layers=("down_blocks", "up_blocks"), mask_source="previous"), steps=2)
    frames, _ = r.render_anchors(anchors(xl))
    assert len(frames) == 2
