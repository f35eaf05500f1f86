"""The story file: loading, validation and prompt rendering.

A story is a YAML or JSON file (chosen by extension: ``.yaml``/``.yml``/``.json``)::

    id: ginger-cat
    style: "A watercolor illustration of"
    subjects:
      - name: cat
        description: "a ginger cat with a blue scarf"
        tokens: ["cat"]
    anchors: [beach, kitchen]
    defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: ""}
    frames:
      - id: beach
        prompt: "{cat} running on a beach at sunset"
        seed: 7
      - prompt: "{cat} reading a book in a kitchen"

``load_story`` turns it into a validated, immutable ``StorySpec`` (model-independent checks);
``validate_for_model`` adds the checks that need the model's tokenizer and latent size factor and
returns the subject-token positions the engine needs for the masks. Every problem is reported as a
one-line ``StorySpecError`` naming the file and, where relevant, the frame (id and 0-based index).
``load_benchmark`` turns a benchmark prompt file (the ConsiStory+ shape: categories of subject sets)
into many one-subject stories.

Deliberately plain Python + pydantic + yaml: no torch, diffusers or ray here, so the CLI can validate
a story before it starts anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import unicodedata
from collections.abc import Hashable, Iterable, Sequence
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from .errors import StorySpecError

__all__ = [
    "ID_PATTERN",
    "MAX_SEED",
    "Defaults",
    "Frame",
    "StorySpec",
    "Subject",
    "is_valid_id",
    "load_benchmark",
    "load_story",
    "slug",
    "validate_for_model",
]

# Story and frame ids end up in output paths (part files, image paths), so they are restricted to a
# set of characters that is safe on every filesystem and object store, and never contains "/" or "..".
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
# Subject names are used as ``{name}`` placeholders, so they must be valid format-field names.
_SUBJECT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Seeds are stored as Parquet int64 and fed to torch.Generator.manual_seed: keep them in int64 range.
MAX_SEED = 2**63 - 1
_EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}

# Strict numbers: YAML turns `yes` into True and pydantic's lax mode would accept it as 1, and a quoted
# "7" as 7; in a story file both are more likely mistakes than intent.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]


def is_valid_id(value: str) -> bool:
    """Return True when ``value`` is a valid story or frame id (``ID_PATTERN``)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


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
    """Sampling settings shared by every frame (frames render in lockstep with the anchors)."""

    steps: StrictInt = 20
    height: StrictInt = 512
    width: StrictInt = 512
    guidance_scale: StrictFloat = 5.0
    seed: StrictInt = 0
    negative_prompt: str = ""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _check_size(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive number of pixels, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int) -> int:
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be within [0, 2**63 - 1], got {value}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _check_guidance(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return float(value)

    @field_validator("negative_prompt")
    @classmethod
    def _check_negative(cls, value: str) -> str:
        return _collapse(value)


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
    """A validated story. ``anchors`` are frame ids, in frame-index order."""

    id: str
    style: str = ""
    subjects: list[Subject]
    anchors: list[str]
    defaults: Defaults
    frames: list[Frame]
    source: str = "<story>"
    # The benchmark category a story came from (``load_benchmark``); None for a story file.
    category: str | None = None

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
        """Return a copy with command-line overrides applied (``None`` keeps the story's value).

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
                derived = defaults.seed + frame.index
                if derived > MAX_SEED:
                    raise StorySpecError(
                        f"{self.source}: override seed={seed} gives frame {frame.id!r} (#{frame.index}) "
                        f"seed {derived}, beyond 2**63 - 1"
                    )
                frames.append(frame.model_copy(update={"seed": derived}))
        return self.model_copy(update={"defaults": defaults, "frames": frames})


# --------------------------------------------------------------------------------------------------
# Raw file schema: what the user writes (ids, seeds and anchors optional), before resolution.


class _RawFrame(_Model):
    id: str | None = None
    prompt: str
    seed: StrictInt | None = None


class _RawStory(_Model):
    id: str
    style: str | None = None
    subjects: list[Subject]
    anchors: list[str] | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    frames: list[_RawFrame]


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


def _format_validation_error(source: str, exc: ValidationError, loc_prefix: str = "") -> str:
    """Turn a pydantic error into one line: ``story.yaml: frames[2].seed: Input should be ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = loc_prefix + _format_loc(err.get("loc", ()))
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_text(text: str, kind: str, source: str) -> Any:
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorySpecError(
                f"{source}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = exc.problem or exc.context or "parse error"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise StorySpecError(_collapse(f"{source}:{where} invalid YAML: {problem}{context}")) from None
    except yaml.YAMLError as exc:
        raise StorySpecError(_collapse(f"{source}: invalid YAML: {exc}")) from None


def _render(template: str, style: str, subjects: dict[str, Subject], where: str) -> str:
    """Expand ``{name}`` placeholders and prefix the style; ``{{``/``}}`` are literal braces."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise StorySpecError(
            f"{where}: prompt {template!r} has unbalanced braces ({exc}); write {{{{ or }}}} for a literal brace"
        ) from None
    out: list[str] = []
    for literal, field_name, format_spec, conversion in pieces:
        out.append(literal)
        if field_name is None:
            continue
        if field_name not in subjects:
            known = ", ".join("{" + name + "}" for name in subjects)
            raise StorySpecError(
                f"{where}: unknown placeholder {{{field_name}}} in prompt {template!r} (subjects: {known})"
            )
        if format_spec or conversion:
            raise StorySpecError(
                f"{where}: placeholder {{{field_name}}} may not carry a format spec or conversion"
            )
        out.append(subjects[field_name].description)
    return _collapse(f"{style} {''.join(out)}")


def _build(raw: _RawStory, source: str, category: str | None = None) -> StorySpec:
    """Resolve defaults (ids, seeds, anchors) and run the model-independent cross-field checks."""
    if not is_valid_id(raw.id):
        raise StorySpecError(
            f"{source}: id {raw.id!r} must match {ID_PATTERN} (lowercase letters, digits, '-' and '_'; "
            "it is used in output paths)"
        )
    if not raw.subjects:
        raise StorySpecError(f"{source}: subjects: the story needs at least one subject")
    subjects: dict[str, Subject] = {}
    for position, subject in enumerate(raw.subjects):
        if subject.name in subjects:
            raise StorySpecError(f"{source}: subjects[{position}]: duplicate subject name {subject.name!r}")
        subjects[subject.name] = subject
    if not raw.frames:
        raise StorySpecError(f"{source}: frames: the story has no frames")

    style = _collapse(raw.style or "")
    defaults = raw.defaults
    frames: list[Frame] = []
    first_use: dict[str, int] = {}
    for index, raw_frame in enumerate(raw.frames):
        frame_id = raw_frame.id if raw_frame.id is not None else f"frame-{index:04d}"
        if not is_valid_id(frame_id):
            raise StorySpecError(
                f"{source}: frame {frame_id!r} (#{index}): id must match {ID_PATTERN} "
                "(lowercase letters, digits, '-' and '_'; it is used in output paths)"
            )
        where = f"{source}: frame {frame_id!r} (#{index})"
        if frame_id in first_use:
            raise StorySpecError(f"{where}: duplicate id, first used by frame #{first_use[frame_id]}")
        first_use[frame_id] = index
        if raw_frame.seed is not None:
            if not 0 <= raw_frame.seed <= MAX_SEED:
                raise StorySpecError(f"{where}: seed must be within [0, 2**63 - 1], got {raw_frame.seed}")
            seed = raw_frame.seed
        else:
            seed = defaults.seed + index
            if seed > MAX_SEED:
                raise StorySpecError(f"{where}: defaults.seed + index = {seed} is beyond 2**63 - 1")
        if not raw_frame.prompt.strip():
            raise StorySpecError(f"{where}: prompt is empty")
        prompt = _render(raw_frame.prompt, style, subjects, where)
        frames.append(
            Frame(
                id=frame_id,
                index=index,
                prompt=prompt,
                template=raw_frame.prompt,
                seed=seed,
                explicit_seed=raw_frame.seed is not None,
            )
        )

    if raw.anchors is None:
        anchors = [frame.id for frame in frames[:2]]
    else:
        if not raw.anchors:
            raise StorySpecError(
                f"{source}: anchors: the list is empty; name at least one frame or leave it out"
            )
        seen: set[str] = set()
        for position, anchor in enumerate(raw.anchors):
            if anchor in seen:
                raise StorySpecError(f"{source}: anchors[{position}]: frame {anchor!r} is listed twice")
            seen.add(anchor)
        if len(raw.anchors) > len(frames):
            raise StorySpecError(
                f"{source}: anchors: {len(raw.anchors)} anchors but the story has only {len(frames)} frame(s)"
            )
        for position, anchor in enumerate(raw.anchors):
            if anchor not in first_use:
                raise StorySpecError(
                    f"{source}: anchors[{position}]: no frame has id {anchor!r} (frame ids: {_id_list(frames)})"
                )
        # Canonical order (frame index), so listing the anchors in another order renders the same story.
        anchors = [frame.id for frame in frames if frame.id in seen]

    return StorySpec(
        id=raw.id,
        style=style,
        subjects=list(raw.subjects),
        anchors=anchors,
        defaults=defaults,
        frames=frames,
        source=source,
        category=category,
    )


def _read_document(source: str, noun: str) -> Any:
    """Read and parse a YAML/JSON file; ``noun`` ("story file", ...) names it in the errors."""
    kind = _EXTENSIONS.get(os.path.splitext(source)[1].lower())
    if kind is None:
        raise StorySpecError(f"{source}: unsupported {noun} extension; use .yaml, .yml or .json")
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise StorySpecError(f"{source}: {noun} not found") from None
    except IsADirectoryError:
        raise StorySpecError(f"{source}: is a directory, not a {noun}") from None
    except OSError as exc:
        raise StorySpecError(f"{source}: cannot read {noun}: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: editors on Windows like to start files with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StorySpecError(f"{source}: not UTF-8 text (byte {exc.start})") from None

    document = _parse_text(text, kind, source)
    if document is None:
        raise StorySpecError(f"{source}: the {noun} is empty")
    return document


def load_story(path: str | os.PathLike[str]) -> StorySpec:
    """Read, validate and resolve a story file (``.yaml``, ``.yml`` or ``.json``).

    Raises ``StorySpecError`` with a one-line message naming the file for every problem: a missing or
    unreadable file, invalid YAML/JSON, schema errors, no frames or subjects, bad or duplicate ids,
    invalid steps/seeds/sizes, unknown anchors or too many of them, unknown ``{placeholders}``.
    """
    source = os.fspath(path)
    document = _read_document(source, "story file")
    if not isinstance(document, dict):
        raise StorySpecError(
            f"{source}: the top level must be a mapping (id, subjects, frames, ...), got {type(document).__name__}"
        )
    try:
        raw = _RawStory.model_validate(document)
    except ValidationError as exc:
        raise StorySpecError(_format_validation_error(source, exc)) from None
    return _build(raw, source)


# --------------------------------------------------------------------------------------------------
# Benchmark prompt sets (ConsiStory+ shape): many one-subject stories in one file.

StrictStr = Annotated[str, Strict()]
# The subject's placeholder name in benchmark stories: frame templates read "{subject} <setting>".
BENCHMARK_SUBJECT = "subject"


class _RawBenchmarkSet(_Model):
    concept_token: StrictStr
    subject: StrictStr
    style: StrictStr = ""
    settings: list[StrictStr] = Field(min_length=1)

    @field_validator("concept_token", "subject")
    @classmethod
    def _check_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("settings")
    @classmethod
    def _check_settings(cls, value: list[str]) -> list[str]:
        for position, setting in enumerate(value):
            if not setting.strip():
                raise ValueError(f"must not contain an empty setting (item {position})")
        return value


def slug(text: str) -> str:
    """Lowercase ``text`` and join its runs of letters and digits with ``-`` ("Caesar salad" -> "caesar-salad")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# Readable parts of a benchmark story id; the hash at the end is what keeps ids apart.
_ID_CATEGORY_CHARS = 24
_ID_TOKEN_CHARS = 16
_ID_HASH_CHARS = 8


def _id_slug(text: str, limit: int) -> str:
    """Like ``slug`` but keeping ``_`` ("fairy_tales") and folding accents ("Crème" -> "creme"),
    cut to ``limit`` characters; "" when nothing id-safe is left."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9_]+", "-", folded.lower()).strip("-_")[:limit].strip("-_")


def _benchmark_id(category: str, index: int, concept_token: str) -> str:
    """The story id of set ``index`` of ``category``; see ``load_benchmark`` for the rule."""
    digest = hashlib.sha256(json.dumps([category, index], ensure_ascii=False).encode("utf-8")).hexdigest()
    readable = "-".join(
        part
        for part in (
            _id_slug(category, _ID_CATEGORY_CHARS),
            f"{index:03d}",
            _id_slug(concept_token, _ID_TOKEN_CHARS),
        )
        if part
    )
    # Only a huge index could make this longer than 64; the hash is never cut.
    readable = readable[: 64 - _ID_HASH_CHARS - 1].rstrip("-")
    return f"{readable}-{digest[:_ID_HASH_CHARS]}"


def _benchmark_story(
    raw: _RawBenchmarkSet, category: str, index: int, defaults: Defaults, source: str, story_id: str
) -> StorySpec:
    where = f"{source}: {category}[{index}]"
    # Braces in a setting are literal text, not placeholders.
    frames = [
        _RawFrame(
            id=f"s{position:02d}",
            prompt="{" + BENCHMARK_SUBJECT + "} " + setting.replace("{", "{{").replace("}", "}}"),
        )
        for position, setting in enumerate(raw.settings)
    ]
    try:
        story = _RawStory(
            id=story_id,
            style=raw.style,
            subjects=[Subject(name=BENCHMARK_SUBJECT, description=raw.subject, tokens=[raw.concept_token])],
            defaults=defaults,
            frames=frames,
        )
    except ValidationError as exc:
        raise StorySpecError(_format_validation_error(where, exc)) from None
    # The story's source names the set, so later errors (e.g. validate_for_model) point at it.
    return _build(story, f"{source}:{category}[{index}]", category=category)


def load_benchmark(
    path: str | os.PathLike[str],
    *,
    categories: list[str] | None = None,
    limit: int | None = None,
    defaults: dict[str, Any] | Defaults | None = None,
) -> list[StorySpec]:
    """Read a benchmark prompt file and return one one-subject story per subject set.

    The file maps categories to lists of subject sets (the ConsiStory+ shape)::

        animals:
          - concept_token: phoenix                       # the subject-mask word
            subject: A phoenix with bright orange feathers
            style: A fiery and majestic illustration of
            settings: [rising from a fiery ashes, soaring through a glowing sky]

    Set ``i`` of ``category`` becomes a story with one subject (``{subject}``, tokens
    ``[concept_token]``), the set's style, and one frame per setting (ids ``s00``, ``s01``, ...;
    prompt ``"{style} {subject} {setting}"``); anchors are the first two frames. ``story.category``
    is the category name as written in the file. ``categories`` keeps only those categories (file
    order), ``limit`` keeps the first ``limit`` sets of each category, and ``defaults`` overrides
    the ``Defaults`` fields (steps, height, width, guidance_scale, seed, negative_prompt) of every
    story.

    Story ids: ``{category slug}-{i:03d}-{token slug}-{hash}``. A slug is the name lowercased with
    accents folded to ASCII, every run of characters other than ``a-z``, ``0-9`` and ``_`` replaced
    by ``-``, ``-``/``_`` stripped from both ends, then cut to 24 (category) or 16 (concept token)
    characters and stripped again; an empty slug is left out with its ``-``. ``hash`` is the first
    8 hex digits of the SHA-256 of ``json.dumps([category, i], ensure_ascii=False)`` in UTF-8 (the
    exact category name). Set 0 of ``animals`` with token ``Snow Leopard`` is
    ``animals-000-snow-leopard-<8 hex>``. So an id always matches ``ID_PATTERN`` (at most 64
    characters) whatever the category is called; it depends only on the set's category and
    position, not on which sets are selected, so a rerun with other ``categories``/``limit`` finds
    the frames it already rendered; and two sets never share an id (the hash tells apart names
    that slug alike, such as ``animals`` set 0 with token ``000 cat`` and ``animals-000`` set 0
    with token ``cat``). Ids are checked to be unique over the whole file, selected or not.

    Every entry of the file is checked, selected or not; a problem raises a one-line
    ``StorySpecError`` naming the file and the category/index.
    """
    source = os.fspath(path)
    document = _read_document(source, "benchmark file")
    if not isinstance(document, dict):
        raise StorySpecError(
            f"{source}: the top level must map category names to lists of subject sets, "
            f"got {type(document).__name__}"
        )
    if isinstance(defaults, Defaults):
        resolved = defaults
    else:
        try:
            resolved = Defaults.model_validate(dict(defaults or {}))
        except ValidationError as exc:
            raise StorySpecError(_format_validation_error(source, exc, loc_prefix="defaults.")) from None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise StorySpecError(f"{source}: limit must be a whole number >= 1, got {limit!r}")

    parsed: dict[str, list[_RawBenchmarkSet]] = {}
    for category, entries in document.items():
        if not isinstance(category, str) or not category:
            raise StorySpecError(f"{source}: category {category!r}: category names must be non-empty text")
        if not isinstance(entries, list) or not entries:
            got = type(entries).__name__ if not isinstance(entries, list) else "an empty list"
            raise StorySpecError(f"{source}: {category}: expected a non-empty list of subject sets, got {got}")
        sets = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise StorySpecError(
                    f"{source}: {category}[{index}]: expected a mapping with concept_token, subject, style "
                    f"and settings, got {type(entry).__name__}"
                )
            try:
                sets.append(_RawBenchmarkSet.model_validate(entry))
            except ValidationError as exc:
                raise StorySpecError(
                    _format_validation_error(source, exc, loc_prefix=f"{category}[{index}].")
                ) from None
        parsed[category] = sets

    if categories is not None:
        wanted = list(dict.fromkeys(categories))
        if not wanted:
            raise StorySpecError(f"{source}: categories: the list is empty; name at least one or leave it out")
        unknown = [name for name in wanted if name not in parsed]
        if unknown:
            raise StorySpecError(
                f"{source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
                f"(the file has: {', '.join(parsed)})"
            )
        selected = [name for name in parsed if name in set(wanted)]
    else:
        selected = list(parsed)

    # The ids of every set, selected or not, so a clash is found whatever the selection.
    ids: dict[tuple[str, int], str] = {}
    owner: dict[str, tuple[str, int]] = {}
    for category, sets in parsed.items():
        for index, raw in enumerate(sets):
            story_id = _benchmark_id(category, index, raw.concept_token)
            if not is_valid_id(story_id):  # cannot happen by construction; never write a bad path
                raise StorySpecError(
                    f"{source}: {category}[{index}]: story id {story_id!r} does not match {ID_PATTERN}"
                )
            if story_id in owner:
                first = owner[story_id]
                raise StorySpecError(
                    f"{source}: {first[0]}[{first[1]}] and {category}[{index}] both get story id {story_id!r}; "
                    "rename one of the categories"
                )
            owner[story_id] = (category, index)
            ids[category, index] = story_id

    stories = []
    for category in selected:
        for index, raw in enumerate(parsed[category][:limit]):
            stories.append(_benchmark_story(raw, category, index, resolved, source, ids[category, index]))
    return stories


# --------------------------------------------------------------------------------------------------
# Model-dependent checks.


def _token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    encoded = tokenizer(text, truncation=False, add_special_tokens=special)
    ids = encoded["input_ids"] if isinstance(encoded, dict) else encoded.input_ids
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _find_runs(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    width = len(needle)
    return [
        start
        for start in range(len(haystack) - width + 1)
        if list(haystack[start : start + width]) == list(needle)
    ]


def validate_for_model(spec: StorySpec, tokenizer: Any, size_factor: int) -> list[list[list[int]]]:
    """Check the story against a model and return the subject-token positions.

    ``tokenizer`` is a Hugging Face CLIPTokenizer-like object: callable (``truncation=False``,
    ``add_special_tokens=...``) returning ``.input_ids``, with ``.model_max_length``.
    ``size_factor`` is what height and width must be multiples of (VAE factor x patch size).

    Errors (``StorySpecError``): height/width not a multiple of ``size_factor``; a frame prompt or the
    negative prompt longer than ``model_max_length`` tokens (counted untruncated, start/end tokens
    included); a subject token word whose ids (tokenized without start/end tokens) do not occur as a
    contiguous run in a frame's tokenized prompt. Every subject must appear in every frame: the masks
    of StorySync come from the subject tokens, so a frame without them has nothing to share.
    Multi-subject stories where a subject sits out a scene are a later feature.

    Returns ``positions[frame][subject]``: sorted indices into the frame's input_ids (the same in the
    padded 77-long sequence; BOS is index 0) of every occurrence of every token word of the subject.
    Frames and subjects are in ``spec.frames`` / ``spec.subjects`` order.
    """
    if size_factor < 1:
        raise ValueError(f"size_factor must be >= 1, got {size_factor}")
    source = spec.source
    for name in ("height", "width"):
        value = getattr(spec.defaults, name)
        if value % size_factor:
            raise StorySpecError(
                f"{source}: defaults.{name}={value} is not a multiple of {size_factor} required by the model"
            )

    limit = int(tokenizer.model_max_length)
    if spec.defaults.negative_prompt:
        count = len(_token_ids(tokenizer, spec.defaults.negative_prompt, special=True))
        if count > limit:
            raise StorySpecError(
                f"{source}: defaults.negative_prompt is {count} tokens long; the model's text encoder takes at "
                f"most {limit} (start/end tokens included)"
            )

    subject_words: list[list[tuple[str, list[int]]]] = []
    for subject in spec.subjects:
        words = []
        for word in subject.tokens:
            ids = _token_ids(tokenizer, word, special=False)
            if not ids:
                raise StorySpecError(
                    f"{source}: subject {subject.name!r} token {word!r} tokenizes to nothing with this model"
                )
            words.append((word, ids))
        subject_words.append(words)

    positions: list[list[list[int]]] = []
    for frame in spec.frames:
        where = f"{source}: frame {frame.id!r} (#{frame.index})"
        ids = _token_ids(tokenizer, frame.prompt, special=True)
        if len(ids) > limit:
            raise StorySpecError(
                f"{where}: prompt is {len(ids)} tokens long; the model's text encoder takes at most {limit} "
                f"(start/end tokens included): shorten the prompt, the style or the subject description"
            )
        per_subject: list[list[int]] = []
        for subject, words in zip(spec.subjects, subject_words):
            found: set[int] = set()
            for word, word_ids in words:
                starts = _find_runs(ids, word_ids)
                if not starts:
                    raise StorySpecError(
                        f"{where}: subject {subject.name!r} token {word!r} does not occur in the tokenized "
                        f'prompt "{frame.prompt}" (every subject must appear in every frame: write '
                        f"{{{subject.name}}} in the prompt, or use tokens that its description contains)"
                    )
                for start in starts:
                    found.update(range(start, start + len(word_ids)))
            per_subject.append(sorted(found))
        positions.append(per_subject)
    return positions
