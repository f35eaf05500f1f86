"""Which torch device and dtype a job renders with, checked before anything loads."""

from __future__ import annotations

import torch

from ..errors import StorySyncUserError

__all__ = ["DEFAULT_FRAME_BATCH", "DTYPES", "check_local_device", "default_dtype", "default_frame_batch",
           "device_and_dtype"]

DTYPES = ("float16", "bfloat16", "float32")


def default_dtype(device: str, model: str | None = None) -> str:
    """The dtype a render on ``device`` uses when ``--dtype`` is not given: on CUDA the model's
    family's (``ModelFamily.cuda_dtype``: float16, or bfloat16 where a family needs its range;
    float16 when no model is named), float32 elsewhere. ``model`` is a preset, a local pipeline
    folder or a cached hub id; its family is read from its ``model_index.json``, nothing loads."""
    if not device.startswith("cuda"):
        return "float32"
    if model is None:
        return "float16"
    from ..models.registry import family_for_model

    try:
        return family_for_model(model).cuda_dtype
    except (ValueError, TypeError) as exc:  # UnknownModelError, an unsupported pipeline
        raise StorySyncUserError(f"--model: {exc}") from None


# Non-anchor frames per denoiser batch when --frame-batch is not given, per device type; chosen
# from the measurements in docs/benchmarks.md ("Issue 10"), where the reasons are written down.
DEFAULT_FRAME_BATCH = {"cpu": 1, "cuda": 1}


def default_frame_batch(device: str) -> int:
    """``--frame-batch`` when it is not given, for a torch device string (``cuda:1`` -> ``cuda``)."""
    return DEFAULT_FRAME_BATCH.get(device.split(":")[0], 1)


def check_local_device(device: str) -> None:
    """Refuse a device this process cannot use (``--device cuda:1`` on a one-GPU machine, ...)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise StorySyncUserError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise StorySyncUserError(f"--device {device}: CUDA is not available on this machine "
                                     f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise StorySyncUserError(f"--device {device}: this machine has {count} CUDA device(s), "
                                     f"cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise StorySyncUserError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type == "meta":
        raise StorySyncUserError(f"--device {device}: the meta device holds no data and cannot render")
    elif parsed.type != "cpu":
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorySyncUserError(f"--device {device}: cannot use it here ({first})") from None


def device_and_dtype(device: str | None, dtype: str | None, model: str | None = None) -> tuple[str, torch.dtype]:
    """The device and dtype of an in-process render: ``--device`` (default cuda when available)
    checked against this machine, ``--dtype`` (default per device and ``model``: :func:`default_dtype`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_local_device(device)
    name = dtype or default_dtype(device, model)
    if name not in DTYPES:
        raise StorySyncUserError(f"--dtype {name!r}: choose float16, bfloat16 or float32")
    return device, getattr(torch, name)
