"""Whether a LoRA file fits a model: every LoRA layer of it must adapt a module of the model with the
same shapes (:func:`lora_mismatch`). diffusers and peft only log a warning for keys that match nothing,
so ``--lora`` checks this on the driver, on the model's components built on the ``meta`` device
(``customize.resolve_model_setup``): no weights are read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import diffusers
import torch

from ..errors import one_line

__all__ = ["lora_mismatch"]


# The part of a LoRA key (peft layout) that follows the module it adapts.
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|lokr_\w+)(\.|$)")
# ... and in any layout diffusers reads (kohya/A1111 and diffusers' older ones too), for keys that
# reach no component and so are never converted.
_ANY_LORA_PART = re.compile(
    r"\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|lokr_\w+|lora\.(?:down|up)|"
    r"lora_(?:down|up)|lora_linear_layer\.(?:down|up)|alpha)(\.|$)"
)


def _layers(keys: Sequence[str], pattern: re.Pattern[str] = _ANY_LORA_PART) -> list[str]:
    """The modules (key prefixes) that LoRA keys adapt, in order, each once."""
    return list(dict.fromkeys(k[: m.start()] for k in keys if (m := pattern.search(k))))


def _lora_state_dict(pipeline_class: type, path: str) -> dict[str, torch.Tensor]:
    result = pipeline_class.lora_state_dict(path, use_safetensors=True, local_files_only=True)
    state = result[0] if isinstance(result, tuple) else result
    return dict(state)


def _as_peft(component: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A component's LoRA keys in peft's layout (``<module>.lora_A.weight``), converted the way
    diffusers converts them when it loads them into this kind of component."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if isinstance(component, diffusers.ModelMixin):
        return state if any("lora_A" in k for k in state) else convert_unet_state_dict_to_peft(state)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


def _adapted_module(component: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            module = component.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)  # a layer peft already wraps
    return None


def lora_mismatch(
    pipeline_class: type, path: str, component: Callable[[str], torch.nn.Module | None],
) -> str | None:
    """Why the LoRA at ``path`` does not fit the pipeline, or None when every LoRA layer of it
    adapts a module of the pipeline with the same shapes.

    ``component(role)`` is the pipeline's component of that role (``unet``, ``text_encoder``,
    ``transformer``), or None when the model has none; it may live on the meta device. The keys are
    read and converted as diffusers reads them (``lora_state_dict``), so a kohya or A1111 file is
    judged in the layout diffusers would load.
    """
    loadable = tuple(getattr(pipeline_class, "_lora_loadable_modules", ()))
    if not loadable or not hasattr(pipeline_class, "load_lora_weights"):
        return f"{pipeline_class.__name__} takes no LoRA in diffusers {diffusers.__version__}"
    for role in loadable:
        model = component(role)
        if isinstance(model, diffusers.ModelMixin) and not hasattr(model, "load_lora_adapter"):
            return (f"{type(model).__name__} ({role} of {pipeline_class.__name__}) takes no LoRA in diffusers "
                    f"{diffusers.__version__}")
    try:
        state = _lora_state_dict(pipeline_class, path)
    except Exception as exc:
        return f"diffusers cannot read it as a LoRA ({one_line(exc)})"
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    outside: list[str] = []
    for key, value in state.items():
        role, _, rest = key.partition(".")
        if role in loadable and rest:
            by_role.setdefault(role, {})[rest] = value
        else:
            outside.append(key)
    unmatched = _layers(outside)  # keys of no component diffusers loads LoRAs into
    layers = len(unmatched)
    wrong: list[str] = []
    for role, keys in by_role.items():
        model = component(role)
        if model is None:
            missing = [f"{role}.{name}" for name in _layers(list(keys))]
            unmatched += missing
            layers += len(missing)
            continue
        try:
            peft_keys = _as_peft(model, keys)
        except Exception as exc:
            return f"diffusers cannot convert its {role} keys ({one_line(exc)})"
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in peft_keys.items():
            match = _LORA_PART.search(key)
            if match is not None:
                modules.setdefault(key[: match.start()], {})[key[match.start() + 1:]] = value
        layers += len(modules)
        for name, parts in modules.items():
            module = _adapted_module(model, name)
            if module is None:
                unmatched.append(f"{role}.{name}")
                continue
            weight = getattr(module, "weight", None)
            a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and a is not None and b is not None and (
                    a.ndim < 2 or b.ndim < 2 or a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]):
                wrong.append(f"{role}.{name}: LoRA {tuple(a.shape)} x {tuple(b.shape)}, "
                             f"layer {tuple(weight.shape)}")
    if not layers:
        return "the file holds no LoRA layers"
    if unmatched:
        return (f"a LoRA for another model: {len(unmatched)} of its {layers} LoRA layers match no module of this "
                f"{pipeline_class.__name__} (first: {unmatched[0]})")
    if wrong:
        return (f"a LoRA for another model: {len(wrong)} of its {layers} LoRA layers do not fit the shapes of "
                f"this {pipeline_class.__name__} (first: {wrong[0]})")
    return None
