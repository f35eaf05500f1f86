"""Background removal before the subject metrics, with rembg (https://github.com/danielgatis/rembg).

CLIP-I, DINO, LPIPS and DreamSim should compare the *subject* across a story's frames, not the scene
around it: a story whose backgrounds change from frame to frame (as the prompts ask) would otherwise
score as inconsistent. So, as in ConsiStory and StorySync, the background is removed first and
replaced by a flat colour (white). The StorySync paper used Carvekit; this uses rembg instead,
because it is maintained, runs its U²-Net (Qin et al. 2020) on ONNX Runtime, and needs no
torchvision (which has no CPU build on these machines).

Weights are one local ONNX file with the interface of rembg's ``u2net`` model: input (1, 3, 320, 320)
float (the RGB image resized to 320 × 320, scaled by its maximum, normalised with the ImageNet
mean/std), first output (1, 1, 320, 320) saliency; rembg min-max normalises it and resizes it back to
the image size as the mask. The file is rembg's ``u2net.onnx`` release asset (what rembg's default
session would download into ``~/.u2net``; here it is copied by hand to ``DIR/rembg/u2net.onnx``).
rembg's own named sessions download on first use and are never created here: the file is run through
rembg's ``u2net_custom`` session, whose pre- and post-processing are those of ``u2net``.

``random-tiny`` (plumbing check): a two-convolution ONNX model with random weights (fixed seed), built
with ``onnx.helper``, cached under ``$STORYSYNC_CACHE/eval`` and run through the same rembg code path.
Its mask is no segmentation; it only proves that the images travel through rembg and back.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from storysync_dist.cache import cache_root
from storysync_dist.errors import MissingWeightsError

__all__ = [
    "BACKGROUND_COLOUR", "RANDOM_TINY_U2NET_SEED", "BackgroundRemover", "build_random_tiny_u2net", "find_u2net",
    "load_background_remover",
]

BACKGROUND_COLOUR = (255, 255, 255)
RANDOM_TINY_U2NET_SEED = 0
U2NET_SIZE = 320  # rembg's u2net sessions resize every image to 320 × 320
RANDOM_TINY_DESCRIPTION = "random-tiny (plumbing check, random weights)"
U2NET_FILE = "rembg/u2net.onnx"  # under --weights DIR


@lru_cache(maxsize=1)
def _local_session_class() -> type:
    """rembg's ``u2net_custom`` session, reading the ONNX file the caller names.

    Recent rembg releases accept a ``model_path`` only under rembg's own home (``~/.rembg``), a guard
    for its HTTP server; the file here is the user's own, so only the lookup is replaced: loading
    (``BaseSession``), preprocessing (``normalize``) and the mask (``predict``) stay rembg's.
    """
    from rembg.sessions.u2net_custom import U2netCustomSession  # importing rembg downloads nothing

    class LocalFileSession(U2netCustomSession):
        @classmethod
        def download_models(cls, *args: Any, **kwargs: Any) -> str:
            return str(pathlib.Path(kwargs["model_path"]).resolve())

    return LocalFileSession


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class BackgroundRemover:
    """rembg on a local U²-Net ONNX file: ``mask`` gives the subject's mask, ``remove`` the image on white.

    ``weights`` describes the model used (the file's path, or the random-tiny label) for the reports.
    """

    def __init__(
        self, model_path: str | os.PathLike[str], *, device: str = "cpu", description: str | None = None,
        plumbing_check: bool = False,
    ) -> None:
        import onnxruntime as ort

        path = pathlib.Path(model_path)
        if not path.is_file():
            from ..errors import StorySyncUserError

            raise StorySyncUserError(f"background removal: no ONNX model at {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = _local_session_class()(
            "u2net_custom", options, providers=_providers(device), model_path=str(path)
        )
        self.model_path = path
        self.weights = description or str(path)
        self.plumbing_check = plumbing_check

    @classmethod
    def random_tiny(cls, *, device: str = "cpu", cache_dir: str | os.PathLike[str] | None = None) -> BackgroundRemover:
        """The plumbing-check remover: :func:`build_random_tiny_u2net` run through rembg."""
        path = build_random_tiny_u2net(cache_dir)
        return cls(path, device=device, description=RANDOM_TINY_DESCRIPTION, plumbing_check=True)

    def mask(self, image: Image.Image) -> Image.Image:
        """The subject mask (mode L, the image's size): 255 subject, 0 background, soft in between."""
        from rembg import remove

        mask = remove(image.convert("RGB"), session=self.session, only_mask=True)
        return mask.convert("L")

    def remove(self, image: Image.Image) -> Image.Image:
        """The RGB image with its background replaced by :data:`BACKGROUND_COLOUR`.

        Each pixel is ``m · image + (1 − m) · white`` with ``m`` the mask in [0, 1]: the colour
        exactly where the mask is 0, the image unchanged where it is 255.
        """
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        m = np.asarray(self.mask(image), dtype=np.float64)[..., None] / 255.0
        flat = np.asarray(BACKGROUND_COLOUR, dtype=np.float64)
        out = m * rgb + (1.0 - m) * flat
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def find_u2net(weights: str | None) -> tuple[pathlib.Path | None, str]:
    """The background model's file, or None, and where it was looked for (for the error message).

    With ``weights=DIR``: ``DIR/rembg/u2net.onnx``. Without: a ``u2net.onnx`` that rembg downloaded
    earlier into its home (``$U2NET_HOME`` or ``~/.u2net``; ``$REMBG_HOME``, ``$XDG_DATA_HOME/rembg``
    or ``~/.rembg`` under ``models/u2net``); nothing is downloaded.
    """
    if weights is not None:
        path = pathlib.Path(weights).expanduser() / U2NET_FILE
        return (path if path.is_file() else None), str(path)
    env = os.environ
    legacy = pathlib.Path(env.get("U2NET_HOME") or pathlib.Path(env.get("XDG_DATA_HOME") or "~") / ".u2net")
    home = pathlib.Path(env.get("REMBG_HOME") or (pathlib.Path(env["XDG_DATA_HOME"]) / "rembg"
                                                  if env.get("XDG_DATA_HOME") else "~/.rembg"))
    candidates = [p.expanduser() for p in (legacy / "u2net.onnx", home / "models" / "u2net" / "u2net.onnx")]
    found = next((p for p in candidates if p.is_file()), None)
    return found, " or ".join(str(p) for p in candidates)


_LOADED: dict[tuple[str, str], BackgroundRemover] = {}


def load_background_remover(
    *, weights: str | None = None, encoders: str | None = None, device: str = "cpu"
) -> BackgroundRemover:
    """The remover of ``--weights DIR`` / ``--encoders random-tiny`` / rembg's earlier download (see
    :func:`find_u2net`); one instance per file and device, shared by every caller of the process.
    Raises ``MissingWeightsError`` (one line) when the model file is absent."""
    if encoders == "random-tiny":
        key = (str(build_random_tiny_u2net()), device)
        if key not in _LOADED:
            _LOADED[key] = BackgroundRemover.random_tiny(device=device)
        return _LOADED[key]
    path, looked = find_u2net(weights)
    if path is None:
        raise MissingWeightsError(
            f"missing weights: background removal needs {looked} (rembg's u2net.onnx); pass --weights DIR with "
            f"DIR/{U2NET_FILE}, or --encoders random-tiny for a plumbing check; see docs/evaluation.md"
        )
    key = (str(path.resolve()), device)
    if key not in _LOADED:
        _LOADED[key] = BackgroundRemover(path, device=device)
    return _LOADED[key]


def build_random_tiny_u2net(
    cache_dir: str | os.PathLike[str] | None = None, *, seed: int = RANDOM_TINY_U2NET_SEED
) -> pathlib.Path:
    """Write (once) a tiny random ONNX model with rembg's u2net interface and return its path.

    Graph: ``input.1`` (1, 3, 320, 320) → Conv 3→4 (3 × 3) → Relu → Conv 4→1 (1 × 1) → Sigmoid →
    ``mask`` (1, 1, 320, 320). Weights are drawn from ``numpy.random.default_rng(seed)``, so the file
    is byte-identical in every process.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "eval"
    path = folder / f"random-tiny-u2net-seed{seed}.onnx"
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, (4,)).astype(np.float32)
    w2 = rng.normal(0.0, 0.5, (1, 4, 1, 1)).astype(np.float32)
    b2 = np.zeros((1,), dtype=np.float32)
    shape = [1, 3, U2NET_SIZE, U2NET_SIZE]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input.1", "w1", "b1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "w2", "b2"], ["logits"], kernel_shape=[1, 1]),
            helper.make_node("Sigmoid", ["logits"], ["mask"]),
        ],
        "random_tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, U2NET_SIZE, U2NET_SIZE])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="storysync")
    model.ir_version = 8  # readable by every onnxruntime >= 1.17
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp, path)  # atomic: concurrent writers leave one complete file
    return path
