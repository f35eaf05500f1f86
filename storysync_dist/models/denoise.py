"""Pieces of a denoising loop every family shares: the per-branch latents and schedulers (the
vanilla branch of BLI leaves the batch after T steps), the check for non-finite latents, and the
decode of a frame batch one image at a time."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch

from ..core.state import CONSISTENT, VANILLA, StorySyncState
from ..errors import NonFiniteOutputError

__all__ = ["BranchLatents", "check_finite", "decode_each", "end_step"]


class BranchLatents:
    """The latents of each branch with its own scheduler copy: multistep schedulers keep
    per-sample history, and the vanilla branch leaves the batch after T steps (BLI, Eq. 12).

    With ``mirror_vanilla`` (``bli_latents: consistent``, ConsiStory's release) the vanilla branch
    has no latents of its own: its rows get the consistent branch's model input of the step, and
    its noise prediction is dropped (only its attention queries serve, as the release's stock UNet
    pass on the current latents), so it may join the batch at any step."""

    def __init__(
        self, scheduler: object, latents: torch.Tensor, with_vanilla: bool, step_kwargs: dict,
        scale_input: bool = True, mirror_vanilla: bool = False,
    ) -> None:
        # scale_input=False: pipelines whose loop feeds the latents as they are (flow matching,
        # Kandinsky 3's DDPM loop) rather than through scheduler.scale_model_input.
        self.scale_input = scale_input
        self.mirror_vanilla = mirror_vanilla
        if mirror_vanilla:
            with_vanilla = False
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        self.schedulers = {CONSISTENT: copy.deepcopy(scheduler)}
        self.latents = {CONSISTENT: latents}
        accepts = set(inspect.signature(scheduler.step).parameters)
        kwargs = {k: v for k, v in step_kwargs.items() if k in accepts}
        self.step_kwargs = {CONSISTENT: kwargs}
        if with_vanilla:
            self.schedulers[VANILLA] = copy.deepcopy(scheduler)
            self.latents[VANILLA] = latents.clone()
            # Schedulers that draw noise every step (DDPM, Euler ancestral) must not let the vanilla
            # branch take the consistent branch's draws: it gets its own copy of each generator.
            self.step_kwargs[VANILLA] = {
                k: [_clone_generator(g) for g in v] if k == "generator" and isinstance(v, list) else v
                for k, v in kwargs.items()
            }

    def model_input(self, branches: tuple[str, ...], t: torch.Tensor) -> torch.Tensor:
        if self.mirror_vanilla:
            own = [CONSISTENT if b == VANILLA else b for b in branches]
            inputs = {b: self._input(b, t) for b in dict.fromkeys(own)}  # each scaled once
            return torch.cat([inputs[b] for b in own])
        return torch.cat([self._input(b, t) for b in branches])

    def _input(self, branch: str, t: torch.Tensor) -> torch.Tensor:
        if not self.scale_input:
            return self.latents[branch]
        return self.schedulers[branch].scale_model_input(self.latents[branch], t)

    def step(self, branches: tuple[str, ...], noise: tuple[torch.Tensor, ...], t: torch.Tensor) -> None:
        for b, chunk in zip(branches, noise):
            if b not in self.schedulers:
                continue  # a mirrored vanilla branch: its prediction served its queries only
            self.latents[b] = self.schedulers[b].step(chunk, t, self.latents[b], **self.step_kwargs[b],
                                                      return_dict=False)[0]

    def drop(self, branch: str) -> None:
        if branch in self.latents:
            del self.latents[branch], self.schedulers[branch], self.step_kwargs[branch]


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def check_finite(latents: torch.Tensor) -> None:
    """Refuse NaN/inf latents (one device sync per render, not per step)."""
    if not bool(torch.isfinite(latents).all()):
        bad = [i for i in range(latents.shape[0]) if not bool(torch.isfinite(latents[i]).all())]
        raise NonFiniteOutputError(
            f"the denoiser produced NaN/inf latents for image(s) {bad} of the batch "
            f"({latents.dtype}; float16 overflows on some models: try --dtype bfloat16 or float32)"
        )


def end_step(state: StorySyncState, branch_latents: BranchLatents, i: int, on_step: Callable[[int], None] | None) -> None:
    """What every family's loop does after step ``i``: close the step in the state, let the
    vanilla branch leave the batch once BLI is over, and report the step."""
    state.end_step()
    if not state.has_vanilla:
        branch_latents.drop(VANILLA)
    if on_step is not None:
        on_step(i)


def decode_each(decode: Callable[[torch.Tensor, slice], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """A latent decoder's output for a batch, decoded one image at a time (as diffusers'
    ``vae.enable_slicing()``, without changing the caller's pipeline): the decode holds one image's
    activations whatever the frame batch (an SDXL VAE decodes in float32: a batch of 8 at 1024 px
    all at once does not fit 24 GB), and each image's pixels do not depend on the batch.

    Args:
        decode: (latents (1, ...), the batch rows it is) -> images (1, ...).
        latents: (B, ...) the batch.
    Returns:
        (B, ...) the decoded images, in batch order.
    """
    parts = [decode(latents[i:i + 1], slice(i, i + 1)) for i in range(latents.shape[0])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)

