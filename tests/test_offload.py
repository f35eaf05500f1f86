"""``--offload model`` (``models/offload.py``): the denoiser stays on its device across frames, the
text encoders and the VAE visit it, and the pixels are those of a render without offload.

This machine has no GPU: with ``device="cpu"`` accelerate's hooks run but move nothing, so the
device cannot be read off the tensors. The tests read the hooks instead: which components carry
one, and, during a render, which components a hook has moved to the device (``CpuOffload.
pre_forward``) and not yet back (``CpuOffload.init_hook``, what ``offload`` calls); and they watch
every move of the denoiser (``Module._apply``, what ``.to``, ``.cpu`` and ``.cuda`` call)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.hooks import CpuOffload
from PIL import Image

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.io.sink import open_dataset
from storysync_dist.models import loading
from storysync_dist.models.offload import DENOISER_ROLES, offloaded_roles, resident_roles
from storysync_dist.models.presets import PRESETS, Preset, load_pipeline

TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))


def write_story(folder: Path, frames: int = 4) -> Path:
    story = {
        "id": "fox",
        "style": "A photo of",
        "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
        "defaults": {"steps": 2, "height": 64, "width": 64},
        "frames": [{"id": f"f{k}", "prompt": f"{{fox}} in place number {k}", "seed": 10 + k} for k in range(frames)],
    }
    path = folder / "fox.yaml"
    path.write_text(yaml.safe_dump(story))
    return path


def frames_of(out: Path) -> dict[str, np.ndarray]:
    rows = open_dataset(out).to_table().to_pylist()
    return {r["frame_id"]: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in rows}


def denoiser_role(pipe: object) -> str:
    return next(role for role in DENOISER_ROLES if getattr(pipe, role, None) is not None)


@pytest.mark.parametrize("preset", TINY)
def test_offload_hooks_the_text_encoders_and_the_vae_never_the_denoiser(preset: str) -> None:
    pipe = load_pipeline(preset, offload="model")
    role = denoiser_role(pipe)
    modules = {r for r, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    assert set(offloaded_roles(pipe)) == modules - {role}
    assert not any(hasattr(m, "_hf_hook") for m in getattr(pipe, role).modules())
    assert role in pipe._exclude_from_cpu_offload and role not in pipe.model_cpu_offload_seq.split("->")
    # The engine puts the latents, masks and bundle where the hooks compute, the denoiser's device.
    assert pipe._execution_device.type == "cpu"
    # Without offload nothing is hooked.
    assert offloaded_roles(load_pipeline(preset)) == []


@pytest.mark.parametrize("preset", TINY)
def test_offload_keeps_the_denoiser_on_its_device_across_frames(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    story = str(write_story(tmp_path))
    render_story(story, RenderOptions(model=preset, out=str(tmp_path / "plain"), progress=False))

    pipe = load_pipeline(preset, offload="model")
    role = denoiser_role(pipe)
    denoiser = getattr(pipe, role)
    names = {id(part): r for r, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    on_device: set[str] = set()  # moved to the device by a hook and not moved back yet
    visits: list[str] = []
    real_pre_forward, real_init_hook = CpuOffload.pre_forward, CpuOffload.init_hook

    def pre_forward(self: CpuOffload, module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        on_device.add(names[id(module)])
        visits.append(names[id(module)])
        return real_pre_forward(self, module, *args, **kwargs)

    def init_hook(self: CpuOffload, module: torch.nn.Module) -> object:
        on_device.discard(names[id(module)])
        return real_init_hook(self, module)

    monkeypatch.setattr(CpuOffload, "pre_forward", pre_forward)
    monkeypatch.setattr(CpuOffload, "init_hook", init_hook)
    beside_denoiser: list[frozenset[str]] = []
    handle = denoiser.register_forward_pre_hook(lambda module, args: beside_denoiser.append(frozenset(on_device)))
    moves: list[object] = []
    real_apply = denoiser._apply
    monkeypatch.setattr(denoiser, "_apply", lambda fn, *a, **k: moves.append(fn) or real_apply(fn, *a, **k))
    where = {name: (p.device, p.data_ptr()) for name, p in denoiser.named_parameters()}
    try:
        result = render_story(story, RenderOptions(model=preset, out=str(tmp_path / "offload"), progress=False),
                              pipe=pipe)
    finally:
        handle.remove()

    assert len(result.rendered) == 4
    # Every denoiser step ran with the text encoders and the VAE off the device...
    assert beside_denoiser and all(not others for others in beside_denoiser), set().union(*beside_denoiser)
    # ...they did visit it (the anchors' render and each frame encode and decode)...
    assert set(visits) == set(offloaded_roles(pipe))
    # ...and they are off it once the render is done (the VAE leaves after its decode).
    assert on_device == set()
    # The denoiser never moved: no .to/.cpu/.cuda, the same parameter storage on the same device.
    assert moves == []
    assert {name: (p.device, p.data_ptr()) for name, p in denoiser.named_parameters()} == where
    # Offload changes where weights rest, never the pixels.
    plain, offloaded = frames_of(tmp_path / "plain"), frames_of(tmp_path / "offload")
    assert plain.keys() == offloaded.keys()
    for frame_id, image in plain.items():
        assert np.array_equal(offloaded[frame_id], image), frame_id


class _Built(Exception):
    pass


def test_in_memory_presets_are_built_in_host_memory_when_offloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """``random-sdxl`` (14 GB in float32) is not built here: the build is stopped once it is asked for."""
    asked: list[str] = []

    def build_in_memory(self: Preset, device: str, dtype: torch.dtype) -> None:
        asked.append(str(device))
        raise _Built

    monkeypatch.setattr(Preset, "build_in_memory", build_in_memory)
    for offload in ("model", "none"):
        with pytest.raises(_Built):
            loading.load_pipeline("random-sdxl", device="cuda", dtype=torch.float16, offload=offload)
    assert asked == ["cpu", "cuda"]


def test_resident_roles_are_the_denoiser_and_the_larger_visitor() -> None:
    # SDXL base: the text encoders (818M) outweigh the VAE (84M); a negative prompt has both on the device.
    sdxl = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert resident_roles(sdxl, "unet", "vae") == ("unet", "text_encoder", "text_encoder_2")
    small_text = {"unet": 100, "vae": 50, "text_encoder": 20}
    assert resident_roles(small_text, "unet", "vae") == ("unet", "vae")
