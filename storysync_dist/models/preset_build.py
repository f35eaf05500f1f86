"""One offline preset: what it is made of (:class:`Preset`) and how it is built, in memory or into a
folder. The presets themselves are the families' (``unet_presets``, ``flux_presets``, ``kandinsky3``);
the table of every preset and its on-disk cache are ``presets``.

Presets are the real diffusers pipeline classes with small (or full-size, ``random-*``) configs and
seeded random weights: each component's weights come from a seed fixed per role, so a preset's cache
key (a hash of its configs and library versions) promises the same weights everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import accelerate
import diffusers
import diffusers.utils.logging
import huggingface_hub.utils
import torch
import transformers
import transformers.utils.logging
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from storysync_dist.cache import cache_root

from .tokenizer import build_clip_tokenizer

__all__ = [
    "BUILD_LOCK", "COMMON_BUILDERS", "PRESET_VERSION", "Preset", "build_into", "component_seed", "quiet_progress_bars",
]

# Bump when a preset changes in a way its config dicts do not capture (e.g. how weights are seeded).
PRESET_VERSION = 1
_MANIFEST = "storysync_preset.json"
# Threads share torch's global RNG and accelerate's empty-weights switch: one build at a time.
BUILD_LOCK = threading.Lock()

# Builders of the components the UNet and FLUX pipelines share (a VAE, CLIP's text encoder and
# tokenizer); a family's ``Preset.builders`` adds its own to these.
COMMON_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "vae": lambda cfg: AutoencoderKL(**cfg),
    "text_encoder": lambda cfg: CLIPTextModel(CLIPTextConfig(**cfg)),
    "tokenizer": lambda cfg: build_clip_tokenizer(**cfg),
}

_SEEDS = {
    "unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "tokenizer": 4, "tokenizer_2": 5,
    "scheduler": 6,
}


def component_seed(role: str) -> int:
    """The weight seed of one pipeline component: fixed per role, so each component's weights are
    independent of build order (roles of other families get a stable hash of their name)."""
    return _SEEDS[role] if role in _SEEDS else zlib.crc32(role.encode()) % 2**31


@dataclass(frozen=True)
class Preset:
    """An offline, deterministic stand-in for a real checkpoint of `pipeline_class`.

    ``in_memory`` presets are never saved with their weights: ``loading.load_pipeline`` builds them
    in memory with :meth:`build_in_memory` (see ``random-sdxl``).
    """

    name: str
    pipeline_class: type[DiffusionPipeline]
    scheduler_class: type
    components: Mapping[str, Mapping[str, Any]]
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    in_memory: bool = False
    # A trained pipeline folder shipped with the package (``toyworld``): ``path()`` is this folder,
    # called at each use (the folder may be moved by an environment variable); nothing is built.
    folder: Callable[[], pathlib.Path] | None = None
    # role -> builder of that component from its config dict (``COMMON_BUILDERS`` plus the family's own).
    builders: Mapping[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)

    def builder(self, role: str) -> Callable[[dict[str, Any]], Any]:
        """The builder of component ``role`` from its config dict."""
        return self.builders[role]

    def cache_key(self) -> str:
        """Short hash of everything that determines the saved weights and configs."""
        payload = json.dumps(self._manifest(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def _manifest(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "preset_version": PRESET_VERSION,
            "pipeline_class": self.pipeline_class.__name__,
            "scheduler_class": self.scheduler_class.__name__,
            "components": self.components,
            "pipeline_kwargs": self.pipeline_kwargs,
            "versions": {
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }

    def build(self) -> DiffusionPipeline:
        """Instantiate the pipeline with seeded random weights (in memory; nothing is saved)."""
        parts: dict[str, Any] = {}
        # The cache key promises identical weights everywhere, so pin what a caller may have changed
        # globally (default dtype/device), and leave the caller's RNG stream as it was.
        caller_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                for role, cfg in self.components.items():
                    # A fixed seed per role makes each component's weights independent of build order
                    # and of the other components, and keeps SDXL's two text encoders distinct.
                    torch.manual_seed(component_seed(role))
                    if role == "scheduler":
                        parts[role] = self.scheduler_class(**cfg)
                    else:
                        parts[role] = self.builder(role)(dict(cfg))
        finally:
            torch.set_default_dtype(caller_dtype)
        pipe = self.pipeline_class(**parts, **self.pipeline_kwargs)
        # Inference mode, as from_pretrained leaves models (T5's dropout would make stock calls on a
        # freshly built pipeline differ from one call to the next).
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.eval()
        return pipe

    def build_in_memory(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> DiffusionPipeline:
        """Build the pipeline with seeded random weights, allocated on ``device`` in ``dtype``.

        Each model is constructed on the meta device (no memory, no init work) and then gets its
        parameters one tensor at a time from a per-component CPU generator: normal(0, 1/sqrt(fan_in))
        for matrices and kernels, ones for norm scales, zeros for biases. The draws happen in float32
        on the CPU, so the weights are the same on every device and differ across dtypes only by
        rounding; the host never holds more than one float32 tensor besides the weights.
        """
        parts: dict[str, Any] = {}
        caller_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            for role, cfg in self.components.items():
                if role == "scheduler":
                    parts[role] = self.scheduler_class(**cfg)
                elif role.startswith("tokenizer"):
                    parts[role] = self.builder(role)(dict(cfg))
                else:
                    # Buffers stay real (CLIP's position ids are computed at construction).
                    with accelerate.init_empty_weights(include_buffers=False):
                        model = self.builder(role)(dict(cfg))
                    parts[role] = _materialize(model, component_seed(role), device, dtype)
        finally:
            torch.set_default_dtype(caller_dtype)
        return self.pipeline_class(**parts, **self.pipeline_kwargs)

    def path(self) -> pathlib.Path:
        """Folder this preset is (or will be) saved to; a shipped folder for a trained preset."""
        if self.folder is not None:
            return self.folder()
        return cache_root() / "presets" / f"{self.name}-{self.cache_key()}"


def _materialize(model: torch.nn.Module, seed: int, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every meta parameter of ``model`` by a seeded random one on ``device`` in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                values = torch.empty(param.shape, dtype=torch.float32)
                if values.ndim >= 2:
                    # Unit-variance activations through each layer, so 70 transformer blocks of
                    # random weights still give finite, unsaturated numbers in half precision.
                    values.normal_(0.0, (values[0].numel()) ** -0.5, generator=generator)
                elif name == "weight":
                    values.fill_(1.0)  # norm scales
                else:
                    values.zero_()
                done[id(param)] = torch.nn.Parameter(values.to(device=device, dtype=dtype), requires_grad=False)
            module._parameters[name] = done[id(param)]
    return model.eval()


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Progress bars of diffusers, transformers and huggingface_hub off inside the block."""
    # Local loads/saves take well under a second; their per-component bars only clutter worker logs.
    # These switches are process-global, so restore whatever the caller had.
    # transformers' switch also flips huggingface_hub's, so that one is saved and restored too.
    diffusers_on = diffusers.utils.logging.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    hub_off = huggingface_hub.utils.are_progress_bars_disabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if diffusers_on:
            diffusers.utils.logging.enable_progress_bar()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()
        if hub_off:
            huggingface_hub.utils.disable_progress_bars()
        else:
            huggingface_hub.utils.enable_progress_bars()


def build_into(preset: Preset, target: pathlib.Path) -> None:
    """Build ``preset`` and save it to ``target``, atomically (a temporary sibling renamed into place);
    an ``in_memory`` preset saves its configs and tokenizers only."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes the folder 0700; a shared cache must stay readable by other users.
        tmp.chmod(0o755)
        with quiet_progress_bars():
            if preset.in_memory:
                _save_configs(preset, tmp)
            else:
                pipe = preset.build()
                pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MANIFEST).write_text(json.dumps(preset._manifest(), indent=2, sort_keys=True, default=str))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy in first (the target is then a non-empty directory).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_configs(preset: Preset, folder: pathlib.Path) -> None:
    """Write a pipeline folder without weights: model_index.json, every config, the tokenizers."""
    parts: dict[str, Any] = {}
    for role, cfg in preset.components.items():
        if role == "scheduler":
            parts[role] = preset.scheduler_class(**cfg)
        else:
            with torch.device("meta"):  # structure only: nothing is allocated or initialized
                parts[role] = preset.builder(role)(dict(cfg))
    pipe = preset.pipeline_class(**parts, **preset.pipeline_kwargs)
    pipe.save_config(folder)  # model_index.json
    for role, part in parts.items():
        if role.startswith("tokenizer"):
            part.save_pretrained(folder / role)
        elif hasattr(part, "save_config"):  # diffusers models and schedulers
            part.save_config(folder / role)
        else:  # transformers models
            part.config.save_pretrained(folder / role)
