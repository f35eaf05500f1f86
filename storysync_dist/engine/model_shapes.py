"""A model's shapes for the memory estimate (``engine.memory``), from its configs: its components
are built on the ``meta`` device (no weights read, nothing allocated), which gives every parameter
count and every attention layer's channels and heads."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionShape", "ModelShapes", "model_shapes", "model_shapes_from_pipeline"]


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer of the denoiser: its name (a processor-name prefix, as ``share_layers``
    matches), its resolution ``level`` (0: the denoiser's input grid; a UNet's level i runs at
    1/2^i of it), ``channels`` (its input width), ``inner`` (heads x head dim) and ``heads``;
    ``self_attention`` when its keys come from its own tokens."""

    name: str
    level: int
    channels: int
    inner: int
    heads: int
    self_attention: bool


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs of a model, none of it weights.

    ``params``: parameters per component role; ``buffers``: bytes of their buffers. ``denoiser``
    and ``decoder`` name the roles of the UNet/transformer and of the VAE. ``input_width``: the
    channels of the denoiser's first layer (its widest map at the input grid), ``patch``: latent
    pixels per side of one input token (FLUX packs 2x2), ``attention``: every attention layer.
    ``decoder_channels``: the VAE's ``block_out_channels``, ``decoder_upcast``: the pipeline
    decodes in float32 when it is in float16 (SDXL's ``force_upcast`` with ``upcast_vae``);
    ``decoder_spatial_norm``: its norms are spatial (MoVQ).
    """

    params: dict[str, int]
    buffers: dict[str, int]
    denoiser: str
    decoder: str
    input_width: int
    patch: int
    attention: tuple[AttentionShape, ...]
    decoder_channels: tuple[int, ...]
    decoder_upcast: bool
    decoder_spatial_norm: bool = False

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (2 per decoder level after the first)."""
        return 2 ** (len(self.decoder_channels) - 1)


def model_shapes_from_pipeline(pipe: Any) -> ModelShapes:
    """:class:`ModelShapes` of a loaded pipeline (its own modules)."""
    import torch

    modules = {role: m for role, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    return _shapes(modules, upcasts=hasattr(pipe, "upcast_vae"))


@functools.lru_cache(maxsize=8)
def model_shapes(model: str, revision: str | None = None) -> ModelShapes:
    """:class:`ModelShapes` of a preset, a local folder or a cached hub id, from its
    ``model_index.json`` and each component's config, built on the meta device (no weights are
    read, nothing is allocated). ``revision`` only keys the cache (an edited folder is read again).
    ``ValueError`` for a folder whose components cannot be built that way."""
    import diffusers

    from ..models.info import meta_components, model_folder

    folder = pathlib.Path(model_folder(model))
    index = json.loads((folder / "model_index.json").read_text())
    modules = meta_components(str(folder), revision)
    return _shapes(modules, upcasts=hasattr(getattr(diffusers, str(index.get("_class_name")), None), "upcast_vae"))


def _shapes(modules: dict[str, Any], *, upcasts: bool) -> ModelShapes:
    """``upcasts``: the pipeline class decodes a half-precision VAE in float32 when its config says
    ``force_upcast`` (``upcast_vae``: SDXL's pipelines; SD 1.x, FLUX and Kandinsky 3 do not)."""
    decoder = next((r for r, m in modules.items() if hasattr(m, "decode") and hasattr(m.config, "block_out_channels")),
                   None)
    denoiser = next((r for r, m in modules.items() if r != decoder and hasattr(m, "attn_processors")), None)
    if decoder is None or denoiser is None:
        raise ValueError(f"no denoiser and VAE among the components {sorted(modules)}")
    den, vae = modules[denoiser], modules[decoder]
    latent_channels = int(vae.config.latent_channels)
    in_channels = int(den.config.in_channels)
    return ModelShapes(
        params={r: sum(p.numel() for p in m.parameters()) for r, m in modules.items()},
        buffers={r: sum(b.numel() * b.element_size() for b in m.buffers()) for r, m in modules.items()},
        denoiser=denoiser, decoder=decoder,
        input_width=_input_width(den, in_channels),
        patch=max(1, math.isqrt(max(1, in_channels // latent_channels))),
        attention=_attention_layers(den),
        decoder_channels=tuple(int(c) for c in vae.config.block_out_channels),
        decoder_upcast=upcasts and bool(getattr(vae.config, "force_upcast", False)),
        decoder_spatial_norm=getattr(vae.config, "norm_type", None) == "spatial",
    )


def _input_width(denoiser: Any, in_channels: int) -> int:
    """Channels of the denoiser's first layer that reads the latent (a UNet's ``conv_in``, a
    transformer's patch embedding)."""
    import torch

    for module in denoiser.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == in_channels:
            return int(module.out_channels)
        if isinstance(module, torch.nn.Linear) and module.in_features == in_channels:
            return int(module.out_features)
    raise ValueError(f"{type(denoiser).__name__}: no layer reads its {in_channels} input channels")


def _attention_layers(denoiser: Any) -> tuple[AttentionShape, ...]:
    """Every attention layer of the denoiser with its resolution level.

    The levels follow diffusers' UNet layout (``UNet2DConditionModel``, ``Kandinsky3UNet``):
    ``down_blocks.i`` runs at level i, ``up_blocks.j`` at level L-1-j and ``mid_block`` at L-1 (L
    levels); a denoiser without ``down_blocks`` (a transformer) runs every layer at level 0. A layer
    is a self-attention when diffusers marks it so (``is_cross_attention`` False); in a model that
    marks every layer cross (Kandinsky 3 builds its self-attentions with its own width as the
    context), when its keys are as wide as its queries, which also takes a cross-attention whose
    text is exactly as wide (only in the tiny preset: 32 channels).
    """
    levels = len(getattr(denoiser, "down_blocks", ())) or 1
    modules = {}
    for name in denoiser.attn_processors:
        path = name.removesuffix(".processor")
        attn = denoiser.get_submodule(path)
        if getattr(attn, "to_q", None) is not None and getattr(attn, "to_k", None) is not None:
            modules[path] = attn
    flags = any(not getattr(a, "is_cross_attention", False) for a in modules.values())
    return tuple(
        AttentionShape(
            name=path, level=_level(path, levels), channels=int(a.to_q.in_features), inner=int(a.to_q.out_features),
            heads=int(getattr(a, "heads", 1)),
            self_attention=(not getattr(a, "is_cross_attention", False)) if flags
            else int(a.to_k.in_features) == int(a.to_q.in_features),
        )
        for path, a in modules.items()
    )


def _level(path: str, levels: int) -> int:
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", path)
    if match:
        i = int(match.group(2))
        return min(i, levels - 1) if match.group(1) == "down_blocks" else max(0, levels - 1 - i)
    return levels - 1 if path.startswith("mid_block.") else 0
