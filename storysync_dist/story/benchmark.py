"""Benchmark prompt sets (the ConsiStory+ shape): many one-subject stories from one file.

``load_benchmark`` turns each subject set of each category into a ``StorySpec`` (with
``story.category`` set), ``slug`` and the story-id rule (``_benchmark_id``) make ids that are
readable, valid and stable whatever the selection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from typing import Annotated, Any

from pydantic import Field, Strict, ValidationError, field_validator

from ..core.ids import ID_PATTERN, is_valid_id
from ..errors import StorySpecError
from .loading import _build, _read_document
from .schema import Defaults, StorySpec, Subject, _format_validation_error, _Model, _RawFrame, _RawStory

__all__ = ["BENCHMARK_SUBJECT", "load_benchmark", "slug", "subject_tokens"]

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


# Words a multi-word concept token may hold that name nothing ("loaf of bread", "mist from a waterfall"):
# left out when the token is matched word by word.
_STOP_WORDS = frozenset({"a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "the", "to", "with"})
_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")


def _phrase(phrase: str, text: str, *, ignore_case: bool) -> str | None:
    """The span of ``text`` that is ``phrase`` as whole words (any white space between them), as
    written in ``text``; None when there is none."""
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"
    found = re.search(pattern, text, re.IGNORECASE if ignore_case else 0)
    return " ".join(found.group(0).split()) if found else None


def subject_tokens(concept_token: str, subject: str) -> list[str]:
    """The subject tokens (``Subject.tokens``) of a benchmark set: the words whose cross-attention
    gives the subject mask, spelled as the subject text spells them.

    - The concept token as written, when the subject contains it as a phrase (whole words): the
      common case, which keeps every such set exactly as it was.
    - Else the phrase as the subject writes it, when it is there but in another case ("Snow
      Leopard" in "A snow leopard"): CLIP tokenizers lowercase, T5's do not.
    - Else word by word, the way a story's list of tokens is matched: the concept token's words
      except stop words (of, a, the, from, ...), each as the subject spells it, in any order and
      any case ("loaf of bread" in "A crusty loaf of freshly baked bread" -> ``["loaf", "bread"]``,
      "waterfall mist" in "Mist from a waterfall" -> ``["waterfall", "Mist"]``); a word that the
      subject has only as a plural ("macaron" in "delicate macarons") is taken as the plural.
      A word that the subject lacks stays as written: ``validate_for_model`` then refuses the set
      unless the word is in every frame prompt anyway.
    """
    words = _WORD_RE.findall(concept_token)
    if not words or _phrase(concept_token, subject, ignore_case=False) is not None:
        return [concept_token]
    phrase = _phrase(concept_token, subject, ignore_case=True)
    if phrase is not None:
        return [phrase]
    content = [word for word in words if word.lower() not in _STOP_WORDS] or words
    by_lower: dict[str, str] = {}
    for word in _WORD_RE.findall(subject):
        by_lower.setdefault(word.lower(), word)
    tokens: list[str] = []
    for word in content:
        lower = word.lower()
        spelled = by_lower.get(lower) or by_lower.get(lower + "s") or by_lower.get(lower + "es") or word
        if spelled not in tokens:
            tokens.append(spelled)
    return tokens


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
            subjects=[Subject(name=BENCHMARK_SUBJECT, description=raw.subject, tokens=subject_tokens(raw.concept_token, raw.subject))],
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
    ``subject_tokens(concept_token, subject)``: ``[concept_token]`` when the subject contains it as
    written, else its words as the subject spells them), the set's style, and one frame per setting (ids ``s00``, ``s01``, ...;
    prompt ``"{style} {subject} {setting}"``); anchors are the first two frames. ``story.category``
    is the category name as written in the file. ``categories`` keeps only those categories (file
    order), ``limit`` keeps the first ``limit`` sets of each category, and ``defaults`` sets the
    ``Defaults`` fields (steps, height, width, guidance_scale, seed, negative_prompt) of every
    story; those left out are ``None``, the model's own (seed: 0).

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


