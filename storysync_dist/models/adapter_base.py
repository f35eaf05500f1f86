"""What every family's adapter shares (:class:`~.family.Adapter`): :class:`AdapterBase`.

A family's adapter subclasses :class:`AdapterBase` and writes only what its pipeline does its own
way, step for step as its stock ``__call__``: the image-token grid (``latent_hw``), the start of a
render (``prepare_run``: the prompts encoded, the timesteps, each branch's latents), one step's
noise (``predict_noise``), the decode (``decode``), anything the denoiser needs around the loop
(``render_context``), and, where its attention is not diffusers' UNet-style ``Attention`` with
``AttnProcessor2_0`` (FLUX's joint attention), the processor of a layer (``processor``). The base
keeps the stock processors, installs StorySync's for a render and puts the stock ones back, runs
the denoising loop (``generate``), and answers ``info``, ``tokenizer``, ``device`` and ``dtype``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from ..core.state import CONSISTENT, StorySyncState
from .attention import StorySyncSelfAttnProcessor, SubjectMapProcessor
from .denoise import BranchLatents, check_finite, end_step
from .family import ModelFamily, ModelInfo, RenderResult
from .offload import offload_idle

__all__ = ["AdapterBase", "Run"]


@dataclass
class Run:
    """One render's denoising loop as a family prepares it (``AdapterBase.prepare_run``): the
    timesteps and each branch's latents; a family's subclass adds what its steps and its decode
    read (the text embeddings, the generators, ...)."""

    timesteps: torch.Tensor
    latents: BranchLatents


class AdapterBase(ABC):
    """One loaded pipeline of the family ``family_type``, ready to render StorySync batches.

    ``denoiser_role``: the pipeline component whose attention layers get the processors (``unet``,
    ``transformer``). The pipeline must be of one of the family's ``pipeline_classes`` (or a
    subclass of one); ``TypeError`` otherwise.
    """

    family_type: ClassVar[type[ModelFamily]]
    denoiser_role: ClassVar[str] = "unet"

    def __init__(self, pipe: Any) -> None:
        names = {c.__name__ for c in type(pipe).__mro__}
        if not names & set(self.family_type.pipeline_classes):
            raise TypeError(f"{type(pipe).__name__} is not a {self.family_type.name} pipeline "
                            f"({', '.join(self.family_type.pipeline_classes)})")
        self.pipe = pipe
        self._family = self.family_type()
        self._stock_processors = dict(self.denoiser.attn_processors)
        self._info: ModelInfo | None = None

    @property
    def family(self) -> str:
        """The family's name (``ModelFamily.name``)."""
        return self.family_type.name

    @property
    def info(self) -> ModelInfo:
        """The same :class:`ModelInfo` the family reads from the model's folder."""
        if self._info is None:
            self._info = self._family.info_from_pipeline(self.pipe)
        return self._info

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose token positions the subject masks use (``ModelInfo.tokenizer``)."""
        return self.info.tokenizer

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's UNet or transformer (``denoiser_role``)."""
        return getattr(self.pipe, self.denoiser_role)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (``pipe._execution_device``)."""
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        """The precision the denoiser runs in."""
        return self.denoiser.dtype

    def install(self, state: StorySyncState) -> None:
        """Install the StorySync processors for one render (``set_attn_processor``): each layer's
        from :meth:`processor`, told whether ``share_layers`` selects it (``shares``) and whether it
        records subject maps (``maps``: the config needs masks and ``mask_layers`` selects it)."""
        cfg = state.config
        if cfg.share_layers is None or cfg.mask_layers is None:
            raise ValueError("install a config whose layers are resolved (StorySyncConfig.with_layers)")
        current = self.denoiser.attn_processors
        processors = {
            name: self.processor(name, state, name.startswith(cfg.share_layers),
                                 cfg.needs_masks and name.startswith(cfg.mask_layers), current[name])
            for name in self._stock_processors
        }
        self.denoiser.set_attn_processor(processors)

    def uninstall(self) -> None:
        """Put the stock processors back."""
        self.denoiser.set_attn_processor(dict(self._stock_processors))

    def processor(self, name: str, state: StorySyncState, shares: bool, maps: bool, current: Any) -> Any:
        """The processor of layer ``name`` for one render (``current``: the one installed now).

        For UNet-style ``Attention`` modules: :class:`StorySyncSelfAttnProcessor` on the
        self-attentions (``ModelFamily.shares_at``) while any mechanism is on, a
        :class:`SubjectMapProcessor` on the text cross-attentions (``ModelFamily.maps_at``) that
        record maps, diffusers' ``AttnProcessor2_0`` everywhere else, so with every mechanism off
        the pipeline is bit-for-bit stock.
        """
        if state.config.any_mechanism and self._family.shares_at(name):
            return StorySyncSelfAttnProcessor(name, state, shares)
        if maps and self._family.maps_at(name):
            return SubjectMapProcessor(name, state)
        return AttnProcessor2_0()

    @torch.no_grad()
    def generate(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int], *,
        num_steps: int, height: int, width: int, guidance_scale: float, on_step: Callable[[int], None] | None = None,
    ) -> RenderResult:
        """Render ``prompts`` (one image each) with the installed state, step for step as the stock
        pipeline's ``__call__`` (``prepare_run``, then per step ``predict_noise`` and each branch's
        scheduler step, then ``decode``); ``on_step(i)`` is called after each step.
        ``negative_prompts=None`` is the stock call without a negative prompt."""
        run = self.prepare_run(state, prompts, negative_prompts, seeds, num_steps, height, width, guidance_scale)
        with self.render_context(state, run):
            for i, t in enumerate(run.timesteps):
                branches = state.branches
                run.latents.step(branches, self.predict_noise(run, branches, t), t)
                end_step(state, run.latents, i, on_step)
        final = run.latents.latents[CONSISTENT]
        check_finite(final)
        images = self.decode(run, final)
        offload_idle(self.pipe)  # --offload model: the decoder leaves the device
        return RenderResult(images=images, masks=state.final_masks())

    @abstractmethod
    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) grid of the image tokens at the denoiser's full resolution for this image size."""

    @abstractmethod
    def prepare_run(
        self, state: StorySyncState, prompts: list[str], negative_prompts: list[str] | None, seeds: list[int],
        num_steps: int, height: int, width: int, guidance_scale: float,
    ) -> Run:
        """The start of the stock ``__call__``: its per-call attributes, the prompts encoded (then
        ``offload_idle``: with ``--offload model`` the text encoders leave the device), the
        timesteps, one CPU generator per seed (an image's noise depends only on its seed) and each
        branch's latents (``BranchLatents``). Refuses what the family cannot render (a guidance
        that does not match ``state.guidance``, a negative prompt it does not take)."""

    @abstractmethod
    def predict_noise(self, run: Run, branches: tuple[str, ...], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One denoiser call on the batch of ``branches`` at timestep ``t``: the (guided) noise per branch."""

    @abstractmethod
    def decode(self, run: Run, latents: torch.Tensor) -> list[Image.Image]:
        """The images of the consistent branch's final latents, as the stock ``__call__`` decodes them."""

    def render_context(self, state: StorySyncState, run: Run) -> contextlib.AbstractContextManager[Any]:
        """What the denoiser needs around the loop (a hook, a processor of its own); none here."""
        return contextlib.nullcontext()
