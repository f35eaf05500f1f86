"""Train the toyworld model from scratch (issue 21): a diffusers ``StableDiffusionPipeline`` small
enough to train on a CPU, on pictures ``storysync_dist.toyworld.world`` draws.

Two stages, each seeded and resumable from its last checkpoint (``--out``/checkpoints/):

1. **vae**: an ``AutoencoderKL`` with a scale factor of 4 (64 px pictures, 16 x 16 x 4 latents),
   reconstruction (L1 + MSE, object pixels weighted ``OBJECT_WEIGHT`` times) plus a small KL term; its latents' standard deviation sets
   ``scaling_factor``.
2. **unet**: a ``UNet2DConditionModel`` (attention at 16 x 16 only, see ``UNET_CONFIG``) and a small
   ``CLIPTextModel`` trained together from scratch on epsilon prediction, the text dropped 10 %
   of the time (classifier-free guidance), with an EMA of the UNet's weights.

The data mix (``MIX``) is what the world needs the model to learn: single objects, pairs and trios
of distinct classes bound to places (so a noun's cross-attention finds its object), and groups of
identical instances with an unnamed identity (so self-attention learns to copy appearance).

    python train/train_toyworld.py --out out/toyworld-train --stage vae --steps 1000
    python train/train_toyworld.py --out out/toyworld-train --stage unet --steps 40000
    python train/train_toyworld.py --out out/toyworld-train --export models/toyworld

``--export`` writes the pipeline folder (``save_pretrained``, safetensors, fp16 weights) from the
EMA weights. Every stage appends its steps, seconds and machine to ``<out>/log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from storysync_dist.toyworld.world import SIZE, random_scene, render

OBJECT_WEIGHT = 10.0  # the VAE's reconstruction weight of object pixels against the background's
MIX = {"single": 0.3, "pair": 0.2, "trio": 0.15, "group": 0.35}
SEED = 20261205

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": SIZE,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16,
}
# Attention (self and text) only at 16 x 16, in the first encoder level and the last decoder
# level; the 8 x 8 and 4 x 4 levels and the mid block are convolutions. StorySync's current-step
# masks average the lowest-resolution maps that run before the first shared layer: with text
# attention at 8 x 8 or in the mid block (4 x 4) a subject mask would be 2 x 2 cells of an object
# 14 pixels wide, and no IoU with the true object could reach the instrument's 0.5.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIZE // 4, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [64, 128, 128], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"], "mid_block_type": "UNetMidBlock2D",
    "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 16,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
    "layer_norm_eps": 1e-5, "projection_dim": 64,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
}


def batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``size`` training pictures in [-1, 1] (``(B, 3, 64, 64)``), their prompts, and where their
    objects are (``(B, 1, 64, 64)``, 1.0 on every object's pixels)."""
    from storysync_dist.toyworld.world import prompt_of

    kinds, weights = tuple(MIX), tuple(MIX.values())
    scenes = [random_scene(rng, kinds, weights) for _ in range(size)]
    drawn = [render(scene) for scene in scenes]
    images = np.stack([image for image, _ in drawn]).astype(np.float32) / 127.5 - 1.0
    objects = np.stack([np.any(masks, axis=0) for _, masks in drawn]).astype(np.float32)[:, None]
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [prompt_of(scene) for scene in scenes],
            torch.from_numpy(objects))


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _log(out: pathlib.Path, entry: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps({**entry, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print(json.dumps(entry), flush=True)


def _save(path: pathlib.Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """A checkpoint: safetensors for the weights and optimizer moments, JSON for the rest (never a
    pickle), each written then renamed so a kill mid-write keeps the previous one."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / "weights.tmp"))
    (path / "state.tmp").write_text(json.dumps(state))
    os.replace(path / "weights.tmp", path / "weights.safetensors")
    os.replace(path / "state.tmp", path / "state.json")


def _load(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    if not (path / "state.json").exists():
        return None
    return load_file(str(path / "weights.safetensors")), json.loads((path / "state.json").read_text())


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{names[id(param)]}.{key}"] = value
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor]) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                     if key.startswith(f"optim.{names[id(param)]}.")}
            if state:
                state["step"] = state["step"].clone() if "step" in state else torch.tensor(0.0)
                optimizer.state[param] = state


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(**VAE_CONFIG)


def build_text_and_unet() -> tuple[Any, Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from storysync_dist.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

    torch.manual_seed(SEED + 1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return build_clip_tokenizer(), text, unet


def train_vae(out: pathlib.Path, steps: int, batch_size: int, save_every: int) -> None:
    vae = build_vae()
    params = {id(p): n for n, p in vae.named_parameters()}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    where = out / "checkpoints" / "vae"
    start, seconds, rng = 0, 0.0, np.random.default_rng(SEED)
    loaded = _load(where)
    if loaded is not None:
        tensors, state = loaded
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(optimizer, params, tensors)
        start, seconds = state["step"], state["seconds"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    vae.train()
    began = time.perf_counter()
    for step in range(start, steps):
        images, _, objects = batch(rng, batch_size)
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        # The objects are a tenth of the picture and all of the identity: their pixels (and a pixel
        # around them) weigh OBJECT_WEIGHT times the background's. Unweighted, a VAE at 700 steps
        # washed the colours out (docs/quality.md).
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.nn.functional.max_pool2d(objects, 3, 1, 1)
        error = decoded - images
        recon = ((error.abs() + error**2) * weight).mean() / weight.mean()
        loss = recon + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"vae step {step + 1}: recon {recon.item():.4f}", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            elapsed = seconds + time.perf_counter() - began
            _save(where, {**{f"model.{k}": v for k, v in vae.state_dict().items()}, **_optimizer_tensors(optimizer, params)},
                  {"step": step + 1, "seconds": elapsed, "rng": rng.bit_generator.state,
                   "torch_rng": torch.get_rng_state().tolist(), "recon": recon.item()})
            _log(out, {"stage": "vae", "step": step + 1, "seconds": round(elapsed, 1), "recon": round(recon.item(), 5)})


def _trained_vae(out: pathlib.Path) -> Any:
    loaded = _load(out / "checkpoints" / "vae")
    if loaded is None:
        raise SystemExit(f"{out}: train the vae stage first (--stage vae)")
    vae = build_vae()
    vae.load_state_dict({k[6:]: v for k, v in loaded[0].items() if k.startswith("model.")})
    vae.eval().requires_grad_(False)
    return vae


def check_vae(out: pathlib.Path, scenes: int = 120, seed: int = SEED + 4) -> dict[str, Any]:
    """Read the VAE's reconstructions of ``scenes`` fresh scenes with the oracle, against the
    scenes' truth: how many scenes have an object misread (class, place) and how many identity
    attributes (colour, pattern, accessory of each object) are wrong. A model cannot draw better
    than its VAE decodes, so this bounds the instrument from below."""
    from storysync_dist.toyworld.oracle import read_image

    vae = _trained_vae(out)
    rng = np.random.default_rng(seed)
    from storysync_dist.toyworld.world import random_scene, render

    truth = [random_scene(rng) for _ in range(scenes)]
    images = torch.from_numpy(np.stack([render(s)[0] for s in truth]).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(chunk.permute(0, 3, 1, 2)).latent_dist.mode()).sample
                             for chunk in images.split(32)])
    pixels = ((decoded.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    scenes_wrong = backgrounds_wrong = attributes = attributes_wrong = 0
    for scene, image in zip(truth, pixels):
        reading = read_image(image)
        backgrounds_wrong += reading.background != scene.background
        seen = {(o.cls, o.place): o.identity for o in reading.objects}
        wanted = {(o.cls, o.place): o.identity for o in scene.objects}
        scenes_wrong += sorted(seen) != sorted(wanted)
        for key, identity in wanted.items():
            got = seen.get(key)
            for attr in ("colour", "pattern", "accessory"):
                attributes += 1
                attributes_wrong += got is None or getattr(got, attr) != getattr(identity, attr)
    state = _load(out / "checkpoints" / "vae")[1]
    report = {"stage": "check-vae", "vae_step": state["step"], "scenes": scenes, "scenes_misread": scenes_wrong,
              "backgrounds_misread": backgrounds_wrong, "attributes": attributes, "attributes_misread": attributes_wrong}
    _log(out, report)
    return report


def latent_scale(vae: Any, rng: np.random.Generator, batches: int = 8) -> float:
    """1 / the standard deviation of the VAE's latents over fresh pictures (SD's scaling_factor)."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch(rng, 32)[0]).latent_dist.mean for _ in range(batches)])
    return float(1.0 / latents.std())


def train_unet(out: pathlib.Path, steps: int, batch_size: int, save_every: int, lr: float = 3e-4) -> None:
    from diffusers import DDPMScheduler

    vae = _trained_vae(out)
    tokenizer, text, unet = build_text_and_unet()
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")})
    models = {"unet": unet, "text": text}
    params = {id(p): f"{m}.{n}" for m, model in models.items() for n, p in model.named_parameters()}
    trainable = [p for model in models.values() for p in model.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-2)
    ema = {n: p.detach().clone() for n, p in unet.named_parameters()}
    where = out / "checkpoints" / "unet"
    rng = np.random.default_rng(SEED + 2)
    start, seconds = 0, 0.0
    scale = latent_scale(vae, np.random.default_rng(SEED + 3))
    loaded = _load(where)
    if loaded is not None:
        tensors, state = loaded
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
        ema = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
        _restore_optimizer(optimizer, params, tensors)
        start, seconds, scale = state["step"], state["seconds"], state["scale"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    unet.train()
    text.train()
    began = time.perf_counter()
    losses: list[float] = []
    for step in range(start, steps):
        for group in optimizer.param_groups:  # linear warm-up over the first 500 steps
            group["lr"] = lr * min(1.0, (step + 1) / 500)
        images, prompts, _ = batch(rng, batch_size)
        prompts = [p if rng.random() >= 0.1 else "" for p in prompts]  # unconditional, for guidance
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * scale
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for name, param in unet.named_parameters():
                ema[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"unet step {step + 1}: loss {np.mean(losses[-50:]):.4f}", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            elapsed = seconds + time.perf_counter() - began
            tensors = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                       **{f"text.{k}": v for k, v in text.state_dict().items()},
                       **{f"ema.{k}": v for k, v in ema.items()}, **_optimizer_tensors(optimizer, params)}
            _save(where, tensors, {"step": step + 1, "seconds": elapsed, "scale": scale, "rng": rng.bit_generator.state,
                                   "torch_rng": torch.get_rng_state().tolist(), "loss": float(np.mean(losses[-50:]))})
            _log(out, {"stage": "unet", "step": step + 1, "seconds": round(elapsed, 1),
                       "loss": round(float(np.mean(losses[-save_every:])), 5)})


def export(out: pathlib.Path, folder: pathlib.Path) -> None:
    """The pipeline folder from the last checkpoints: the UNet's EMA weights, fp16 safetensors."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae = _trained_vae(out)
    loaded = _load(out / "checkpoints" / "unet")
    if loaded is None:
        raise SystemExit(f"{out}: train the unet stage first (--stage unet)")
    tensors, state = loaded
    tokenizer, text, unet = build_text_and_unet()
    unet.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    vae.register_to_config(scaling_factor=state["scale"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _log(out, {"stage": "export", "folder": str(folder), "unet_step": state["step"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--stage", choices=["vae", "unet"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--export", type=pathlib.Path, help="write the pipeline folder here from the checkpoints")
    parser.add_argument("--check-vae", action="store_true",
                        help="read the VAE's reconstructions of fresh scenes with the oracle (log.jsonl)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    # Gradients on whatever the caller's mode (the render path turns them off process-wide).
    with torch.enable_grad():
        if args.stage == "vae":
            train_vae(args.out, args.steps, args.batch_size, args.save_every)
        elif args.stage == "unet":
            train_unet(args.out, args.steps, args.batch_size, args.save_every)
    if args.check_vae:
        check_vae(args.out)
    if args.export is not None:
        export(args.out, args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
