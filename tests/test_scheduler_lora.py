"""``--scheduler NAME`` and ``--lora PATH[:SCALE]`` (models/customize.py) on the tiny presets:
stock equality with StorySync off, the StorySync processors running the LoRA'd projections, Ray
against one process, one-line errors before anything is written, and what a scheduler or a LoRA
does to a frame's fingerprint, the dataset's settings and an imported anchor bundle.

The LoRAs are made here: peft adapters on the tiny models' attention projections with random,
non-zero ``lora_B`` (peft starts it at zero, which would change nothing), saved with diffusers'
``save_lora_weights`` as safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _pixels import assert_same_pixels, assert_worker_threads, frame_pixels, like_a_ray_worker
from _stories import fox_story
from diffusers import DPMSolverMultistepScheduler, FluxPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.cli import main
from storysync_dist.core.state import ROLE_ANCHORS
from storysync_dist.engine.job import prepare_job
from storysync_dist.engine.renderer import StoryRenderer
from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.models.customize import apply_model_setup
from storysync_dist.models.loading import load_pipeline
from storysync_dist.models.registry import adapter_for
from storysync_dist.story import load_story

STEPS, SIZE = 2, 64
FAST = {"model": "tiny-sdxl", "steps": STEPS, "height": SIZE, "width": SIZE, "progress": False}
SCHEDULER = "DPMSolverMultistepScheduler"  # tiny-sdxl's own is EulerDiscreteScheduler
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A peft LoRA of ``model``'s attention projections, every weight drawn from ``seed``; the model
    is left as it was. lora_A too: peft initializes it from torch's global generator, whose state
    depends on which tests ran before (the full suite once drew a tiny-flux LoRA whose effect was
    under this module's one-level bound)."""
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:  # (r, in): unit-variance outputs, as peft's kaiming init roughly gives
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state = get_peft_model_state_dict(model, adapter_name="made")
    model.delete_adapters("made")
    return state


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    sdxl = load_pipeline("tiny-sdxl")
    StableDiffusionXLPipeline.save_lora_weights(folder / "sdxl", unet_lora_layers=make_lora(sdxl.unet, 0))
    StableDiffusionXLPipeline.save_lora_weights(folder / "other", unet_lora_layers=make_lora(sdxl.unet, 1))
    flux = load_pipeline("tiny-flux")
    FluxPipeline.save_lora_weights(folder / "flux", transformer_lora_layers=make_lora(flux.transformer, 2))
    files = {name: folder / name / "pytorch_lora_weights.safetensors" for name in ("sdxl", "other", "flux")}
    # The same weights, pickled: a LoRA file that is not safetensors.
    torch.save(dict(make_lora(sdxl.unet, 0)), folder / "sdxl.bin")
    files["bin"] = folder / "sdxl.bin"
    return files


def write_story(folder: Path, frames: int = 3, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump({**fox_story(frames, steps=STEPS, height=SIZE, width=SIZE), **extra}))
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ---- (a) stock equality with StorySync off ------------------------------------------------------
def test_vanilla_with_scheduler_and_lora_equals_stock_diffusers_with_them(tmp_path: Path, loras) -> None:
    story = write_story(tmp_path)
    out = tmp_path / "out"
    result = render_story(str(story), RenderOptions(out=str(out), method="vanilla", scheduler=SCHEDULER,
                                                    loras=[(str(loras["sdxl"]), 0.7)], frame_batch=1, **FAST))
    assert sorted(result.rendered) == ["meadow", "snow", "stream"]
    ours = frame_pixels(out)

    # The stock pipeline with the same scheduler and LoRA, loaded as the diffusers docs do.
    pipe = load_pipeline("tiny-sdxl")
    plain_scheduler = pipe.scheduler
    spec = load_story(str(story))

    def stock(frame) -> np.ndarray:
        return pixels(pipe(prompt=[frame.prompt], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                           guidance_scale=5.0, generator=[torch.Generator("cpu").manual_seed(frame.seed)]).images[0])

    plain = {frame.id: stock(frame) for frame in spec.frames}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(loras["sdxl"]), adapter_name="fox_lora", use_safetensors=True)
    pipe.set_adapters(["fox_lora"], adapter_weights=[0.7])
    for frame in spec.frames:
        want = stock(frame)
        assert np.array_equal(ours[frame.id], want), frame.id
        # ... and the scheduler and the LoRA did change the picture (the equality is not trivial).
        assert np.abs(want - plain[frame.id]).mean() > 1.0, frame.id
    assert plain_scheduler is not pipe.scheduler


# ---- (b) the StorySync processors with a LoRA loaded --------------------------------------------
def ours(processor: object) -> bool:
    return type(processor).__module__.startswith("storysync_dist.models.")


@pytest.mark.parametrize(("model", "lora"), [("tiny-sdxl", "sdxl"), ("tiny-flux", "flux")])
def test_storysync_processors_stay_installed_and_run_the_lora_projections(tmp_path: Path, loras, model, lora) -> None:
    story = str(write_story(tmp_path))
    pipe = load_pipeline(model)
    denoiser = pipe.unet if model == "tiny-sdxl" else pipe.transformer
    options = RenderOptions(out=str(tmp_path / "o"), loras=[(str(loras[lora]), 1.0)], **{**FAST, "model": model})
    plan = prepare_job(story, options, pipe=pipe)
    adapter = adapter_for(pipe)
    renderer = StoryRenderer(adapter, plan.config, plan.settings)

    # Installed first, LoRA loaded after: the processor instances are the ones installed.
    adapter.install(renderer._state(ROLE_ANCHORS, plan.anchor_jobs, None))
    installed = dict(denoiser.attn_processors)
    assert any(ours(p) for p in installed.values())
    apply_model_setup(pipe, plan.settings.scheduler, plan.settings.loras)
    after = denoiser.attn_processors
    assert after.keys() == installed.keys() and all(after[k] is installed[k] for k in installed)
    adapter.uninstall()

    # LoRA loaded first, installed after (what a render does): the projections of every attention
    # are peft LoRA layers, and the StorySync processors are what calls them.
    called_from: list[object] = []
    attentions = [m for m in denoiser.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]
    assert attentions
    for attn in attentions:
        assert type(attn.to_q).__module__.startswith("peft."), type(attn.to_q)
        attn.to_q.register_forward_hook(lambda *_, attn=attn: called_from.append(attn.processor))
    frames, _ = renderer.render_anchors(plan.anchor_jobs)
    assert any(ours(p) for p in called_from)
    with_lora = [pixels(f.image) for f in frames]

    # The adapter's weight is what the LoRA adds: at scale 0 the frames are exactly the plain ones.
    apply_model_setup(pipe, None, [(path, 0.0, sha) for path, _, sha in plan.settings.loras])
    zero = [pixels(f.image) for f in renderer.render_anchors(plan.anchor_jobs)[0]]
    apply_model_setup(pipe, None, [])
    assert pipe.get_list_adapters() == {}
    plain = [pixels(f.image) for f in renderer.render_anchors(plan.anchor_jobs)[0]]
    assert all(np.array_equal(a, b) for a, b in zip(zero, plain))
    effect = [float(np.abs(a - b).mean()) for a, b in zip(with_lora, plain)]
    assert all(e > 1.0 for e in effect), effect


# ---- (c) Ray against one process ----------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_apply_the_story_files_scheduler_and_lora_like_one_process(tmp_path: Path, loras) -> None:
    # The scheduler and the LoRA come from the story file (a path relative to it), so they reach
    # the workers with the story's settings, not with the pool's options.
    shutil.copy(loras["sdxl"], tmp_path / "fox-lora.safetensors")
    story = str(write_story(tmp_path, 4, model={"scheduler": SCHEDULER,
                                                "loras": [{"path": "fox-lora.safetensors", "scale": 0.8}]}))
    with like_a_ray_worker():
        render_story(story, RenderOptions(out=str(tmp_path / "one"), **FAST))
    want = frame_pixels(tmp_path / "one")
    result = render_story(story, RenderOptions(out=str(tmp_path / "ray"), workers=2, device="cpu",
                                               resources_per_worker={"CPU": 1}, **FAST))
    assert_worker_threads(result.stats)
    assert sorted(result.rendered) == sorted(want) == ["city", "meadow", "snow", "stream"]
    assert_same_pixels(frame_pixels(tmp_path / "ray"), want)
    # The LoRA is in the frames: the same story without the model section renders other pixels.
    plain = tmp_path / "plain"
    with like_a_ray_worker():
        render_story(str(write_story(plain)), RenderOptions(out=str(plain / "out"), **FAST))
    plain_pixels = frame_pixels(plain / "out")
    assert np.abs(plain_pixels["meadow"] - want["meadow"]).mean() > 1.0


# ---- (d) one-line errors, exit 2, nothing written -----------------------------------------------
@pytest.mark.parametrize("case", ["unknown-scheduler", "incompatible-scheduler", "pickled-lora", "missing-lora",
                                  "flux-lora-on-sdxl", "lora-on-kandinsky3"])
def test_bad_scheduler_or_lora_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, loras, capsys, case) -> None:
    story = write_story(tmp_path)
    out = tmp_path / "out"
    model, extra, expect = {
        "unknown-scheduler": ("tiny-sdxl", ["--scheduler", "NoSuchScheduler"],
                              ["--scheduler NoSuchScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]),
        "incompatible-scheduler": ("tiny-flux", ["--scheduler", SCHEDULER],
                                   [f"--scheduler {SCHEDULER}", "not compatible", "FlowMatchEulerDiscreteScheduler"]),
        "pickled-lora": ("tiny-sdxl", ["--lora", f"{loras['bin']}:0.5"], ["--lora", str(loras["bin"]), "safetensors"]),
        "missing-lora": ("tiny-sdxl", ["--lora", str(tmp_path / "nope.safetensors")],
                         ["--lora", str(tmp_path / "nope.safetensors"), "no such file"]),
        "flux-lora-on-sdxl": ("tiny-sdxl", ["--lora", str(loras["flux"])],
                              ["--lora", str(loras["flux"]), "another model", "match no module"]),
        "lora-on-kandinsky3": ("tiny-kandinsky3", ["--lora", str(loras["sdxl"])],
                               ["--lora", str(loras["sdxl"]), "takes no LoRA"]),
    }[case]
    capsys.readouterr()
    code = main(["render", str(story), "--model", model, "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and all(part in err for part in expect), err
    assert not out.exists()


def test_story_file_scheduler_errors_name_the_story_and_the_command_line_wins(tmp_path: Path, loras) -> None:
    story = str(write_story(tmp_path, model={"scheduler": "NoSuchScheduler",
                                             "loras": [{"path": str(loras["flux"])}]}))
    options = RenderOptions(out=str(tmp_path / "o"), **FAST)
    with pytest.raises(StorySyncUserError, match=r"story\.yaml: model\.scheduler NoSuchScheduler: .*compatible"):
        prepare_job(story, options)
    # --scheduler replaces the story's; the story's LoRA (for FLUX) is then what is refused.
    with pytest.raises(StorySyncUserError, match=r"story\.yaml: model\.loras\[0\] .*flux.*another model"):
        prepare_job(story, RenderOptions(out=str(tmp_path / "o"), scheduler=SCHEDULER, **FAST))
    # --lora replaces the story's whole list.
    plan = prepare_job(story, RenderOptions(out=str(tmp_path / "o"), scheduler=SCHEDULER,
                                            loras=[str(loras["sdxl"])], **FAST))
    assert plan.settings.scheduler == SCHEDULER
    assert [(p, s) for p, s, _ in plan.settings.loras] == [(str(loras["sdxl"]), 1.0)]


def test_the_story_files_model_section_is_checked_when_it_loads(tmp_path: Path) -> None:
    story = write_story(tmp_path, model={"loras": [{"path": "a.safetensors", "scale": "yes"}], "sampler": "x"})
    with pytest.raises(StorySpecError) as info:
        load_story(str(story))
    message = str(info.value)
    assert "\n" not in message and "model.loras[0].scale" in message and "model.sampler" in message, message
    # A relative LoRA path is relative to the story file, wherever the job runs from.
    spec = load_story(str(write_story(tmp_path / "sub", model={"loras": [{"path": "x/l.safetensors"}]})))
    assert spec.model.loras[0].path == str(tmp_path / "sub" / "x" / "l.safetensors")
    assert spec.model.loras[0].scale == 1.0 and spec.model.scheduler is None


def test_too_few_steps_for_the_scheduler_is_refused_before_rendering(tmp_path: Path) -> None:
    # PNDM's Runge-Kutta warm-up needs 4 steps with SDXL's scheduler config (stock diffusers fails
    # mid-render the same way): refused at planning, with the step count.
    story = str(write_story(tmp_path))
    with pytest.raises(StorySyncUserError, match=r"--scheduler PNDMScheduler: cannot run 2 steps"):
        prepare_job(story, RenderOptions(out=str(tmp_path / "o"), scheduler="PNDMScheduler", **FAST))
    plan = prepare_job(story, RenderOptions(out=str(tmp_path / "o"), scheduler="PNDMScheduler",
                                            **{**FAST, "steps": 4}))
    assert plan.settings.scheduler == "PNDMScheduler"


# ---- (e) identity: fingerprints, the dataset's settings, anchor bundles --------------------------
def test_fingerprints_follow_the_scheduler_and_the_loras_content_and_scale(tmp_path: Path, loras) -> None:
    story = str(write_story(tmp_path))
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy(loras["sdxl"], moved)

    def fingerprints(**options) -> dict[str, str]:
        return prepare_job(story, RenderOptions(out=str(tmp_path / "o"), **{**FAST, **options})).fingerprints

    base = fingerprints()
    variants = {
        "scheduler": fingerprints(scheduler=SCHEDULER),
        "lora": fingerprints(loras=[(str(loras["sdxl"]), 1.0)]),
        "scale": fingerprints(loras=[(str(loras["sdxl"]), 0.5)]),
        "other file": fingerprints(loras=[(str(loras["other"]), 1.0)]),
        "two": fingerprints(loras=[(str(loras["sdxl"]), 1.0), (str(loras["other"]), 1.0)]),
    }
    seen = [base, *variants.values()]
    for frame_id in base:
        assert len({f[frame_id] for f in seen}) == len(seen), frame_id
    # The model's own scheduler named explicitly is no change, and a LoRA is its bytes, not its path.
    assert fingerprints(scheduler="EulerDiscreteScheduler") == base
    assert fingerprints(loras=[(str(moved), 1.0)]) == variants["lora"]


def test_a_rerun_with_a_lora_renders_again_and_a_bundle_without_it_is_refused(tmp_path: Path, loras, capsys) -> None:
    story = str(write_story(tmp_path))
    out = tmp_path / "out"
    fast = ["--model", "tiny-sdxl", "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
            "--no-progress"]
    assert main(["render", story, "--out", str(out), "--save-anchors", *fast]) == 0
    bundle = tmp_path / "plain-anchors.safetensors"
    shutil.copy(out / "anchors" / "fox.safetensors", bundle)
    first = frame_pixels(out)
    lora = ["--lora", f"{loras['sdxl']}:0.8"]

    # The LoRA is a render setting: the stored frames are refused without --replace-config ...
    capsys.readouterr()
    assert main(["render", story, "--out", str(out), *fast, *lora]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loras" in err and "--replace-config" in err, err
    # ... and rendered again with it.
    assert main(["render", story, "--out", str(out), *fast, *lora, "--replace-config", "--save-anchors"]) == 0
    assert "rendered 3 frame(s), skipped 0" in capsys.readouterr().out
    second = frame_pixels(out)
    assert all(np.abs(second[k] - first[k]).mean() > 1.0 for k in first)
    # The same LoRA again: nothing to do.
    assert main(["render", story, "--out", str(out), *fast, *lora]) == 0
    assert "rendered 0 frame(s), skipped 3" in capsys.readouterr().out

    # The anchor bundle saved without a LoRA does not serve a job with one (one line, exit 2).
    again = tmp_path / "again"
    assert main(["render", story, "--out", str(again), *fast, *lora, "--anchors", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--anchors {bundle}" in err and "without a LoRA" in err, err
    assert main(["render", story, "--out", str(again), *fast, "--scheduler", SCHEDULER,
                 "--anchors", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the model's own scheduler" in err and SCHEDULER in err, err
    assert not again.exists()
    # The bundle saved with the LoRA serves it: the frames are those rendered with their anchors.
    assert main(["render", story, "--out", str(again), *fast, *lora, "--anchors",
                 str(out / "anchors" / "fox.safetensors")]) == 0
    imported = frame_pixels(again)
    assert set(imported) == set(second) and np.array_equal(imported["snow"], second["snow"])
