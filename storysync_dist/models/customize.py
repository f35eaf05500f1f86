"""What ``--scheduler NAME`` and ``--lora PATH[:SCALE]`` change of a model: its scheduler and its
LoRA adapters, checked on the driver before anything renders and applied to every loaded pipeline.

**Scheduler.** Any diffusers scheduler class the pipeline's own scheduler lists in ``compatibles``,
built from the pipeline's own scheduler config (``cls.from_config(pipe.scheduler.config)``, as the
diffusers docs swap schedulers). :func:`resolve_model_setup` reads that config from the model's
folder (``scheduler/scheduler_config.json``), so a Ray driver checks the name without loading any
weights. Naming the model's own class is the same as naming none (``None``): the frames are the same.

**LoRA.** Local ``.safetensors`` files only, loaded with diffusers' ``load_lora_weights(path,
adapter_name=..., use_safetensors=True)`` (peft wraps the targeted ``Linear`` layers, so the
StorySync processors, which call ``attn.to_q`` and friends, see the LoRA'd projections) and
activated with ``set_adapters(names, adapter_weights=scales)``. A LoRA is identified by its file's
SHA-256 and its scale, never by its path. Before anything renders, every LoRA layer of the file
must match a module of this model with the same shapes (:func:`lora_mismatch`, on the model's
components built on the ``meta`` device from their configs: no weights are read), since diffusers
and peft only log a warning for keys that match nothing; after loading, the adapter must have been
injected into some module (:func:`apply_model_setup`), or the load is refused too.

Ray workers read the LoRA files by path (``RenderSettings.loras`` carries the absolute path, the
scale and the SHA-256); a worker whose file differs from the driver's refuses to render
(docs/configuration.md: on a cluster the path must be visible to every worker).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers

from ..errors import StorySyncUserError, one_line
from .family import UnknownModelError
from .hub import class_of
from .info import meta_components
from .lora_fit import lora_mismatch
from .preset_build import quiet_progress_bars

__all__ = [
    "LoraFile", "ModelSetup", "apply_model_setup", "compatible_schedulers", "lora_mismatch", "resolve_model_setup",
]

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
LORA_SUFFIX = ".safetensors"
_ADAPTER_PREFIX = "storysync_lora"


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a job: the absolute path it is read from, its scale, and its file's SHA-256."""

    path: str
    scale: float
    sha256: str

    def as_settings(self) -> tuple[str, float, str]:
        """The plain form ``RenderSettings.loras`` holds (and Ray workers receive)."""
        return (self.path, self.scale, self.sha256)


@dataclass(frozen=True)
class ModelSetup:
    """The scheduler (None: the model's own) and the LoRAs (in order) a job renders with."""

    scheduler: str | None = None
    loras: tuple[LoraFile, ...] = ()


# ---- schedulers ---------------------------------------------------------------------------------
def compatible_schedulers(scheduler: Any) -> list[str]:
    """The names of the scheduler classes ``scheduler`` (an instance) lists as compatible, its own
    included, sorted."""
    return sorted({cls.__name__ for cls in scheduler.compatibles} | {type(scheduler).__name__})


def _folder_scheduler(folder: pathlib.Path) -> Any:
    """The model's own scheduler, built from its folder's config (no weights)."""
    path = folder / SCHEDULER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"{folder}: cannot read {SCHEDULER_CONFIG} ({one_line(exc)})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = class_of(diffusers, name) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise UnknownModelError(f"{path}: _class_name {name!r} is not a diffusers scheduler")
    return cls.from_config(config)


def _check_scheduler(name: str, own: Any, model: str, where: str, steps: int | None = None) -> str | None:
    """``name`` if it is a scheduler compatible with ``own`` (the model's scheduler), None if it
    is ``own``'s class; a one-line ``StorySyncUserError`` naming ``where`` otherwise.

    The class must also build from ``own``'s config (a missing optional dependency, a config it
    cannot read) and, when ``steps`` is given and ``own`` takes a plain ``set_timesteps(steps)``
    (the UNet and Kandinsky 3 pipelines call it so), set that many steps: PNDM's Runge-Kutta warm-up
    cannot run fewer than 4, for one. Both are found here, before anything renders.
    """
    compatible = compatible_schedulers(own)
    if name not in compatible:
        found = class_of(diffusers, name) if name.isidentifier() else None
        what = ("is not compatible with" if found is not None and issubclass(found, diffusers.SchedulerMixin)
                else "is not a diffusers scheduler class usable with")
        raise StorySyncUserError(
            f"{where} {name}: {what} --model {model} (its scheduler is {type(own).__name__}); "
            f"compatible: {', '.join(compatible)}"
        )
    if name == type(own).__name__:
        return None
    try:
        scheduler = getattr(diffusers, name).from_config(own.config)
    except Exception as exc:  # a missing optional dependency (torchsde for DPMSolverSDEScheduler), ...
        raise StorySyncUserError(
            f"{where} {name}: cannot be built from the scheduler config of --model {model} ({one_line(exc)})"
        ) from None
    if steps is not None and _sets_timesteps(copy.deepcopy(own), steps):
        try:
            scheduler.set_timesteps(steps)
        except Exception as exc:
            raise StorySyncUserError(
                f"{where} {name}: cannot run {steps} steps with the scheduler config of --model {model} "
                f"({one_line(exc)}); use more steps or another scheduler"
            ) from None
    return name


def _sets_timesteps(scheduler: Any, steps: int) -> bool:
    try:
        scheduler.set_timesteps(steps)
    except Exception:  # FLUX's flow matching needs the pipeline's sigmas and mu
        return False
    return True


# ---- LoRA files ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 hex of a file (read once per size and modification time)."""
    stat = os.stat(path)
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def _lora_file(path: str, scale: Any, where: str) -> LoraFile:
    """Check one LoRA file (suffix, existence, a readable safetensors header, its scale)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise StorySyncUserError(f"{where} {path}: the scale must be a finite number, got {scale!r}")
    full = os.path.abspath(os.path.expanduser(path))
    if not full.lower().endswith(LORA_SUFFIX):
        raise StorySyncUserError(
            f"{where} {path}: not a {LORA_SUFFIX} file; LoRA weights load from safetensors only, never from "
            "pickled .bin/.pt/.ckpt files (convert it first)"
        )
    if os.path.isdir(full):
        raise StorySyncUserError(f"{where} {path}: is a folder; give the LoRA's {LORA_SUFFIX} file")
    if not os.path.isfile(full):
        raise StorySyncUserError(f"{where} {path}: no such file")
    from safetensors import safe_open

    try:
        with safe_open(full, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # SafetensorError, OSError
        raise StorySyncUserError(f"{where} {path}: not a readable safetensors file ({one_line(exc)})") from None
    if not keys:
        raise StorySyncUserError(f"{where} {path}: the file holds no tensors")
    try:
        sha = file_sha256(full)
    except OSError as exc:
        raise StorySyncUserError(f"{where} {path}: cannot read it ({one_line(exc)})") from None
    return LoraFile(full, float(scale), sha)


@functools.lru_cache(maxsize=32)
def _folder_mismatch(model: str, folder: str, path: str, sha256: str) -> str | None:
    root = pathlib.Path(folder)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = class_of(diffusers, str(index.get("_class_name")))
    if pipeline_class is None:
        return f"--model {model} names no diffusers pipeline class"
    components = meta_components(folder)
    return lora_mismatch(pipeline_class, path, components.get)


# ---- the driver's check -------------------------------------------------------------------------
def resolve_model_setup(
    model: str,
    scheduler: tuple[str, str] | None,
    loras: Sequence[tuple[str, Any, str]],
    *,
    pipe: Any | None = None,
    steps: int | None = None,
) -> ModelSetup:
    """Check the scheduler and the LoRAs of a job against ``model`` before anything renders.

    ``scheduler`` is ``(name, where)``, ``loras`` ``(path, scale, where)`` each; ``where`` names
    the place the value came from in errors (``--scheduler``, ``story.yaml: model.loras[0]``).
    With ``pipe`` (a loaded pipeline) the checks use it; otherwise the model's folder (configs
    only: nothing is loaded). ``steps`` (the job's) is checked against the scheduler. Every
    problem is a one-line ``StorySyncUserError``.
    """
    if scheduler is None and not loras:
        return ModelSetup()
    folder: pathlib.Path | None = None
    if pipe is None:
        from .info import model_folder

        try:
            folder = model_folder(model)
        except UnknownModelError as exc:
            raise StorySyncUserError(f"--model: {exc}") from None
    name = None
    if scheduler is not None:
        value, where = scheduler
        if not isinstance(value, str) or not value.strip():
            raise StorySyncUserError(f"{where}: give a diffusers scheduler class name, got {value!r}")
        if pipe is not None:
            own = _base_scheduler(pipe)
        else:
            try:
                own = _folder_scheduler(folder)
            except UnknownModelError as exc:
                raise StorySyncUserError(f"{where} {value}: --model {model}: {exc}") from None
        name = _check_scheduler(value.strip(), own, model, where, steps)
    files = []
    for path, scale, where in loras:
        lora = _lora_file(path, scale, where)
        if pipe is not None:
            problem = lora_mismatch(type(pipe), lora.path, lambda role: getattr(pipe, role, None))
        else:
            try:
                problem = _folder_mismatch(model, str(folder), lora.path, lora.sha256)
            except (OSError, ValueError, TypeError) as exc:
                problem = f"cannot read the configs of --model {model} ({one_line(exc)})"
        if problem is not None:
            raise StorySyncUserError(f"{where} {path}: {problem}")
        files.append(lora)
    return ModelSetup(name, tuple(files))


# ---- applying it to a loaded pipeline -----------------------------------------------------------
@dataclass
class _Applied:
    """What this module changed of one pipeline: its scheduler before any change, the scheduler
    set now, and the LoRA adapters it loaded, as (adapter name, sha256, scale), in order."""

    base_scheduler: Any
    scheduler: str | None = None
    adapters: tuple[tuple[str, str, float], ...] = ()
    freeu: tuple[float, ...] | None = None


_APPLIED: weakref.WeakKeyDictionary[Any, _Applied] = weakref.WeakKeyDictionary()


def _base_scheduler(pipe: Any) -> Any:
    applied = _APPLIED.get(pipe)
    return applied.base_scheduler if applied is not None else pipe.scheduler


def _adapter_name(position: int, sha256: str) -> str:
    # peft keeps adapters in ModuleDicts: no dots, and no name of an nn.Module attribute.
    return f"{_ADAPTER_PREFIX}_{position}_{sha256[:16]}"


def _loaded_names(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def apply_model_setup(
    pipe: Any, scheduler: str | None, loras: Sequence[Sequence[Any]], freeu: Sequence[float] | None = None,
) -> None:
    """Give ``pipe`` the scheduler (None: the one it was loaded with), exactly these LoRAs
    (``(path, scale, sha256)`` each, as ``RenderSettings.loras``) and FreeU with ``freeu = (s1, s2,
    b1, b2)`` (None: off; ``RenderSettings.freeu``, a method's own sampler), undoing what an
    earlier call set: one pipeline serves stories with different settings, so a story rendered
    after a ``--method consistory`` one on the same pipeline is stock again. Cheap when nothing
    changes.

    A LoRA file whose SHA-256 is not the expected one (a Ray worker that sees another file at the
    path), a load that fails, or an adapter that diffusers injected into no module is a one-line
    ``StorySyncUserError`` naming ``--lora`` and the file.
    """
    applied = _APPLIED.get(pipe)
    if applied is None:
        if scheduler is None and not loras and freeu is None:
            return
        applied = _APPLIED[pipe] = _Applied(pipe.scheduler)
    wanted_freeu = None if freeu is None else tuple(float(x) for x in freeu)
    if wanted_freeu != applied.freeu:
        _set_freeu(pipe, wanted_freeu)
        applied.freeu = wanted_freeu
    if scheduler != applied.scheduler:
        if scheduler is None:
            pipe.scheduler = applied.base_scheduler
        else:
            base = applied.base_scheduler
            if scheduler not in compatible_schedulers(base):
                raise StorySyncUserError(f"--scheduler {scheduler}: not compatible with {type(base).__name__}")
            pipe.scheduler = getattr(diffusers, scheduler).from_config(base.config)
        applied.scheduler = scheduler
    wanted = [(_adapter_name(i, str(sha)), str(path), float(scale), str(sha))
              for i, (path, scale, sha) in enumerate(loras)]
    target = tuple((name, sha, scale) for name, _, scale, sha in wanted)
    if target == applied.adapters:
        return
    names = [name for name, _, _, _ in wanted]
    stale = [name for name, _, _ in applied.adapters if name not in names]
    if stale:
        pipe.delete_adapters(stale)
    applied.adapters = tuple(a for a in applied.adapters if a[0] not in stale)
    loaded = {name for name, _, _ in applied.adapters}
    for name, path, _, sha in wanted:
        if name not in loaded:  # the name holds the file's hash: a loaded name is this file
            _load_lora(pipe, name, path, sha)
            applied.adapters += ((name, sha, math.nan),)  # loaded; its weight is set below
    if wanted:
        pipe.set_adapters(names, adapter_weights=[scale for _, _, scale, _ in wanted])
    applied.adapters = target


def _set_freeu(pipe: Any, freeu: tuple[float, ...] | None) -> None:
    """FreeU on (``pipe.enable_freeu(s1, s2, b1, b2)``, as ConsiStory's release calls it) or off."""
    if freeu is None:
        disable = getattr(pipe, "disable_freeu", None)
        if disable is not None:
            disable()
        return
    if getattr(pipe, "enable_freeu", None) is None:
        raise StorySyncUserError(f"FreeU: {type(pipe).__name__} has no enable_freeu; its family keeps its own sampler")
    s1, s2, b1, b2 = freeu
    pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)


def _load_lora(pipe: Any, name: str, path: str, sha256: str) -> None:
    where = f"--lora {path}"
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise StorySyncUserError(f"{where}: cannot read it here ({one_line(exc)}); on a cluster the LoRA file "
                                 "must be at the same path on every node") from None
    if actual != sha256:
        raise StorySyncUserError(f"{where}: the file here (sha256 {actual[:12]}...) is not the one the job was "
                                 f"planned with (sha256 {sha256[:12]}...); on a cluster every node needs the same file")
    if not hasattr(pipe, "load_lora_weights"):
        raise StorySyncUserError(f"{where}: {type(pipe).__name__} takes no LoRA")
    try:
        with _quiet_loading():
            pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True, local_files_only=True)
    except Exception as exc:
        _forget_adapter(pipe, name)
        raise StorySyncUserError(f"{where}: diffusers could not load it into {type(pipe).__name__} "
                                 f"({one_line(exc)[:300]})") from None
    if name not in _loaded_names(pipe):
        _forget_adapter(pipe, name)
        raise StorySyncUserError(f"{where}: a LoRA for another model: diffusers injected it into no module of "
                                 f"this {type(pipe).__name__}")


# diffusers warns, for every component a LoRA has no keys for, that this "is safe to ignore";
# resolve_model_setup has checked every key already, so worker logs are spared them.
_LOADER_LOGGERS = ("diffusers.loaders.peft", "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _LOADER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with quiet_progress_bars():
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _forget_adapter(pipe: Any, name: str) -> None:
    try:
        if name in _loaded_names(pipe):
            pipe.delete_adapters([name])
    except Exception:  # the load's own error is the one to report
        pass
