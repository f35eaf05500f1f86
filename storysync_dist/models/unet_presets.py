"""The UNet family's offline presets: `tiny-sd` and `tiny-sdxl` (the real pipeline classes with tiny
configs and seeded random weights), `toyworld` (the trained quality instrument) and `random-sdxl` (SDXL base
1.0's full architecture with random weights, built in memory, for benchmarks). What a preset is and how
it is built is `preset_build.py`; the table of every family's presets and their cache, `presets.py`."""

from __future__ import annotations

import pathlib
from typing import Any

from diffusers import (
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from .preset_build import COMMON_BUILDERS, Preset
from .tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

# SD's and SDXL's components: a UNet, a VAE, CLIP text encoders (SDXL's second with a projection).
_BUILDERS = {
    **COMMON_BUILDERS,
    "unet": lambda cfg: UNet2DConditionModel(**cfg),
    "text_encoder_2": lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    "tokenizer_2": lambda cfg: build_clip_tokenizer(**cfg),
}

# ----------------------------------------------------------------------------------------------- configs

# Four VAE levels so vae_scale_factor == 8 as in every real SD/SDXL checkpoint; channels stay tiny because
# the decoder's last level runs at full image resolution and dominates CPU render time.
_VAE_BASE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "sample_size": 256,
}

# Cross-attention at two resolutions in both encoder and decoder, mirroring SD/SDXL's layout (the
# highest-resolution level has no attention in SDXL; kept that way here because it is also the slowest).
_UNET_BASE: dict[str, Any] = {
    "sample_size": 32,  # latent size: pipelines default to 32 * 8 = 256 px
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}

_TEXT_BASE: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": CLIP_MAX_LENGTH,
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5, "projection_dim": 32,
    # Same special ids as the real CLIP configs, so pooling finds the <|endoftext|> position.
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}

# The schedulers are SD 1.5's and SDXL base's scheduler_config.json, minus keys the class does not take.
_SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
}

_SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
    "use_karras_sigmas": False, "timestep_spacing": "leading", "steps_offset": 1,
}

_SDXL_TIME_EMBED_DIM = 8


def _sd_components() -> dict[str, dict[str, Any]]:
    text = {**_TEXT_BASE, "hidden_act": "quick_gelu"}  # CLIP ViT-L/14, as in SD 1.x
    return {
        "unet": {**_UNET_BASE, "cross_attention_dim": text["hidden_size"], "attention_head_dim": 4},
        "vae": {**_VAE_BASE, "scaling_factor": 0.18215},
        "text_encoder": text,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "scheduler": dict(_SD15_SCHEDULER),
    }


def _sdxl_components() -> dict[str, dict[str, Any]]:
    text = {**_TEXT_BASE, "hidden_act": "quick_gelu"}  # CLIP ViT-L/14
    text_2 = {**_TEXT_BASE, "hidden_act": "gelu"}  # OpenCLIP bigG uses plain gelu
    return {
        "unet": {
            **_UNET_BASE,
            # SDXL concatenates both encoders' hidden states for cross-attention...
            "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 1, 2],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
            # ...and conditions on 6 micro-conditioning ints plus encoder 2's pooled projection.
            "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + text_2["projection_dim"],
        },
        "vae": {**_VAE_BASE, "scaling_factor": 0.13025},
        "text_encoder": text,
        "text_encoder_2": text_2,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},  # real SDXL's tokenizer_2 pads with "!" (id 0)
        "scheduler": dict(_SDXL_SCHEDULER),
    }


# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): unet/config.json, every key the class takes
# (its 2,567,463,684 parameters are checked in tests/test_presets.py).
_SDXL_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + text_encoder_2's 1280
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

# SDXL base 1.0's vae/config.json.
_SDXL_BASE_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _sdxl_base_components() -> dict[str, dict[str, Any]]:
    # The special token ids stay those of _TEXT_BASE (the tokenizer's real ids); the hub configs'
    # legacy ids (bos 0, eos 2) make transformers pool at the same <|endoftext|> position.
    text = {  # CLIP ViT-L/14 text tower
        **_TEXT_BASE, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
    }
    text_2 = {  # OpenCLIP ViT-bigG/14 text tower
        **_TEXT_BASE, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
        "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
    }
    return {
        "unet": dict(_SDXL_BASE_UNET),
        "vae": dict(_SDXL_BASE_VAE),
        "text_encoder": text,
        "text_encoder_2": text_2,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": dict(_SDXL_SCHEDULER),
    }


def _toyworld_folder() -> pathlib.Path:
    from ..toyworld import model_folder

    return model_folder()


UNET_PRESETS: dict[str, Preset] = {
    "tiny-sd": Preset(
        name="tiny-sd",
        pipeline_class=StableDiffusionPipeline,
        scheduler_class=PNDMScheduler,
        components=_sd_components(),
        pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
        builders=_BUILDERS,
    ),
    "tiny-sdxl": Preset(
        name="tiny-sdxl",
        pipeline_class=StableDiffusionXLPipeline,
        scheduler_class=EulerDiscreteScheduler,
        components=_sdxl_components(),
        pipeline_kwargs={"image_encoder": None, "feature_extractor": None},
        builders=_BUILDERS,
    ),
    # For benchmarks: SDXL base 1.0's architecture and compute (UNet 2.57B, VAE, CLIP ViT-L and
    # OpenCLIP bigG text towers, 3.47B parameters), seeded random weights, so its pictures are noise.
    # Built in memory by load_pipeline (see Preset.build_in_memory); never saved with weights.
    "random-sdxl": Preset(
        name="random-sdxl",
        pipeline_class=StableDiffusionXLPipeline,
        scheduler_class=EulerDiscreteScheduler,
        components=_sdxl_base_components(),
        pipeline_kwargs={"image_encoder": None, "feature_extractor": None},
        in_memory=True,
        builders=_BUILDERS,
    ),
    # The quality instrument (issue 21): a small StableDiffusionPipeline trained on toyworld's
    # pictures, shipped as a folder (``toyworld.model_folder``); loaded like any local folder.
    "toyworld": Preset(
        name="toyworld",
        pipeline_class=StableDiffusionPipeline,
        scheduler_class=PNDMScheduler,
        components={},
        folder=_toyworld_folder,
    ),
}
