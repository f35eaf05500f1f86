"""``share_layers`` and ``mask_layers`` checked against the model's attention layers before a render.

Both are processor-name prefixes (``docs/configuration.md``): the family's processors share keys
and values in the self-attention layers whose name starts with a ``share_layers`` entry, and read
subject maps from the cross-attention layers whose name starts with a ``mask_layers`` entry. A
typo there (``up_blcks`` for ``up_blocks``) matches nothing, and a render would go on without any
cross-image sharing, labelled StorySync. So every entry must select at least one layer of its kind,
otherwise the job is refused in one line that names the entry and the prefixes the model has;
as ``StorySyncConfig`` refuses an empty list, no config passes under which no layer shares. The layer names come from the denoiser's
``attn_processors``, built on the meta device (``models.info.attention_processor_names``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..core.config import StorySyncConfig
from ..errors import StorySyncUserError

__all__ = ["check_layers", "layer_prefixes"]


def layer_prefixes(processors: Sequence[str]) -> list[str]:
    """The block-level prefixes of processor names, in model order: ``"up_blocks.0.attentions.1.
    transformer_blocks.0.attn1.processor"`` gives ``up_blocks`` and ``up_blocks.0``; ``mid_block``
    stays ``mid_block``. A long run of numbered blocks is shown as its first and last."""
    tops: dict[str, list[str]] = {}
    for name in processors:
        parts = name.split(".")
        numbered = tops.setdefault(parts[0], [])
        if len(parts) > 2 and parts[1].isdigit() and parts[1] not in numbered:
            numbered.append(parts[1])
    shown = []
    for top, numbers in tops.items():
        shown.append(top)
        if len(numbers) > 4:
            shown.append(f"{top}.{numbers[0]} ... {top}.{numbers[-1]}")
        else:
            shown.extend(f"{top}.{n}" for n in numbers)
    return shown


def _selected(entries: Sequence[str], candidates: Sequence[str]) -> dict[str, list[str]]:
    return {entry: [name for name in candidates if name.startswith(entry)] for entry in entries}


def check_layers(config: StorySyncConfig, processors: Sequence[str], *, shares_at: Callable[[str], bool],
                 maps_at: Callable[[str], bool], model: str) -> None:
    """Refuse (``StorySyncUserError``, one line) a ``share_layers`` or ``mask_layers`` entry that
    selects no layer of its kind among ``processors`` (the denoiser's processor names). ``shares_at``/``maps_at`` say which processors a
    ``share_layers``/``mask_layers`` prefix can select (the family's ``ModelFamily.shares_at``,
    ``maps_at``). The config's layers must be resolved (``StorySyncConfig.with_layers``)."""
    if config.share_layers is None or config.mask_layers is None:
        raise ValueError("check a config whose layers are resolved (StorySyncConfig.with_layers)")
    kinds = (("share_layers", config.share_layers, [p for p in processors if shares_at(p)], "self-attention"),
             ("mask_layers", config.mask_layers, [p for p in processors if maps_at(p)], "cross-attention"))
    for option, entries, candidates, kind in kinds:
        for entry, selected in _selected(entries, candidates).items():
            if not selected:
                raise StorySyncUserError(
                    f"{option}: {entry!r} matches no {kind} layer of --model {model}; its layers start with "
                    f"{', '.join(layer_prefixes(candidates))}"
                )
