"""The seam between the engine and a model family (UNet, FLUX, Kandinsky 3, ...).

Two small interfaces, in the spirit of vLLM's model registry:

- :class:`ModelFamily` answers questions about a model *without loading it* (a Ray driver on a
  CPU head node must validate a story against SDXL without 10 GB of weights): which pipeline
  classes it handles, what the spec needs to check prompts and sizes (:class:`ModelInfo`), its
  sampling defaults, its default shared and mask layers, and its offline presets; and it builds
  the :class:`Adapter` for a loaded pipeline.
- :class:`Adapter` owns one loaded pipeline: it installs and removes the StorySync attention
  processors and renders one batch against a :class:`~storysync_dist.core.state.StorySyncState`.

The registry (``models/registry.py``) picks the family; the engine, the Ray actors, the jobs and
the benchmarks see only these two interfaces, so a new family is one module plus one registry line.
"""

from __future__ import annotations

import pathlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..core.config import StorySyncConfig
    from ..core.state import StorySyncState
    from .preset_build import Preset

__all__ = ["Adapter", "ModelFamily", "ModelInfo", "RenderResult", "SamplingDefaults", "UnknownModelError"]


class UnknownModelError(ValueError):
    """A model string that is neither a preset, a local pipeline folder, nor a hub id; or a pipeline
    no registered family renders (one line, for the user)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What the stock pipeline uses when ``pipe(prompt)`` is called without these arguments."""

    height: int
    width: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ModelInfo:
    """What the story checks and the planner need from a model, without its weights.

    ``tokenizer`` is the one whose token positions the subject masks use (the tokenizer of the
    text encoder that feeds the attention layers); ``text_len`` is the padded length of that text
    sequence as the attention layers see it; height and width must be multiples of ``size_factor``.
    """

    family: str
    tokenizer: Any
    size_factor: int
    text_len: int
    default_height: int
    default_width: int
    default_steps: int
    default_guidance_scale: float
    # Defaults of StorySyncConfig.share_layers / mask_layers for this family (processor-name prefixes).
    share_layers: tuple[str, ...] = ()
    mask_layers: tuple[str, ...] = ()
    # Whether the family's stock pipeline takes a negative prompt (a story with one is refused if not).
    negative_prompt: bool = True
    # Whether guidance_scale > 1 means classifier-free guidance, an [uncond | cond] batch (UNet);
    # False where guidance is an embedding of the model (FLUX.1-dev) or absent (schnell).
    cfg_batch: bool = True
    # The largest height or width a render may ask for (px); a larger one is refused before anything
    # loads (engine.memory.check_size). 4096 unless the family knows better.
    max_size: int = 4096
    # The longest text a story may ask for with ``defaults.max_sequence_length`` (FLUX: what
    # ``FluxPipeline`` accepts); None where the family's text length is fixed (CLIP's 77, Kandinsky
    # 3's 128), and a story that sets it is refused.
    max_text_len: int | None = None
    # Whether the family can render ConsiStory's feature injection (``feature_injection``): its
    # adapter records DIFT features (a UNet's first decoder block). Where it cannot, a config that
    # asks for it renders ConsiStory's one-pass form (``resolve_config``), and the config column says so.
    feature_injection: bool = False
    # Whether the denoiser has FreeU (diffusers' ``enable_freeu``: a UNet). A method's own sampler
    # (``core.methods.METHOD_SAMPLING``: ConsiStory's DDIM + FreeU) applies only where it does; the
    # other families keep their sampler.
    freeu: bool = False

    @property
    def defaults(self) -> SamplingDefaults:
        return SamplingDefaults(self.default_height, self.default_width, self.default_steps,
                                self.default_guidance_scale)


@dataclass
class RenderResult:
    """Images and final subject masks (F, h, w boolean, or None) of one render."""

    images: list[Image.Image]
    masks: torch.Tensor | None


class Adapter(Protocol):
    """One loaded pipeline of a family, ready to render StorySync batches (every family's subclasses
    ``models/adapter_base.py``'s ``AdapterBase``, which writes most of this once)."""

    family: str

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (``pipe._execution_device``)."""

    @property
    def dtype(self) -> torch.dtype:
        """The precision the denoiser runs in."""

    @property
    def info(self) -> ModelInfo:
        """The same :class:`ModelInfo` the family reads from the model's folder."""

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) grid of the image tokens at the denoiser's full resolution for this image size."""

    def install(self, state: StorySyncState) -> None:
        """Install the StorySync processors for one render (``set_attn_processor``)."""

    def uninstall(self) -> None:
        """Put the stock processors back."""

    def generate(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int],
        *, num_steps: int, height: int, width: int, guidance_scale: float,
        on_step: Callable[[int], None] | None = None,
    ) -> RenderResult:
        """Render one image per prompt with the installed state, step for step as the stock
        pipeline's ``__call__``; ``negative_prompts=None`` means the stock "no negative prompt"."""


class ModelFamily(ABC):
    """A family of diffusers pipelines StorySync can drive (see the module docstring)."""

    #: Short name, recorded nowhere in frames (the model string is); used in messages and docs.
    name: str
    #: ``model_index.json`` ``_class_name`` values this family handles (subclasses count too).
    pipeline_classes: tuple[str, ...]
    #: Files a driver reads to answer :meth:`info_from_folder` (for a hub id's cached snapshot).
    info_files: tuple[str, ...] = ("model_index.json",)
    #: The dtype a render on CUDA uses when ``--dtype`` is not given (``engine.devices.default_dtype``;
    #: float32 on every other device): float16, the dtype diffusers' examples load SDXL, SD and
    #: Kandinsky 3 in, unless the family's activations need bfloat16's range (FLUX).
    cuda_dtype: str = "float16"

    def handles(self, class_name: str) -> bool:
        """Whether this family renders the pipeline class named ``class_name`` (or a subclass)."""
        if class_name in self.pipeline_classes:
            return True
        import diffusers

        found = getattr(diffusers, class_name, None)
        return isinstance(found, type) and any(c.__name__ in self.pipeline_classes for c in found.__mro__)

    @abstractmethod
    def info_from_folder(self, folder: pathlib.Path, model_index: Mapping[str, Any]) -> ModelInfo:
        """:class:`ModelInfo` from a pipeline folder's configs and tokenizer files (no weights)."""

    @abstractmethod
    def info_from_pipeline(self, pipe: Any) -> ModelInfo:
        """The same :class:`ModelInfo` from a loaded pipeline."""

    @abstractmethod
    def adapter(self, pipe: Any) -> Adapter:
        """The adapter that renders with ``pipe``."""

    def presets(self) -> Mapping[str, Preset]:
        """Offline presets of this family (name -> preset)."""
        return {}

    def shares_at(self, processor: str) -> bool:
        """Whether the processor named ``processor`` (a key of the denoiser's ``attn_processors``) is
        one that a ``share_layers`` prefix selects for cross-image sharing (a self-attention)."""
        return processor.endswith("attn1.processor")

    def maps_at(self, processor: str) -> bool:
        """Whether ``processor`` is one that a ``mask_layers`` prefix selects for the subject maps
        (a text cross-attention)."""
        return processor.endswith("attn2.processor")

    def resolve_config(self, config: StorySyncConfig, info: ModelInfo) -> StorySyncConfig:
        """Fill the config's family-dependent defaults (layers left as None) from ``info``."""
        return config.with_layers(info.share_layers, info.mask_layers).for_model(info.feature_injection)
