"""The story schema: the pydantic models of a story, and the one seed-range check.

``Subject``, ``Defaults``, ``Frame`` and ``StorySpec`` are the validated, immutable story the rest
of the program uses; ``_RawFrame`` and ``_RawStory`` are the file as written (ids, seeds and anchors
optional), which ``loading._build`` resolves into a ``StorySpec``. ``check_seed`` is the only place
that knows the seed range. ``_format_validation_error`` lives here (not in ``loading``) because
``StorySpec.with_overrides`` needs it and ``loading`` imports this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from ..core.ids import MAX_SEED
from ..errors import StorySpecError

__all__ = ["Defaults", "Frame", "LoraSpec", "ModelSection", "SeedRangeError", "StorySpec", "Subject", "check_seed"]

# Subject names are used as ``{name}`` placeholders, so they must be valid format-field names.
_SUBJECT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEED_RANGE = "[0, 2**63 - 1]"

# Strict numbers: YAML turns `yes` into True and pydantic's lax mode would accept it as 1, and a quoted
# "7" as 7; in a story file both are more likely mistakes than intent. (Strict floats still take ints,
# so `guidance_scale: 5` is fine.)
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]


class SeedRangeError(StorySpecError, ValueError):
    """A seed outside ``[0, 2**63 - 1]``.

    Both a ``StorySpecError`` (a one-line user error, as raised from ``loading._build`` and
    ``StorySpec.with_overrides``) and a ``ValueError``, so that raised inside a pydantic validator
    pydantic reports it at the field's location like any other validator message.
    """


def check_seed(value: int, where: str) -> int:
    """Return ``value`` if it is a usable seed, else raise ``SeedRangeError``.

    The message is ``"{where} must be within [0, 2**63 - 1], got {value}"``: ``where`` names the
    value with its file and frame (``"story.yaml: frame 'beach' (#0): seed"``). Inside a pydantic
    validator pass ``where=""``: pydantic adds the field's location (``defaults.seed``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        text = f"must be within {_SEED_RANGE}, got {value!r}"
        raise SeedRangeError(f"{where} {text}" if where else text)
    return value


def _collapse(text: str) -> str:
    return " ".join(text.split())


class _Model(BaseModel):
    # frozen: a spec is shared by the driver and every worker; nobody may mutate it in place.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subject(_Model):
    """A recurring subject: ``{name}`` in prompts expands to ``description``.

    ``tokens`` are the word(s) whose cross-attention maps give the subject mask; each must occur in
    every frame's tokenized prompt (checked by ``validate_for_model``).
    """

    name: str
    description: str
    tokens: list[str] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SUBJECT_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} must be a placeholder name: letters, digits and '_', not starting with a digit"
            )
        return value

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _collapse(value)

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, value: list[str]) -> list[str]:
        cleaned = [_collapse(token) for token in value]
        if any(not token for token in cleaned):
            raise ValueError("must not contain empty words")
        return cleaned


class Defaults(_Model):
    """Sampling settings shared by every frame (frames render in lockstep with the anchors).

    ``None`` means "the model's own default": the engine resolves it from the model, not here, so a
    story renders the way stock diffusers would for whatever it leaves out. ``negative_prompt=None``
    is no negative prompt at all, as in ``pipe(prompt)`` (for SDXL: zero unconditional embeddings),
    while a string, even ``""``, is encoded as given.
    """

    steps: StrictInt | None = None
    height: StrictInt | None = None
    width: StrictInt | None = None
    guidance_scale: StrictFloat | None = None
    seed: StrictInt = 0
    negative_prompt: str | None = None
    # FLUX's T5 text length (FluxPipeline's max_sequence_length); None: the model's (schnell 256, dev
    # 512). Families with a fixed text length refuse it (checked against the model by the job).
    max_sequence_length: StrictInt | None = None

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("max_sequence_length")
    @classmethod
    def _check_text_len(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1 tokens, got {value}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _check_size(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be a positive number of pixels, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int) -> int:
        return check_seed(value, "")

    @field_validator("guidance_scale")
    @classmethod
    def _check_guidance(cls, value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return float(value)

    @field_validator("negative_prompt")
    @classmethod
    def _check_negative(cls, value: str | None) -> str | None:
        return None if value is None else _collapse(value)


class LoraSpec(_Model):
    """One LoRA adapter of the ``model:`` section: a ``.safetensors`` file and its scale.

    A relative ``path`` is relative to the story file's folder (``loading._build`` makes it
    absolute); the file itself is checked against the model by the job (``models.customize``).
    """

    path: str
    scale: StrictFloat = 1.0

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return float(value)


class ModelSection(_Model):
    """The story's ``model:`` section: what it changes of the model it renders with, a scheduler
    (a diffusers class name; None: the model's own) and LoRA adapters, in order. ``--scheduler``
    and ``--lora`` on the command line win (any ``--lora`` replaces the whole list)."""

    scheduler: str | None = None
    loras: list[LoraSpec] = Field(default_factory=list)

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a diffusers scheduler class name, not empty")
        return None if value is None else value.strip()


class Frame(_Model):
    """One scene, fully resolved: ``prompt`` is the rendered text sent to the text encoder."""

    id: str
    index: int
    prompt: str
    template: str
    seed: int
    # Whether the story file set the seed; ``StorySpec.with_overrides(seed=...)`` only moves the
    # seeds that were derived from ``defaults.seed``.
    explicit_seed: bool = False


class StorySpec(_Model):
    """A validated story. ``anchors`` are frame ids, in frame-index order.

    ``storysync`` is the story file's ``storysync:`` section as written (StorySync method options,
    already checked against ``StorySyncConfig``; ``{}`` when the file has none). It is kept as
    written, not as a resolved config, because the job layers the ablation and ``--set`` options
    on top of it (``core.config.resolve_config``).
    """

    id: str
    style: str = ""
    subjects: list[Subject]
    anchors: list[str]
    defaults: Defaults
    frames: list[Frame]
    source: str = "<story>"
    # The benchmark category a story came from (``load_benchmark``); None for a story file.
    category: str | None = None
    storysync: dict[str, Any] = Field(default_factory=dict)
    # The ``model:`` section (scheduler and LoRAs; LoRA paths absolute for a story file).
    model: ModelSection = Field(default_factory=ModelSection)

    def frame_by_id(self, frame_id: str) -> Frame:
        """Return the frame with this id; ``StorySpecError`` (naming the file) if there is none."""
        for frame in self.frames:
            if frame.id == frame_id:
                return frame
        raise StorySpecError(
            f"{self.source}: no frame has id {frame_id!r} (frame ids: {_id_list(self.frames)})"
        )

    def anchor_frames(self) -> list[Frame]:
        """The anchor frames, in frame-index order."""
        anchors = set(self.anchors)
        return [frame for frame in self.frames if frame.id in anchors]

    def non_anchor_frames(self) -> list[Frame]:
        """Every frame that is not an anchor, in frame-index order."""
        anchors = set(self.anchors)
        return [frame for frame in self.frames if frame.id not in anchors]

    def with_overrides(
        self,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
    ) -> StorySpec:
        """Return a copy with command-line overrides applied (``None`` keeps the story's value,
        which may itself be ``None``: the model's default).

        ``seed`` replaces ``defaults.seed``: frames without an explicit seed get ``seed + index``;
        frames that set their own seed in the story file keep it.
        """
        updates = {
            name: value
            for name, value in (("steps", steps), ("height", height), ("width", width), ("seed", seed))
            if value is not None
        }
        if not updates:
            return self
        try:
            defaults = Defaults.model_validate({**self.defaults.model_dump(), **updates})
        except ValidationError as exc:
            raise StorySpecError(_format_validation_error(self.source, exc, loc_prefix="override ")) from None
        frames = self.frames
        if seed is not None:
            frames = []
            for frame in self.frames:
                if frame.explicit_seed:
                    frames.append(frame)
                    continue
                derived = check_seed(
                    defaults.seed + frame.index,
                    f"{self.source}: frame {frame.id!r} (#{frame.index}): seed (override seed {seed} + index)",
                )
                frames.append(frame.model_copy(update={"seed": derived}))
        return self.model_copy(update={"defaults": defaults, "frames": frames})


# --------------------------------------------------------------------------------------------------
# Raw file schema: what the user writes (ids, seeds and anchors optional), before resolution.


class _RawFrame(_Model):
    id: str | None = None
    prompt: str
    # Range-checked in loading._build, so the error names the frame by id rather than by position.
    seed: StrictInt | None = None


class _RawStory(_Model):
    id: str
    style: str | None = None
    subjects: list[Subject]
    anchors: list[str] | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    frames: list[_RawFrame]
    # Any: checked against StorySyncConfig in loading._build, whose errors name the option
    # (storysync.rfh_gamma); absent is {}, an explicit null is refused there as not a mapping.
    storysync: Any = Field(default_factory=dict)
    model: ModelSection = Field(default_factory=ModelSection)


# --------------------------------------------------------------------------------------------------
# One-line error text.


def _id_list(frames: Sequence[Frame], limit: int = 8) -> str:
    ids = [frame.id for frame in frames[:limit]]
    more = f", ... ({len(frames) - limit} more)" if len(frames) > limit else ""
    return ", ".join(ids) + more


def _format_loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_validation_error(source: str, exc: ValidationError, loc_prefix: str = "",
                             loc_parts: tuple[Any, ...] = ()) -> str:
    """Turn a pydantic error into one line: ``story.yaml: frames[2].seed: Input should be ...``.
    ``loc_parts`` go before each error's location (``("frames", 2)`` for a frame validated alone)."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = loc_prefix + _format_loc((*loc_parts, *err.get("loc", ())))
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            # Our own validators phrase messages to follow the field: "defaults.steps must be >= 1".
            text = f"{loc} {err['ctx']['error']}" if loc else str(err["ctx"]["error"])
        else:
            text = f"{loc}: {err['msg']}" if loc else str(err["msg"])
        parts.append(_collapse(text))
    shown = "; ".join(parts[:3])
    if len(parts) > 3:
        shown += f" (and {len(parts) - 3} more problems)"
    return f"{source}: {shown}"
