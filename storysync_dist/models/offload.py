"""``--offload model``: the denoiser stays on the device; the text encoders and the VAE visit it.

diffusers' ``enable_model_cpu_offload`` chains the components of ``model_cpu_offload_seq``
(``text_encoder->text_encoder_2->unet->vae``) with accelerate's ``cpu_offload_with_hook``: each one
moves to the device when its forward runs and back to host memory when the next one in the chain
runs; the last one waits for the stock ``__call__``'s closing ``maybe_free_model_hooks``. The
adapters' ``generate`` never calls that (and it would re-install every hook, moving the denoiser
to the host and back), so with the stock chain the VAE's hook moved the denoiser off the device at
every decode, and the next frame moved it back: 5.1 GB per frame for SDXL's UNet, 24 GB for
FLUX.1-dev's transformer in 16 bits.

:func:`enable_offload` uses the same diffusers mechanism with the denoiser taken out of the chain
and added to the pipeline's ``_exclude_from_cpu_offload``, which diffusers moves to the device once
and never hooks. Both are set on the pipeline instance, so diffusers reads them again whenever it
re-installs the hooks itself (``load_lora_weights`` on an offloaded pipeline does). The adapters call
:func:`offload_idle` once the prompts are encoded and once the images are decoded, so the text
encoders are off the device while the denoiser runs, and the VAE is off it from one decode to the
next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: engine.memory reads resident_roles on a driver
    import torch

__all__ = ["DENOISER_ROLES", "enable_offload", "offload_idle", "offloaded_roles", "resident_roles"]

# The components that run at every denoising step: they stay on the device.
DENOISER_ROLES = ("unet", "transformer")


def enable_offload(pipe: Any, device: str | torch.device) -> None:
    """Install diffusers' model offload on ``pipe`` for ``device``, with the denoiser resident there."""
    import torch

    denoisers = [role for role in DENOISER_ROLES if isinstance(getattr(pipe, role, None), torch.nn.Module)]
    if pipe.model_cpu_offload_seq is not None:  # (diffusers refuses a pipeline without one)
        chain = [role for role in pipe.model_cpu_offload_seq.split("->") if role not in denoisers]
        pipe.model_cpu_offload_seq = "->".join(chain)
    pipe._exclude_from_cpu_offload = list(dict.fromkeys([*pipe._exclude_from_cpu_offload, *denoisers]))
    # On a CPU diffusers moves the excluded denoiser to "cpu:0", which copies every tensor (for .to,
    # a tensor on "cpu" is not on "cpu:0"), and the CPU's float kernels depend on where the weights
    # lie (1 ulp in tiny-flux's transformer output): there the tensors are put back where they were.
    on_cpu = torch.device(device).type == "cpu"
    kept = [slot for role in denoisers for slot in _slots(getattr(pipe, role))] if on_cpu else []
    pipe.enable_model_cpu_offload(device=device)
    for slots, name, tensor in kept:
        if isinstance(slots[name], torch.nn.Parameter):
            slots[name].data = tensor
        else:
            slots[name] = tensor


def _slots(module: torch.nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Every parameter's data and every buffer of ``module``, with the dict and name that hold it."""
    import torch

    return [(slots, name, tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
            for part in module.modules() for slots in (part._parameters, part._buffers)
            for name, tensor in slots.items() if tensor is not None]


def offloaded_roles(pipe: Any) -> list[str]:
    """The components of ``pipe`` that carry an offload hook (empty when offload is off)."""
    import torch

    return [role for role, part in pipe.components.items()
            if isinstance(part, torch.nn.Module) and hasattr(part, "_hf_hook")]


def offload_idle(pipe: Any) -> None:
    """Move every offloaded component back to host memory (accelerate's ``offload``: a component
    already there moves nothing); a no-op without ``--offload model``. The denoiser carries no
    hook, so it stays where it is."""
    for hook in getattr(pipe, "_all_hooks", None) or ():
        hook.offload()


def resident_roles(params: Mapping[str, int], denoiser: str, decoder: str) -> tuple[str, ...]:
    """The components that may be on the device at once with ``--offload model``, by role, from
    their parameter counts: the denoiser, and either every text encoder (encoding a negative prompt
    runs the first one again while the second is still there) or the VAE, whichever is larger."""
    encoders = tuple(role for role in params if role not in (denoiser, decoder))
    visitors = encoders if sum(params[role] for role in encoders) >= params[decoder] else (decoder,)
    return (denoiser, *visitors)
