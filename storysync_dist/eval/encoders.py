"""The networks behind the consistency metrics of ``storysync eval`` (issue 11), loaded offline.

* **CLIP-T** (prompt adherence) and **CLIP-I** (subject similarity): cosine similarity of CLIP
  embeddings (Radford et al. 2021), image–text per frame and image–image per pair of frames, as
  DreamBooth (Ruiz et al. 2023) and ConsiStory (Tewel et al. 2024) report them; ViT-L/14.
* **DINO**: cosine similarity of self-supervised DINO ViT-S/16 embeddings (Caron et al. 2021), the
  CLS token of the last layer, as DreamBooth's DINO metric. Higher is better for these three.
* **LPIPS** (Zhang et al. 2018, Eq. 1): ``d(x, y) = Σ_l 1/(H_l W_l) Σ_hw ‖w_l ⊙ (ŷ_hw^l − x̂_hw^l)‖²``
  with ``x̂^l`` AlexNet's layer-l activations unit-normalised over channels and ``w_l ≥ 0`` a learned
  per-channel weight; inputs in [-1, 1] at a fixed size. Lower is better.
* **DreamSim** (Fu et al. 2023): ``1 − cos`` of ViT embeddings fine-tuned on human similarity
  judgements (NIGHTS). Lower is better.
* **oracle** (toyworld renders only, ``eval/oracle.py``): the quality instrument's metric
  (docs/quality.md), read by ``toyworld.oracle`` from the pictures with the world's own palette and
  shapes. No network and no weights: loading it loads nothing. Not in the default set.

``METRICS`` is the default set (every encoder metric); ``ALL_METRICS`` the names ``--metrics``
accepts (``METRICS`` and ``oracle``).

Subject metrics run on background-removed frames (see ``background.py``); the per-story reduction
over frame pairs is ``pairwise.py``. Preprocessing is explicit (PIL bicubic resize, centre crop,
mean/std normalisation; no torchvision). Models load with ``from_pretrained(path,
local_files_only=True)`` (never remote code, never a download) from a weights folder ``DIR``:

    DIR/clip/          transformers CLIPModel folder (``save_pretrained`` of openai/clip-vit-large-patch14;
                       tokenizer files optional, else the offline CLIP tokenizer is used)
    DIR/dino/          transformers ViTModel folder (``save_pretrained`` of facebook/dino-vits16)
    DIR/lpips/lpips_alex.safetensors   see :class:`LPIPSNetwork` for the tensor names and conversion
    DIR/dreamsim/      transformers ViTModel folder holding DreamSim's single-branch ``dino_vitb16``
                       model with its LoRA merged (peft ``merge_and_unload``) and its timm keys mapped to
                       transformers' ViT names (as transformers' ``convert_dino_to_pytorch.py`` does)
    DIR/rembg/u2net.onnx               rembg's U²-Net background model

Without ``DIR``, CLIP and DINO are looked up in the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``)
under their hub ids, offline. ``random-tiny`` builds tiny random models from configs (fixed seeds) to
check the plumbing; their scores mean nothing and are flagged ``plumbing_check``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import MissingWeightsError, StorySyncUserError, one_line
from .background import RANDOM_TINY_DESCRIPTION, BackgroundRemover, find_u2net, load_background_remover

__all__ = [
    "ALL_METRICS", "HIGHER_IS_BETTER", "METRICS", "ORACLE", "ORACLE_WEIGHTS", "SUBJECT_METRICS", "Encoders",
    "LPIPSNetwork", "MissingWeightsError",
    "dreamsim_distance", "load_encoders", "validate_metrics",
]

METRICS = ("clip-t", "clip-i", "dino", "lpips", "dreamsim")  # the default: every encoder metric
ORACLE = "oracle"  # toyworld's oracle (no weights); only when asked for
ALL_METRICS = (*METRICS, ORACLE)
# What the oracle "uses" in the weights record (and so in every story's digest): bump the version
# when toyworld.oracle reads pictures differently, so that a rerun scores the stories again.
ORACLE_WEIGHTS = "toyworld oracle v1 (storysync_dist.toyworld.oracle; no weights)"
SUBJECT_METRICS = ("clip-i", "dino", "lpips", "dreamsim")  # computed on background-removed frames
HIGHER_IS_BETTER = {"clip-t": True, "clip-i": True, "dino": True, "lpips": False, "dreamsim": False}
HUB_IDS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dino-vits16"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANDOM_TINY = "random-tiny"
RANDOM_TINY_SEED = 0
LPIPS_FILE = "lpips/lpips_alex.safetensors"
_HOW = "pass --weights DIR (layout in docs/evaluation.md), or --encoders random-tiny for a plumbing check"


def validate_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The requested metric names, in :data:`ALL_METRICS` order; unknown names are a user error."""
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown or not metrics:
        raise StorySyncUserError(f"--metrics: unknown or empty {unknown or list(metrics)} "
                                 f"(choose from {', '.join(ALL_METRICS)})")
    return tuple(m for m in ALL_METRICS if m in metrics)


def _pixels(images: Sequence[Image.Image], size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
            *, crop: bool) -> torch.Tensor:
    """(F, 3, size, size) float32: bicubic resize (shorter side to ``size`` then centre crop when
    ``crop``, else straight to size × size), scaled to [0, 1] and normalised, or to [-1, 1] without mean."""
    out = []
    for image in images:
        image = image.convert("RGB")
        if crop:
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
    x = torch.stack(out)
    if mean is None or std is None:
        return x * 2.0 - 1.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class LPIPSNetwork(nn.Module):
    """LPIPS-Alex: AlexNet's five ReLU outputs and LPIPS's five non-negative linear heads.

    Tensor names of ``lpips_alex.safetensors`` (float32): ``features.{0,3,6,8,10}.{weight,bias}`` exactly
    as torchvision's ``alexnet(weights="IMAGENET1K_V1").features`` state dict (conv1..conv5), and
    ``lin{0..4}.weight`` of shape (1, C_l, 1, 1), renamed from the ``lin{k}.model.1.weight`` entries of
    the lpips package's ``weights/v0.1/alex.pth``. Conversion, on a machine with torchvision::

        feats = torchvision.models.alexnet(weights="IMAGENET1K_V1").features.state_dict()
        heads = torch.load("lpips/weights/v0.1/alex.pth", map_location="cpu")  # lin{k}.model.1.weight
        sd = {f"features.{k}": v for k, v in feats.items()} | {k.replace(".model.1", ""): v for k, v in heads.items()}
        safetensors.torch.save_file(sd, "DIR/lpips/lpips_alex.safetensors")
    """

    SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # LPIPS's ScalingLayer
    TAPS = (1, 4, 7, 9, 11)  # relu1..relu5 in torchvision's alexnet.features

    def __init__(self, channels: Sequence[int] = (64, 192, 384, 256, 256)) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(),
        )
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)

    def heads(self) -> list[torch.Tensor]:
        """The five per-channel weights w_l, each (C_l,)."""
        return [getattr(self, f"lin{k}").weight.flatten() for k in range(5)]

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, S, S) in [-1, 1] → the five (N, C_l, H_l, W_l) ReLU activations (not normalised)."""
        h, taps = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                taps.append(h)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair: (N, 3, S, S) × 2 in [-1, 1] → (N,)."""
        total = torch.zeros(a.shape[0], device=a.device)
        for k, (fa, fb) in enumerate(zip(self.layer_features(a), self.layer_features(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def dreamsim_distance(a_emb: torch.Tensor, b_emb: torch.Tensor) -> float:
    """DreamSim's distance of two (D,) embeddings: 1 − cos, in [0, 2]."""
    return float(1.0 - F.cosine_similarity(a_emb.double(), b_emb.double(), dim=-1))


@dataclass
class Encoders:
    """The loaded networks of the requested metrics. Image inputs are PIL images; outputs are on CPU."""

    metrics: tuple[str, ...]
    plumbing_check: bool
    weights: dict[str, str]  # metric or "background" -> the folder/file used, or the random-tiny label
    device: str = "cpu"
    clip: Any = None  # transformers CLIPModel
    tokenizer: Any = None
    dino: Any = None  # transformers ViTModel
    lpips: LPIPSNetwork | None = None
    dreamsim: Any = None  # transformers ViTModel
    lpips_size: int = 224
    remover: BackgroundRemover | None = field(default=None, repr=False)

    def _need(self, model: Any, what: str) -> Any:
        if model is None:
            raise ValueError(f"{what} was not loaded: pass it in load_encoders(metrics=...)")
        return model

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(F, D) CLIP text embeddings (text tower, projected), one per prompt."""
        clip = self._need(self.clip, "clip-t")
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = clip.text_model(input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        return clip.text_projection(out.pooler_output).float().cpu()

    @torch.inference_mode()
    def clip_image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(F, D) CLIP image embeddings (image tower, projected)."""
        clip = self._need(self.clip, "clip-i or clip-t")
        x = _pixels(images, clip.config.vision_config.image_size, CLIP_MEAN, CLIP_STD, crop=True)
        out = clip.vision_model(pixel_values=x.to(self.device))
        return clip.visual_projection(out.pooler_output).float().cpu()

    @torch.inference_mode()
    def dino_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(F, D) DINO embeddings: the last layer's CLS token (after the final layer norm)."""
        dino = self._need(self.dino, "dino")
        x = _pixels(images, dino.config.image_size, IMAGENET_MEAN, IMAGENET_STD, crop=True)
        return dino(pixel_values=x.to(self.device)).last_hidden_state[:, 0].float().cpu()

    def lpips_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(F, 3, S, S) LPIPS inputs: resized to S × S (64 tiny, 224 real), scaled to [-1, 1]."""
        return _pixels(images, self.lpips_size, None, None, crop=False)

    @torch.inference_mode()
    def lpips_distance_pixels(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """LPIPS of two (3, S, S) inputs from :meth:`lpips_pixels`."""
        net = self._need(self.lpips, "lpips")
        return float(net(a[None].to(self.device), b[None].to(self.device))[0])

    def lpips_distance(self, a: Image.Image, b: Image.Image) -> float:
        """LPIPS of two images (≥ 0; 0 for identical images)."""
        x = self.lpips_pixels([a, b])
        return self.lpips_distance_pixels(x[0], x[1])

    @torch.inference_mode()
    def dreamsim_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(F, D) DreamSim embeddings: the ViT's last-layer CLS token, images resized to its size (224)."""
        model = self._need(self.dreamsim, "dreamsim")
        x = _pixels(images, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD, crop=False)
        return model(pixel_values=x.to(self.device)).last_hidden_state[:, 0].float().cpu()


def _model_of(metric: str) -> str:
    return "clip" if metric.startswith("clip") else metric


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _random_tiny(wanted: set[str], enc: Encoders) -> None:
    """Tiny random models from configs, each under its own fixed seed (the same in every process)."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from ..models.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vit = ViTConfig(image_size=32, patch_size=8, **tiny)
    if "clip" in wanted:
        text = dict(tiny, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=49407)
        config = CLIPConfig(text_config=text, vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=16)
        enc.clip, enc.tokenizer = _seeded(RANDOM_TINY_SEED, lambda: CLIPModel(config)), build_clip_tokenizer()
    if "dino" in wanted:
        enc.dino = _seeded(RANDOM_TINY_SEED + 1, lambda: ViTModel(vit, add_pooling_layer=False))
    if "dreamsim" in wanted:
        enc.dreamsim = _seeded(RANDOM_TINY_SEED + 2, lambda: ViTModel(vit, add_pooling_layer=False))
    if "lpips" in wanted:
        def build() -> LPIPSNetwork:
            net = LPIPSNetwork((8, 12, 16, 16, 16))
            for k in range(5):  # random positive heads, as LPIPS's are non-negative
                getattr(net, f"lin{k}").weight.data = torch.rand_like(getattr(net, f"lin{k}").weight) + 0.1
            return net
        enc.lpips, enc.lpips_size = _seeded(RANDOM_TINY_SEED + 3, build), 64
    enc.weights = dict.fromkeys(wanted, RANDOM_TINY_DESCRIPTION)


def _hf_cache() -> str:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def _cached(repo: str, filename: str, cache: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # looks on disk only

    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache), str)


_LAYOUT = {  # model -> (path under --weights DIR, what to put there)
    "clip": ("clip", "a CLIPModel folder: save_pretrained of openai/clip-vit-large-patch14"),
    "dino": ("dino", "a ViTModel folder: save_pretrained of facebook/dino-vits16"),
    "dreamsim": ("dreamsim", "a ViTModel folder of DreamSim's dino_vitb16, LoRA merged"),
    "lpips": (LPIPS_FILE, "AlexNet features + LPIPS heads, see eval/encoders.py"),
}


def _sources(wanted: set[str], weights: str | None, labels: dict[str, str]) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """Where each model is: name -> (path or hub id, extra from_pretrained kwargs); and what is missing."""
    found, missing = {}, []
    for name in sorted(wanted - {"background"}):
        rel, what = _LAYOUT[name]
        if weights is not None:
            path = pathlib.Path(weights).expanduser() / rel
            if path.is_file() if name == "lpips" else (path / "config.json").is_file():
                found[name] = (str(path), {})
            else:
                missing.append(f"{labels[name]} needs {path} ({what})")
        elif name in HUB_IDS and _cached(HUB_IDS[name], "config.json", _hf_cache()):
            found[name] = (HUB_IDS[name], {"cache_dir": _hf_cache()})
        elif name in HUB_IDS:
            missing.append(f"{labels[name]} needs {HUB_IDS[name]} in the Hugging Face cache {_hf_cache()} or --weights DIR")
        else:
            missing.append(f"{labels[name]} needs --weights DIR with DIR/{rel} ({what})")
    if "background" in wanted:
        path, looked = find_u2net(weights)
        if path is None:
            missing.append(f"background removal needs {looked} (rembg's u2net.onnx; with --weights DIR: DIR/rembg/u2net.onnx)")
    return found, missing


def _load_real(found: dict[str, tuple[str, dict]], enc: Encoders) -> None:
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    from ..models.tokenizer import build_clip_tokenizer

    def pretrained(cls: Any, name: str, **extra: Any) -> Any:
        src, kwargs = found[name]
        try:
            return cls.from_pretrained(src, local_files_only=True, **kwargs, **extra)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"{name}: cannot load {src}: {one_line(exc)}; {_HOW}") from exc

    if "clip" in found:
        enc.clip = pretrained(CLIPModel, "clip")
        src, kwargs = found["clip"]
        has_tokenizer = any(
            _cached(src, f, kwargs["cache_dir"]) if kwargs else (pathlib.Path(src) / f).is_file()
            for f in ("tokenizer.json", "vocab.json")
        )
        # Without tokenizer files, the same 49,408-token vocabulary built offline (transformers 5
        # would build an empty tokenizer from such a folder rather than fail).
        enc.tokenizer = pretrained(CLIPTokenizer, "clip") if has_tokenizer else build_clip_tokenizer()
    if "dino" in found:
        enc.dino = pretrained(ViTModel, "dino", add_pooling_layer=False)
    if "dreamsim" in found:
        enc.dreamsim = pretrained(ViTModel, "dreamsim", add_pooling_layer=False)
    if "lpips" in found:
        from safetensors.torch import load_file

        path = found["lpips"][0]
        try:
            state = load_file(path)
            net = LPIPSNetwork([int(state[f"lin{k}.weight"].shape[1]) for k in range(5)])
            net.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, OSError) as exc:
            raise MissingWeightsError(f"lpips: {path} is not an LPIPS-Alex file ({one_line(exc)}); {_HOW}") from exc
        if any(bool((w < 0).any()) for w in net.heads()):
            raise MissingWeightsError(f"lpips: {path} has negative linear-head weights (not LPIPS's)")
        enc.lpips, enc.lpips_size = net, 224
    enc.weights = {name: src for name, (src, _) in found.items()}


def load_encoders(
    metrics: Sequence[str], *, weights: str | None = None, encoders: str | None = None, device: str = "cpu",
    remove_background: bool = True,
) -> Encoders:
    """Load the networks of ``metrics`` (names from :data:`ALL_METRICS`) on ``device``, offline.

    ``encoders="random-tiny"``: tiny random models (plumbing check); ``weights=DIR``: the layout of this
    module's docstring; neither: CLIP and DINO from the Hugging Face cache. Everything needed is
    checked before anything loads: what is missing raises :class:`MissingWeightsError` at once, one
    line naming each missing metric and path or hub id. With a subject metric and
    ``remove_background``, ``Encoders.remover`` is :func:`~.background.load_background_remover`'s
    (the same instance that function returns to other callers).

    ``oracle`` needs no network: with only ``oracle`` nothing is loaded (and nothing can be
    missing), ``plumbing_check`` is False even with random-tiny (no random weight is used), and
    ``weights["oracle"]`` is :data:`ORACLE_WEIGHTS`.
    """
    chosen = validate_metrics(metrics)
    learned = tuple(m for m in chosen if m != ORACLE)
    if encoders not in (None, RANDOM_TINY):
        raise StorySyncUserError(f"--encoders: unknown {encoders!r} (the only choice is {RANDOM_TINY})")
    if encoders is not None and weights is not None:
        raise StorySyncUserError("--encoders random-tiny and --weights exclude each other")
    wanted = {_model_of(m) for m in learned}
    if remove_background and any(m in SUBJECT_METRICS for m in chosen):
        wanted.add("background")
    enc = Encoders(metrics=chosen, plumbing_check=encoders == RANDOM_TINY and bool(learned), weights={},
                   device=device)
    if encoders == RANDOM_TINY:
        if wanted:
            _random_tiny(wanted, enc)
    else:
        labels = {n: "/".join(m for m in learned if _model_of(m) == n) for n in wanted}
        found, missing = _sources(wanted, weights, labels)
        if missing:
            raise MissingWeightsError(f"missing weights: {'; '.join(missing)}; {_HOW}")
        if found:
            _load_real(found, enc)
    for name in ("clip", "dino", "lpips", "dreamsim"):
        if getattr(enc, name) is not None:
            setattr(enc, name, getattr(enc, name).to(device).eval())
    weights_of = {m: ORACLE_WEIGHTS if m == ORACLE else enc.weights[_model_of(m)] for m in chosen}
    if "background" in wanted:
        enc.remover = load_background_remover(weights=weights, encoders=encoders, device=device)
        weights_of["background"] = enc.remover.weights
    enc.weights = weights_of
    return enc
