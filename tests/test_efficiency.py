"""Per-GPU efficiency options in this process: frame batching (each frame of a batch against its
batch-of-one render, for every family), the anchor bundle's placements (identical pixels, and
at most two steps on the device with ``host``), model offload (identical pixels), and the
options' one-line errors. The Ray path with ``--frame-batch`` is in test_pool.py."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _pixels import assert_within_batch_tolerance
from _replay import assert_render_replays, replayed
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.anchors import AnchorBundle, AnchorStep, SharedLayerState, StreamedBundle
from storysync_dist.core.residency import RING_SLOTS, PinnedRing, PlacedBundle
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.renderer import FrameJob, StoryRenderer, frame_batches
from storysync_dist.io.sink import open_dataset
from storysync_dist.models.presets import PRESETS, load_pipeline
from storysync_dist.models.registry import adapter_for

TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))
STEPS, SIZE = 3, 64


def write_story(folder: Path, frames: int = 6, negative: str | None = None) -> Path:
    story = {
        "id": "fox",
        "style": "A photo of",
        "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
        "defaults": {"steps": STEPS, "height": SIZE, "width": SIZE},
        "frames": [{"id": f"f{k}", "prompt": f"{{fox}} in place number {k}", "seed": 10 + k} for k in range(frames)],
    }
    if negative is not None:
        story["defaults"]["negative_prompt"] = negative
    path = folder / "fox.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def frames_of(out: Path) -> dict[str, np.ndarray]:
    rows = open_dataset(out).to_table().to_pylist()
    return {r["frame_id"]: pixels(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in rows}


# ---- frame batching ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_each_frame_of_a_batch_matches_its_batch_of_one_render(preset: str, tmp_path: Path) -> None:
    pipe = load_pipeline(preset)
    plan = prepare_job(str(write_story(tmp_path)), RenderOptions(model=preset, out=str(tmp_path / "o"),
                                                                 progress=False), pipe=pipe)
    renderer = StoryRenderer(adapter_for(pipe), plan.config, plan.settings)
    _, bundle = renderer.render_anchors(plan.anchor_jobs)
    jobs = plan.frame_jobs
    assert len(jobs) == 4
    alone = {job.frame_id: pixels(renderer.render_frame(job, bundle).image) for job in jobs}
    batched = renderer.render_frames(jobs[:3], bundle) + renderer.render_frames(jobs[3:], bundle)
    assert [f.job.frame_id for f in batched] == [j.frame_id for j in jobs]
    for frame in batched:
        assert_within_batch_tolerance(pixels(frame.image), alone[frame.job.frame_id], (preset, frame.job.frame_id))
        if frame.mask is not None:
            assert frame.mask.shape == (SIZE, SIZE)
    # Each frame kept its own seed and prompt: no two frames of the batch are alike.
    images = [pixels(f.image) for f in batched[:3]]
    assert all(np.abs(images[i] - images[j]).mean() > 2 for i in range(3) for j in range(i + 1, 3))


@pytest.mark.parametrize("preset", TINY)
def test_the_sync_free_frame_path_replays_on_every_placement_and_frame_batch(preset: str, tmp_path: Path) -> None:
    # Issue 23: frames gather the anchors' references with host-made slots, harmonize densely and
    # skip the stock attention of the rows they overwrite; anchors share through a log-mask.
    # Every StorySync attention call of the anchors and of the frames, read through each bundle
    # placement, alone and in a batch of two, returns what the plain reference computes from its
    # inputs (RFH included: a gate or match within float rounding of a tie may fall either way),
    # and a frame of the batch is its batch-of-one render within the batch tolerance.
    pipe = load_pipeline(preset)
    adapter = adapter_for(pipe)
    plan = prepare_job(str(write_story(tmp_path, frames=4)), RenderOptions(model=preset, out=str(tmp_path / "o"),
                                                                           progress=False), pipe=pipe)
    renderer = StoryRenderer(adapter, plan.config, plan.settings)
    jobs = plan.frame_jobs[:2]
    with replayed(adapter) as replay:
        _, bundle = renderer.render_anchors(plan.anchor_jobs)
        frames = {}
        for placement in ("device", "host"):
            frames[placement, 1] = pixels(renderer.render_frame(jobs[0], PlacedBundle(bundle, "cpu", placement)).image)
            batch = renderer.render_frames(jobs, PlacedBundle(bundle, "cpu", placement))
            frames[placement, 2] = pixels(batch[0].image)
    assert_render_replays(replay)
    assert {c.role for c in replay.calls if c.did.shared} == {"anchors", "frames"}
    assert np.array_equal(frames["device", 1], frames["host", 1])
    for placement in ("device", "host"):
        assert_within_batch_tolerance(frames[placement, 2], frames[placement, 1], (preset, placement))


def test_anchors_that_stream_their_steps_keep_none_of_them(tmp_path: Path) -> None:
    # A Ray anchor actor hands each step to the driver as it is published and keeps none
    # (keep_steps=False): the steps it streams are the bundle's steps, and its bundle holds none.
    pipe = load_pipeline("tiny-sdxl")
    plan = prepare_job(str(write_story(tmp_path)), RenderOptions(model="tiny-sdxl", out=str(tmp_path / "o"),
                                                                 progress=False), pipe=pipe)
    renderer = StoryRenderer(adapter_for(pipe), plan.config, plan.settings)
    _, kept = renderer.render_anchors(plan.anchor_jobs)
    streamed: dict[int, AnchorStep] = {}
    _, bare = renderer.render_anchors(plan.anchor_jobs, on_publish=lambda t, step: streamed.update({t: step} if step else {}),
                                      keep_steps=False)
    assert not bare.steps and bare.meta == kept.meta
    assert sorted(streamed) == sorted(kept.steps) and streamed
    for t, step in streamed.items():
        assert all(torch.equal(a, b) for a, b in zip(step.tensors(), kept.steps[t].tensors(), strict=True))


def test_vanilla_frames_batch_like_the_stock_pipeline(tmp_path: Path) -> None:
    # Mechanisms off, a batch of frames is the stock pipeline's batch: each frame within the
    # tolerance of its stock batch-of-one image.
    from storysync_dist.core.config import StorySyncConfig

    pipe = load_pipeline("tiny-sd")
    plan = prepare_job(str(write_story(tmp_path)), RenderOptions(model="tiny-sd", out=str(tmp_path / "o"),
                                                                 method="vanilla", progress=False), pipe=pipe)
    renderer = StoryRenderer(adapter_for(pipe), StorySyncConfig.vanilla(), plan.settings)
    jobs = list(plan.jobs.values())[:3]
    batched = renderer.render_frames(jobs, None)
    for job, frame in zip(jobs, batched):
        stock = pipe(prompt=[job.prompt], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     guidance_scale=plan.settings.guidance_scale,
                     generator=[torch.Generator("cpu").manual_seed(job.seed)]).images[0]
        assert_within_batch_tolerance(pixels(frame.image), pixels(stock), job.frame_id)


def job(frame_id: str, negative: str | None = None) -> FrameJob:
    return FrameJob(frame_id, 0, "p", negative, 0, [])


def test_frame_batches_keep_the_order_and_never_mix_negative_prompts() -> None:
    jobs = [job("a"), job("b"), job("c"), job("d", "blurry"), job("e", "blurry"), job("f")]
    assert [[j.frame_id for j in b] for b in frame_batches(jobs, 2)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [[j.frame_id for j in b] for b in frame_batches(jobs, 8)] == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert [len(b) for b in frame_batches(jobs, 1)] == [1] * 6
    assert frame_batches([], 4) == []
    with pytest.raises(ValueError):
        frame_batches(jobs, 0)


def test_frame_batch_through_the_api_only_and_rerun(tmp_path: Path) -> None:
    story = str(write_story(tmp_path))
    single = render_story(story, RenderOptions(model="tiny-sdxl", out=str(tmp_path / "one"), frame_batch=1,
                                               progress=False))
    batched = render_story(story, RenderOptions(model="tiny-sdxl", out=str(tmp_path / "four"), frame_batch=4,
                                                progress=False))
    assert sorted(batched.rendered) == sorted(single.rendered) == [f"f{k}" for k in range(6)]
    a, b = frames_of(tmp_path / "one"), frames_of(tmp_path / "four")
    for frame_id in a:
        assert_within_batch_tolerance(a[frame_id], b[frame_id], frame_id)
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert manifest["stories"]["fox"]["render"]["frame_batch"] == 4
    # --only with a batch renders just the selected frames (one batch of two), the same pixels.
    only = render_story(story, RenderOptions(model="tiny-sdxl", out=str(tmp_path / "only"), frame_batch=4,
                                             only=["f3", "f5"], progress=False))
    assert sorted(only.rendered) == ["f3", "f5"]  # the anchors render, unwritten, for the bundle
    c = frames_of(tmp_path / "only")
    for frame_id in ("f3", "f5"):
        assert_within_batch_tolerance(c[frame_id], a[frame_id], frame_id)
    # The batch size is not part of a frame's identity: a rerun with another one renders nothing.
    again = render_story(story, RenderOptions(model="tiny-sdxl", out=str(tmp_path / "four"), frame_batch=2,
                                              progress=False))
    assert again.rendered == [] and len(again.skipped) == 6


# ---- bundle placement ----------------------------------------------------------------------------
def fake_bundle(steps: int) -> AnchorBundle:
    gen = torch.Generator().manual_seed(0)
    bundle = AnchorBundle(meta={"num_anchors": 2, "steps": steps})
    for t in range(steps):
        layer = SharedLayerState(index=torch.arange(3), hidden=torch.randn(1, 3, 4, generator=gen),
                                 features=torch.randn(1, 3, 4, generator=gen), num_tokens=8)
        bundle.steps[t] = AnchorStep(t, {"l": layer})
    return bundle


def staged(placed: PlacedBundle, t: int) -> None:
    """Wait (at most 30 s) until the ring's background thread has staged step t (or it has
    already gone on to the device)."""
    deadline = time.monotonic() + 30
    while not (placed.holds(t) or placed.ring.ready(t)) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert placed.holds(t) or placed.ring.ready(t), t


def test_a_host_bundle_holds_at_most_two_steps_on_the_device_and_its_ring_its_size() -> None:
    bundle = fake_bundle(6)
    placed = PlacedBundle(bundle, "cpu", "host")
    for frame in range(2):  # two frames of the story read the bundle in turn
        for t in range(6):
            for read in range(3):  # a frame reads a step once per shared layer
                step = placed.step(t)
                assert step is not None and step.step == t
                assert torch.equal(step.layers["l"].hidden, bundle.steps[t].layers["l"].hidden)
                assert step.layers["l"].hidden.data_ptr() != bundle.steps[t].layers["l"].hidden.data_ptr()  # a copy
                assert placed.resident_steps <= 2, (frame, t)
                assert placed.ring.held <= RING_SLOTS, (frame, t)
                if read == 0 and t + 1 < 6:
                    staged(placed, t + 1)  # the next read of step t sends step t + 1 on its way
    assert placed.peak_resident_steps == 2 and placed.placement == "host"
    # The staging ring never held more than its slots, and its buffers came back for reuse.
    assert 1 <= placed.ring.peak_held <= RING_SLOTS
    placed.close()
    assert placed.resident_steps == 0 and not placed.holds(5)


def test_the_pinned_ring_reuses_its_buffers_and_never_holds_more_than_its_size() -> None:
    bundle = fake_bundle(8)
    ring = PinnedRing(bundle.step, pin=False, size=2, copy=True)  # staging buffers, as on CUDA
    first = ring.get(0)
    assert first is not None and torch.equal(first.layers["l"].hidden, bundle.steps[0].layers["l"].hidden)
    buffer = first.layers["l"].hidden.data_ptr()
    ring.release(0)
    assert ring.request(1) and ring.request(2) and not ring.request(3)  # full: nothing started
    assert ring.held == 2
    again = ring.get(3)  # a step nobody asked for: the oldest staged one makes room
    assert again is not None and again.step == 3 and ring.held == 2 and ring.peak_held == 2
    assert torch.equal(again.layers["l"].hidden, bundle.steps[3].layers["l"].hidden)
    seen = set()
    for t in (1, 2, 3):
        got = ring.get(t)
        assert got is not None and got.step == t
        assert torch.equal(got.layers["l"].features, bundle.steps[t].layers["l"].features)
        seen.add(got.layers["l"].hidden.data_ptr())
        ring.release(t)
        assert ring.held <= 2
    assert buffer in seen  # step 0's buffer was filled again
    ring.close()
    assert ring.held == 0
    kept = PlacedBundle(bundle, "cpu", "device")
    for t in range(6):
        kept.step(t)
    assert kept.resident_steps == 6  # kept for the story's later frames
    assert PlacedBundle(bundle, "cpu", "auto").step(0) is not None
    with pytest.raises(ValueError):
        PlacedBundle(bundle, "cpu", "gpu")


def test_a_host_bundle_never_waits_for_a_step_the_anchors_have_not_published() -> None:
    bundle = fake_bundle(4)
    fetched: list[int] = []
    published = {0, 1}

    def fetch(t: int) -> dict:
        assert t in published, f"step {t} fetched before it was published"
        fetched.append(t)
        return bundle.steps[t].to_numpy()

    placed = PlacedBundle(StreamedBundle(bundle.meta, fetch, lambda t: t in published), "cpu", "host")
    placed.step(0)
    staged(placed, 1)
    assert fetched == [0, 1]  # step 1 fetched ahead (by the ring's thread): it exists
    placed.step(0)  # the next shared layer of step 0 sends step 1 to the device
    placed.step(1)
    placed.step(1)
    assert fetched == [0, 1] and not placed.ring.ready(2)  # step 2 does not exist yet: not fetched
    published.add(2)
    assert placed.step(2).step == 2 and fetched == [0, 1, 2]


def two_pass_bundle(steps: int) -> AnchorBundle:
    """Steps of every size, as ConsiStory's two-pass bundles hold them: shared layers in pass 1;
    in pass 2 injected ``outputs`` only, and the ``references`` once, at its first step."""
    gen = torch.Generator().manual_seed(1)
    bundle = AnchorBundle(meta={"num_anchors": 2, "steps": steps})
    for t in range(steps):
        m = 3 + t  # a different size at every step, so a step counted twice or not dropped shows
        if t < steps // 2:
            layers = {name: SharedLayerState(index=torch.arange(m), hidden=torch.randn(2, m, 4, generator=gen),
                                             features=torch.randn(2, m, 6, generator=gen), num_tokens=8)
                      for name in ("a", "b")}
            bundle.steps[t] = AnchorStep(t, layers)
        else:
            bundle.steps[t] = AnchorStep(t, outputs={"x": torch.randn(2, m, 4, generator=gen).half()})
    bundle.steps[steps // 2].references = {"dift": torch.randn(2, 4, 2, 2, generator=gen),
                                           "subject_masks": torch.ones(2, 8, dtype=torch.bool)}
    return bundle


@pytest.mark.parametrize("placement", ["device", "host", "auto"])
def test_the_running_totals_of_resident_steps_equal_a_recount(placement: str) -> None:
    bundle = two_pass_bundle(8)
    del bundle.steps[2]  # a step that publishes nothing
    placed = PlacedBundle(bundle, "cpu", placement)

    def recount() -> tuple[int, int]:
        return len(placed._on_device), sum(s.nbytes() for s in placed._on_device.values())

    most = (0, 0)
    # Two frames in turn, then reads out of order: steps arrive, leave (host) and come back.
    for t in [*range(8), *range(8), 5, 0, 7, 3]:
        for _layer in range(3):  # one read per shared layer
            step = placed.step(t)
            assert (step is None) == (t == 2), t
            assert step is None or step.nbytes() == bundle.steps[t].nbytes()
            assert (placed.resident_steps, placed.resident_bytes) == recount(), (placement, t)
            most = (max(most[0], placed.resident_steps), max(most[1], placed.resident_bytes))
    assert (placed.peak_resident_steps, placed.peak_resident_bytes) == most
    if placed.placement == "host":
        staged(placed, 4)  # the ring stages ahead in the background: once it has step 4,
        placed.step(3)  # the next read of step 3 sends it to the device
        assert (placed.resident_steps, placed.resident_bytes) == recount()
        assert sorted(placed._on_device) == [3, 4] and placed.peak_resident_steps == 2
    else:  # device (auto on a CPU): every published step stays
        assert placed.resident_steps == 7 and placed.resident_bytes == bundle.nbytes()


@pytest.mark.parametrize("placement", ["device", "host"])
def test_reading_a_resident_step_counts_nothing(placement: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = fake_bundle(50)
    placed = PlacedBundle(bundle, "cpu", placement)
    for t in range(50):  # the story's first frame
        placed.step(t)
    counted: list[int] = []
    original = AnchorStep.nbytes
    monkeypatch.setattr(AnchorStep, "nbytes", lambda self: counted.append(self.step) or original(self))
    for t in range(50):  # a later frame: 36 reads per step, as 36 shared layers make them
        for _layer in range(36):
            assert placed.step(t) is not None
    # device: nothing to count; host: each step once, when its copy arrives (not once per read).
    assert counted == ([] if placement == "device" else list(range(50)))


def test_a_later_read_of_a_host_step_queues_the_next_once_it_is_published() -> None:
    bundle = fake_bundle(3)
    published = {0}
    placed = PlacedBundle(StreamedBundle(bundle.meta, lambda t: bundle.steps[t].to_numpy(), published.__contains__),
                          "cpu", "host")
    placed.step(0)
    assert sorted(placed._on_device) == [0]  # step 1 does not exist yet
    published.add(1)
    placed.step(0)  # the next shared layer of step 0 asks the ring to stage step 1
    staged(placed, 1)
    placed.step(0)  # and the one after sends it to the device
    assert sorted(placed._on_device) == [0, 1] and placed.resident_bytes == 2 * bundle.steps[0].nbytes()


def test_placements_and_offload_give_identical_pixels(tmp_path: Path) -> None:
    story = str(write_story(tmp_path, frames=4))
    outs = {}
    for name, extra in {"device": {"bundle_on": "device"}, "host": {"bundle_on": "host"},
                        "auto": {"bundle_on": "auto"}, "offload": {"offload": "model"}}.items():
        result = render_story(story, RenderOptions(model="tiny-sdxl", out=str(tmp_path / name), progress=False,
                                                   frame_batch=2, **extra))
        assert len(result.rendered) == 4
        outs[name] = frames_of(tmp_path / name)
    for name in ("host", "auto", "offload"):
        assert outs[name].keys() == outs["device"].keys()
        for frame_id, image in outs["device"].items():
            assert np.array_equal(outs[name][frame_id], image), (name, frame_id)
    render = json.loads((tmp_path / "host" / "manifest.json").read_text())["stories"]["fox"]["render"]
    assert render["bundle_on"] == "host" and render["peak_resident_steps"] <= 2


def test_offload_installs_diffusers_model_offload_hooks() -> None:
    pipe = load_pipeline("tiny-sd", offload="model")
    assert getattr(pipe, "_all_hooks", None), "enable_model_cpu_offload installed no hooks"
    with pytest.raises(ValueError, match="offload"):
        load_pipeline("tiny-sd", offload="sequential")


@pytest.mark.parametrize("flags, named", [
    (["--frame-batch", "0"], "--frame-batch"),
    (["--bundle-on", "gpu"], "--bundle-on"),
    (["--offload", "everything"], "--offload"),
    (["--object-store-memory", "lots"], "--object-store-memory"),
    (["--object-store-memory", "1G"], "--object-store-memory"),  # no --workers: no Ray starts
    (["--workers", "1", "--object-store-memory", "10M"], "--object-store-memory"),  # under Ray's 75 MiB
    (["--workers", "1", "--spill-dir", "s3://bucket/spill"], "--spill-dir"),
    (["--workers", "1", "--address", "127.0.0.1:1", "--object-store-memory", "1G"], "--object-store-memory"),
])
def test_bad_efficiency_options_exit_2_and_write_nothing(tmp_path: Path, capsys, flags: list[str], named: str) -> None:
    story = str(write_story(tmp_path))
    out = tmp_path / "out"
    try:
        code = main(["render", story, "--model", "tiny-sdxl", "--out", str(out), "--no-progress", *flags])
    except SystemExit as exc:  # argparse's own checks (a batch of 0) exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and named in err[-1]
    assert not out.exists()


# ---- fewer host-device synchronisations ------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_gathered_shared_tokens_equal_boolean_indexing_and_padding(rate: float) -> None:
    from storysync_dist.core.dropout import keep_mask
    from storysync_dist.core.sharing import gather_shared_tokens, pad_token_sets, shared_attention

    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(11, 8, generator=gen), torch.randn(11, 8, generator=gen)
    keeps = [keep_mask(11, rate, seed, 3, 7, 1) for seed in range(4)]
    k, v, valid, lengths = gather_shared_tokens(keys, values, keeps)
    assert lengths == [int(keep.sum()) for keep in keeps]
    if rate == 1.0:
        assert k is None and v is None and valid is None
        return
    # The reference: boolean indexing per frame, then padding (what the processors did before).
    ref_k, ref_valid = pad_token_sets([keys[keep] for keep in keeps])
    ref_v, _ = pad_token_sets([values[keep] for keep in keeps])
    assert valid is None if bool(ref_valid.all()) else torch.equal(valid, ref_valid)
    slots = ref_valid if valid is not None else torch.ones_like(ref_valid)
    assert torch.equal(k[slots], ref_k[slots]) and torch.equal(v[slots], ref_v[slots])
    # Attention with the host-side lengths equals the version that asks the device.
    q = torch.randn(4, 2, 5, 4, generator=gen)
    own_k, own_v = torch.randn(4, 2, 5, 4, generator=gen), torch.randn(4, 2, 5, 4, generator=gen)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(4, x.shape[1], 2, 4).transpose(1, 2)

    with_lengths = shared_attention(q, own_k, own_v, heads(k), heads(v), valid, lengths)
    asked = shared_attention(q, own_k, own_v, heads(ref_k), heads(ref_v), ref_valid)
    assert torch.allclose(with_lengths, asked, atol=1e-6)


def test_the_subject_index_finds_every_resolution_of_a_step_with_one_copy() -> None:
    """``core.publish.SubjectIndex``: the index of each resolution is the plain ``nonzero`` of its
    masks; the first step copies every resolution the latent tiles into at its first layer (the
    shared layers' resolutions are not known yet), later steps only those the layers asked for."""
    from storysync_dist.core.masks import latent_token_counts
    from storysync_dist.core.publish import SubjectIndex

    latent = (16, 24)
    assert latent_token_counts(latent) == [384, 96, 24, 6]  # 16x24, 8x12, 4x6, 2x3 (1.5 rows: no more)
    generator = torch.Generator().manual_seed(0)
    step_masks = [{n: torch.rand(2, n, generator=generator) > 0.5 for n in latent_token_counts(latent)}
                  for _ in range(2)]
    index = SubjectIndex(2, latent)
    for step, masks in enumerate(step_masks):
        asked: list[int] = []

        def masks_at(n: int, masks: dict = masks, asked: list = asked) -> torch.Tensor:
            asked.append(n)
            return masks[n]

        for n in (96, 24):  # the shared layers' resolutions, in the order they run
            host, device = index.get(n, masks[n], masks_at)
            want = masks[n].reshape(-1).nonzero(as_tuple=True)[0]
            assert torch.equal(host, want) and torch.equal(device, want)
        # One copy per step: every other resolution came with the first layer's.
        assert asked == ([384, 24, 6] if step == 0 else [24]), (step, asked)
        index.clear()
