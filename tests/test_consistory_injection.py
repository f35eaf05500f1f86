"""ConsiStory's feature injection (core/consistory.py) against plain references written here:
loops over patches and references, skimage's Otsu, numpy convolution; then both passes on the real tiny SDXL
pipeline: what the anchors publish, what a frame injects, and what a bundle may hold."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _pixels import assert_within_batch_tolerance
from _stories import cat_job
from diffusers import DDIMScheduler
from skimage.filters import threshold_otsu

from storysync_dist.core.anchors import AnchorBundle, BundleError
from storysync_dist.core.consistory import (
    DIFT_TIMESTEP,
    FeatureInjection,
    dift_step,
    gaussian_smooth,
    inject_nearest,
    injection_gate,
    injection_steps,
    nearest_patches,
    nearest_reference_patches,
)
from storysync_dist.core.methods import method_config
from storysync_dist.engine.bundles import publish_steps
from storysync_dist.engine.renderer import RenderSettings, StoryRenderer
from storysync_dist.models.presets import load_pipeline
from storysync_dist.models.unet import UNetAdapter


def _resized_patches(features: torch.Tensor, size: int) -> np.ndarray:
    # The resize is part of the definition (the release's F.interpolate, bilinear, no corner
    # alignment); the matching below is the part under test.
    resized = F.interpolate(features[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized.permute(1, 2, 0).reshape(size * size, -1).double().numpy()


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b) / max(math.sqrt(float(a @ a)), 1e-12) / max(math.sqrt(float(b @ b)), 1e-12)


def _reference_nearest(reference, reference_mask, target, size):
    src, tgt = _resized_patches(reference, size), _resized_patches(target, size)
    index, distance = [], []
    for p in range(size * size):
        best, best_q = math.inf, -1
        for q in range(size * size):
            d = _cosine_distance(src[q], tgt[p]) if reference_mask[q] else 2.0
            if d < best:
                best, best_q = d, q
        index.append(best_q)
        distance.append(best)
    return np.array(index), np.array(distance)


def test_gaussian_smooth_is_a_normalized_3x3_gaussian_with_zero_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    g = np.array([[math.exp(-((i - 1) ** 2 + (j - 1) ** 2) / 2.0) for j in range(3)] for i in range(3)])
    g /= g.sum()
    padded = np.pad(x.numpy(), ((0, 0), (1, 1), (1, 1)))
    want = np.zeros(x.shape)
    for c in range(3):
        for i in range(5):
            for j in range(6):
                want[c, i, j] = float((padded[c, i:i + 3, j:j + 3] * g).sum())
    np.testing.assert_allclose(gaussian_smooth(x).numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [4, 6])
def test_nearest_patches_match_a_loop_over_subject_patches(size):
    torch.manual_seed(1)
    reference, target = torch.randn(5, 4, 4), torch.randn(5, 3, 3)
    mask = torch.rand(size * size) < 0.4
    mask[0] = True
    index, distance = nearest_patches(reference, mask, target, size)
    want_index, want_distance = _reference_nearest(reference, mask.numpy(), target, size)
    np.testing.assert_allclose(distance.numpy(), want_distance, atol=1e-5)
    assert np.array_equal(index.numpy(), want_index)
    assert bool(mask[index].all())  # only subject patches are ever matched


def test_a_reference_without_subject_matches_nothing():
    _, distance = nearest_patches(torch.randn(4, 3, 3), torch.zeros(9, dtype=torch.bool), torch.randn(4, 3, 3), 3)
    assert torch.all(distance == 2.0)


def test_nearest_reference_patch_is_the_single_closest_over_all_references():
    torch.manual_seed(2)
    size = 4
    references, target = torch.randn(3, 6, 4, 4), torch.randn(6, 4, 4)
    masks = torch.rand(3, size * size) < 0.5
    reference, patch, distance = nearest_reference_patches(references, masks, target, size)
    per_reference = [_reference_nearest(references[r], masks[r].numpy(), target, size) for r in range(3)]
    for p in range(size * size):
        best_r = min(range(3), key=lambda r: (per_reference[r][1][p], r))
        assert int(reference[p]) == best_r
        assert int(patch[p]) == per_reference[best_r][0][p]
        assert abs(float(distance[p]) - per_reference[best_r][1][p]) < 1e-5


def test_injection_gate_is_the_mask_and_distances_under_otsu():
    torch.manual_seed(3)
    distance = torch.rand(64)
    mask = torch.rand(64) < 0.5
    thr = threshold_otsu(distance.numpy().astype(np.float64))
    want = [bool(mask[p]) and float(distance[p]) < thr for p in range(64)]
    assert injection_gate(mask, distance).tolist() == want


def test_inject_nearest_blends_gated_patches_towards_their_match():
    torch.manual_seed(4)
    output, refs = torch.randn(9, 5), torch.randn(2, 9, 5)
    reference, patch = torch.randint(0, 2, (9,)), torch.randint(0, 9, (9,))
    gate = torch.rand(9) < 0.5
    got = inject_nearest(output, refs, reference, patch, gate, alpha=0.8)
    for p in range(9):
        want = 0.8 * refs[reference[p], patch[p]] + 0.2 * output[p] if gate[p] else output[p]
        torch.testing.assert_close(got[p], want)


def test_dift_is_taken_at_timestep_261_on_ddim_50_steps_and_nearest_elsewhere():
    scheduler = DDIMScheduler(steps_offset=1, timestep_spacing="leading", beta_schedule="scaled_linear")
    scheduler.set_timesteps(50)
    steps = [int(t) for t in scheduler.timesteps]
    assert steps[dift_step(steps)] == DIFT_TIMESTEP == 261
    assert dift_step(steps) == 36
    scheduler.set_timesteps(30)
    steps = [int(t) for t in scheduler.timesteps]
    assert DIFT_TIMESTEP not in steps
    want = min(range(30), key=lambda i: (abs(steps[i] - 261), i))
    assert dift_step(steps) == want


def test_injection_runs_from_a_tenth_to_a_third_of_the_steps():
    assert list(injection_steps(50)) == list(range(5, 17))
    assert list(injection_steps(4)) == [0, 1]


# ---- the injection state of one render (FeatureInjection) --------------------------------------
def _otsu_gate(mask: torch.Tensor, distance: np.ndarray) -> list[bool]:
    thr = threshold_otsu(distance.astype(np.float64))
    return [bool(mask[p]) and distance[p] < thr for p in range(len(distance))]


def _reference_match(dift_refs, mask_refs, target, size):
    """(reference, patch, distance) per target patch by loops: the smallest distance, the first
    reference of equals."""
    per_ref = [_reference_nearest(dift_refs[r], mask_refs[r].numpy(), target, size) for r in range(len(dift_refs))]
    out = []
    for p in range(size * size):
        r = min(range(len(per_ref)), key=lambda j: (per_ref[j][1][p], j))
        out.append((r, per_ref[r][0][p], per_ref[r][1][p]))
    return out


def _injection(num_images: int, size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    inj = FeatureInjection(num_images, 50)
    inj.note_self_attention(size * size)
    inj.record_dift(torch.randn(num_images, 6, size, size, generator=gen))
    inj.end_first_pass(torch.rand(num_images, size * size, generator=gen) < 0.6)
    return inj, gen


def test_anchors_inject_from_each_other_in_order_reading_updated_outputs():
    size, alpha = 4, 0.8
    inj, gen = _injection(3, size, 5)
    outputs = torch.randn(3, size * size, 5, generator=gen)
    got = inj.inject(outputs, None, None)
    want = outputs.clone()
    for i in range(3):
        others = [j for j in range(3) if j != i]
        matches = _reference_match(inj.dift[others], inj.masks[others], inj.dift[i], size)
        gate = _otsu_gate(inj.masks[i], np.array([d for _, _, d in matches]))
        row = want[i].clone()
        for p, (r, q, _) in enumerate(matches):
            if gate[p]:
                row[p] = alpha * want[others[r], q] + (1 - alpha) * want[i, p]  # earlier anchors already updated
        want[i] = row
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, outputs)


def test_frames_inject_from_the_anchors_published_outputs():
    size, alpha = 4, 0.8
    inj, gen = _injection(2, size, 6)
    refs = {"dift": torch.randn(3, 6, size, size, generator=gen).half(),
            "subject_masks": torch.rand(3, size * size, generator=gen) < 0.5}
    anchor_outputs = torch.randn(3, size * size, 5, generator=gen)
    outputs = torch.randn(2, size * size, 5, generator=gen)
    got = inj.inject(outputs, anchor_outputs, refs)
    for i in range(2):
        matches = _reference_match(refs["dift"].float(), refs["subject_masks"], inj.dift[i], size)
        gate = _otsu_gate(inj.masks[i], np.array([d for _, _, d in matches]))
        for p, (r, q, _) in enumerate(matches):
            want = alpha * anchor_outputs[r, q] + (1 - alpha) * outputs[i, p] if gate[p] else outputs[i, p]
            torch.testing.assert_close(got[i, p], want)
    # A frame's result depends on its own row and the anchors only.
    alone = _injection(2, size, 6)[0]
    alone.dift, alone.masks, alone.num_images = inj.dift[1:], inj.masks[1:], 1
    torch.testing.assert_close(alone.inject(outputs[1:], anchor_outputs, refs), got[1:])


# ---- two passes on the real tiny SDXL pipeline ------------------------------------------------
STEPS, SIZE = 10, 64  # injection at steps 1..3 of pass 2; tiny-sdxl's finest attention: 4 x 4


@pytest.fixture(scope="module")
def two_pass():
    adapter = UNetAdapter(load_pipeline("tiny-sdxl"))
    config = method_config("consistory")
    assert config.feature_injection and config.render_passes == 2
    renderer = StoryRenderer(adapter, config, RenderSettings("tiny-sdxl", STEPS, SIZE, SIZE, 5.0))
    anchors = [cat_job(adapter, 0, "on a beach", 3), cat_job(adapter, 1, "in a kitchen", 4)]
    published: list[int] = []
    _, bundle = renderer.render_anchors(anchors, on_publish=lambda t, s: published.append(t))
    jobs = [cat_job(adapter, 2, "in a forest", 5), cat_job(adapter, 3, "on a boat", 6)]
    return renderer, bundle, published, jobs


def test_anchors_publish_both_passes_and_pass_two_injects_at_the_finest_layers(two_pass):
    renderer, bundle, published, _ = two_pass
    assert published == list(range(2 * STEPS))  # every bundle step is announced, in order
    assert sorted(bundle.steps) == publish_steps(renderer.config, STEPS) == [*range(1, 10), *range(11, 20)]
    injected = {t for t, s in bundle.steps.items() if s.outputs}
    assert injected == {STEPS + t for t in injection_steps(STEPS)} == {11, 12, 13}
    names = set(bundle.steps[11].outputs)
    assert any(n.startswith("down_blocks") for n in names) and any(n.startswith("up_blocks") for n in names)
    assert all(o.shape[:2] == (2, 16) for s in bundle.steps.values() for o in s.outputs.values())
    refs = [t for t, s in bundle.steps.items() if s.references]
    assert refs == [11] and bundle.steps[11].references["subject_masks"].shape == (2, 16)
    back = AnchorBundle.from_bytes(bundle.to_bytes())
    assert sorted(back.steps) == sorted(bundle.steps)
    for t, s in bundle.steps.items():
        assert all(torch.equal(back.steps[t].outputs[n], o) for n, o in s.outputs.items())
        assert all(torch.equal(back.steps[t].references[n], r) for n, r in s.references.items())


def test_a_frame_injects_from_the_anchors_and_depends_only_on_its_own_inputs(two_pass):
    renderer, bundle, _, jobs = two_pass
    together = renderer.render_frames(jobs, bundle)
    alone = renderer.render_frame(jobs[1], bundle)
    assert_within_batch_tolerance(np.asarray(together[1].image), np.asarray(alone.image), jobs[1].frame_id)
    stripped = copy.deepcopy(bundle)
    for s in stripped.steps.values():
        s.outputs.clear()
    without = renderer.render_frame(jobs[1], stripped)
    assert not np.array_equal(np.asarray(without.image), np.asarray(alone.image))  # injection changes pixels


def test_a_bundle_with_malformed_injection_tensors_is_refused(two_pass):
    _, bundle, _, _ = two_pass
    bad = copy.deepcopy(bundle)
    name = next(iter(bad.steps[11].outputs))
    bad.steps[11].outputs[name] = bad.steps[11].outputs[name][:, :8]
    with pytest.raises(BundleError, match=r"step 11 output .* has (8|16) tokens, step 11 output .* has (8|16): one injection resolution"):
        AnchorBundle.from_bytes(bad.to_bytes())
    bad = copy.deepcopy(bundle)
    bad.steps[11].references["dift"][0, 0, 0, 0] = float("nan")
    with pytest.raises(BundleError, match="step 11 reference dift holds 1 non-finite"):
        AnchorBundle.from_bytes(bad.to_bytes())
