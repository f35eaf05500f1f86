"""What a driver needs to know about a model without loading its weights: the tokenizer (to
validate prompts) and the size factor (to validate height and width).

A Ray driver runs on the head node, often without a GPU; loading a whole SDXL pipeline there just
to tokenize prompts would cost minutes and gigabytes, so it reads the folder's configs instead.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

from .loading import cached_snapshot, check_model_index, looks_like_hub_id
from .presets import PRESETS, UnknownModelError, preset_path

_INFO_FILES = ["model_index.json", "tokenizer/*", "unet/config.json", "vae/config.json"]


@dataclass(frozen=True)
class ModelInfo:
    """The tokenizer of the first text encoder and the pixel multiple height/width must have."""

    tokenizer: Any
    size_factor: int


def size_factor_from_configs(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> int:
    """VAE scale factor times one factor of 2 per UNet downsampling (all down blocks but the last)."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return vae_scale * 2 ** (len(unet_config["down_block_types"]) - 1)


def model_folder(model: str) -> pathlib.Path:
    """The local folder of a preset, a local pipeline folder, or a hub id's cached snapshot.

    Never touches the network: a hub id must already be in the Hugging Face cache. A local folder
    or snapshot whose ``model_index.json`` names custom code is refused here too
    (``check_model_index``), so a driver stops before any worker starts. ``UnknownModelError``
    (one line) for every problem.
    """
    if model in PRESETS:
        return preset_path(model)
    if os.path.isdir(os.path.expanduser(model)):
        folder = pathlib.Path(os.path.expanduser(model))
        check_model_index(folder)
        return folder
    if looks_like_hub_id(model):
        folder = cached_snapshot(model, allow_patterns=_INFO_FILES)
        check_model_index(folder)
        return folder
    raise UnknownModelError(
        f"unknown model or preset {model!r}: not a local folder, not a hub id, and not one of the presets: "
        + ", ".join(sorted(PRESETS))
    )


def load_model_info(model: str) -> ModelInfo:
    """Tokenizer and size factor of ``model`` from its folder's files (no weights are read)."""
    from transformers import CLIPTokenizer

    folder = model_folder(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise UnknownModelError(f"{model!r} is not a diffusers UNet pipeline folder: {exc}") from None
    return ModelInfo(tokenizer=tokenizer, size_factor=size_factor_from_configs(unet, vae))
