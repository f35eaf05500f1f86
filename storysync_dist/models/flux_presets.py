"""Offline FLUX presets: ``tiny-flux`` (a schnell-like FluxPipeline with tiny configs and seeded
random weights, saved and reloaded with ``from_pretrained``) and ``random-flux`` (the full FLUX.1-dev
architecture, 11.9B transformer parameters, built in memory on the meta device by
``Preset.build_in_memory``; for benchmarks only, never saved with weights)."""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import T5Config, T5EncoderModel

from .preset_build import COMMON_BUILDERS, Preset
from .tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_t5_tokenizer, t5_vocab_size

# FLUX's components: a transformer, a VAE, CLIP's text encoder and T5's.
_BUILDERS = {
    **COMMON_BUILDERS,
    "transformer": lambda cfg: FluxTransformer2DModel(**cfg),
    "text_encoder_2": lambda cfg: T5EncoderModel(T5Config(**cfg)),
    "tokenizer_2": lambda cfg: build_t5_tokenizer(**cfg),
}

# FLUX.1-schnell's and FLUX.1-dev's scheduler/scheduler_config.json.
_SCHNELL_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
}
_DEV_SCHEDULER: dict[str, Any] = {**_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}

# T5 vocabulary: at least the offline tokenizer's pieces, rounded up to a multiple of 128 as T5's 32,128.
_T5_VOCAB = max(32128, -(-t5_vocab_size() // 128) * 128)

_CLIP = {
    "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": CLIP_MAX_LENGTH, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}


def _tiny_components() -> dict[str, dict[str, Any]]:
    clip = {**_CLIP, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "projection_dim": 32}
    t5 = {"vocab_size": _T5_VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
          "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False,
          "pad_token_id": 0, "eos_token_id": 1}
    return {
        "transformer": {
            "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": t5["d_model"],
            "pooled_projection_dim": clip["hidden_size"],  # CLIPTextModel's pooler_output
            "guidance_embeds": False, "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
        },
        "vae": {  # four levels: vae_scale_factor 8, 16 latent channels, FLUX's scaling/shift
            "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 16, 16],
            "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 8, "sample_size": 256,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text_encoder": clip,
        "text_encoder_2": t5,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"model_max_length": 512},
        "scheduler": dict(_SCHNELL_SCHEDULER),
    }


def _flux_dev_components() -> dict[str, dict[str, Any]]:
    """FLUX.1-dev's transformer, vae, text encoders (CLIP ViT-L/14, T5 v1.1 XXL) configs."""
    clip = {**_CLIP, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "projection_dim": 768}
    t5 = {"vocab_size": _T5_VOCAB, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1,
          "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
    return {
        "transformer": {
            "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
        },
        "vae": {
            "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True,
        },
        "text_encoder": clip,
        "text_encoder_2": t5,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"model_max_length": 512},
        "scheduler": dict(_DEV_SCHEDULER),
    }


_PIPELINE_KWARGS = {"image_encoder": None, "feature_extractor": None}

FLUX_PRESETS: dict[str, Preset] = {
    # Schnell-like (no guidance embedding, static shift), so the CPU tests run 2-4 steps as schnell does.
    "tiny-flux": Preset(
        name="tiny-flux", pipeline_class=FluxPipeline, scheduler_class=FlowMatchEulerDiscreteScheduler,
        components=_tiny_components(), pipeline_kwargs=_PIPELINE_KWARGS, builders=_BUILDERS,
    ),
    "random-flux": Preset(
        name="random-flux", pipeline_class=FluxPipeline, scheduler_class=FlowMatchEulerDiscreteScheduler,
        components=_flux_dev_components(), pipeline_kwargs=_PIPELINE_KWARGS, builders=_BUILDERS, in_memory=True,
    ),
}
