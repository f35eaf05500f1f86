"""Reading a story file: YAML/JSON parsing, prompt rendering, and resolving into a ``StorySpec``.

``load_story`` reads a file (``_read_document``: extension, UTF-8 with or without BOM, duplicate
YAML keys refused; YAML with libyaml's C parser when there is one; JSON Lines line by line; Parquet
through ``io.story_table``), validates it against the raw schema, and ``_build`` resolves ids, seeds and
anchors, renders the prompts (``_render``) and checks the ``storysync:`` section. Every problem is
one ``StorySpecError`` line naming the file. ``story.benchmark`` reuses ``_read_document`` and
``_build`` for benchmark prompt files.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from ..core.config import ConfigError, StorySyncConfig
from ..core.ids import ID_PATTERN, is_valid_id
from ..errors import StorySpecError
from .schema import (
    Frame,
    ModelSection,
    StorySpec,
    Subject,
    _collapse,
    _format_validation_error,
    _id_list,
    _RawFrame,
    _RawStory,
    check_seed,
)

__all__ = ["load_story"]

_EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl"}
_STORY_EXTENSIONS = {**_EXTENSIONS, ".parquet": "parquet"}


# libyaml's C parser when PyYAML was built with it (about ten times faster on a long story), else
# the pure-Python one; the constructor, the duplicate-key check and the error marks are the same.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc, valid-type]
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


def _parse_json_lines(text: str, source: str) -> dict[str, Any]:
    """A JSON Lines story: the first line is the story without its frames (id, style, subjects,
    defaults, ...), every later line one frame (``{"id": ..., "prompt": ..., "seed": ...}``); blank
    lines are skipped. The format a program writes a long story in, one frame at a time; errors
    name the line."""
    header: dict[str, Any] | None = None
    frames: list[Any] = _CheckedFrames()
    for number, line in _lines(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StorySpecError(f"{source}: line {number}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise StorySpecError(f"{source}: line {number}: must be a JSON object, got {type(value).__name__}")
        if header is None:
            if "frames" in value:
                raise StorySpecError(f"{source}: line {number}: the first line is the story without its frames; "
                                     "write one frame per line after it")
            header = value
            continue
        try:
            _RawFrame.model_validate(value)
        except ValidationError as exc:
            raise StorySpecError(_format_validation_error(f"{source}: line {number}", exc)) from None
        frames.append(value)
    if header is None:
        raise StorySpecError(f"{source}: the story file is empty")
    return {**header, "frames": frames}


class _CheckedFrames(list):  # type: ignore[type-arg]
    """Frames already validated one by one (JSON Lines, line by line): not validated again."""


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of ``text`` without a list of every line (a 10^6-frame file: 10^6 strings
    at once otherwise)."""
    start, number = 0, 1
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield number, text[start:end]
        start, number = end + 1, number + 1


def _raw_frame(value: Any, position: int, source: str, checked: bool) -> _RawFrame:
    """One frame of a story file as the raw schema; errors name ``frames[position]``. Frames are
    validated one at a time while the story is built, so a long story never holds a raw object of
    every frame besides its resolved ``Frame``."""
    if isinstance(value, _RawFrame):
        return value
    if checked:
        return _RawFrame.model_construct(**value)
    try:
        return _RawFrame.model_validate(value)
    except ValidationError as exc:
        raise StorySpecError(_format_validation_error(source, exc, loc_parts=("frames", position))) from None


def _parse_text(text: str, kind: str, source: str) -> Any:
    if kind == "jsonl":
        return _parse_json_lines(text, source)
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


_FRAME_FIELDS = set(Frame.model_fields)  # shared by every Frame built here; frozen models never change it


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


def _check_storysync(section: Any, source: str) -> dict[str, Any]:
    """Check the ``storysync:`` section against ``StorySyncConfig``; return it as written.

    The config module owns the option names, types and ranges; here its ``ConfigError`` only gets
    the file and the section name in front (``story.yaml: storysync.rfh_gamma: must be ...``).
    """
    if not isinstance(section, dict):
        got = "null" if section is None else type(section).__name__
        raise StorySpecError(
            f"{source}: storysync: must be a mapping of StorySync options to values "
            f"(rfh_gamma: 0.5, ...), got {got}"
        )
    try:
        StorySyncConfig.from_dict(section)
    except ConfigError as exc:
        raise StorySpecError(_collapse(f"{source}: storysync.{exc.key}: {exc.problem}")) from None
    # A copy, so the spec does not share the parsed document's mutable lists.
    return json.loads(json.dumps(section))


def _resolve_model_section(section: ModelSection, source: str) -> ModelSection:
    """The ``model:`` section with its LoRA paths made absolute: a relative path is relative to the
    story file's folder (a story built in Python, without a file, keeps its paths as given)."""
    if not section.loras or not os.path.isfile(source):
        return section
    folder = os.path.dirname(os.path.abspath(source))
    loras = [lora.model_copy(update={"path": os.path.join(folder, os.path.expanduser(lora.path))})
             for lora in section.loras]
    return section.model_copy(update={"loras": loras})


def _build(raw: _RawStory, source: str, category: str | None = None,
           frames_in: Sequence[Any] | None = None) -> StorySpec:
    """Resolve defaults (ids, seeds, anchors) and run the model-independent cross-field checks.

    Sampling defaults left out stay ``None`` (the model's own, resolved by the engine). The frames
    are ``raw.frames``, or ``frames_in``: the file's frame values, validated here one at a time.
    """
    raw_frames: Sequence[Any] = raw.frames if frames_in is None else frames_in
    checked = isinstance(raw_frames, _CheckedFrames)
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
    if not raw_frames:
        raise StorySpecError(f"{source}: frames: the story has no frames")

    style = _collapse(raw.style or "")
    defaults = raw.defaults
    frames: list[Frame] = []
    first_use: dict[str, int] = {}
    for index, value in enumerate(raw_frames):
        raw_frame = _raw_frame(value, index, source, checked)
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
            seed = check_seed(raw_frame.seed, f"{where}: seed")
        else:
            seed = check_seed(defaults.seed + index, f"{where}: seed (defaults.seed + index)")
        if not raw_frame.prompt.strip():
            raise StorySpecError(f"{where}: prompt is empty")
        prompt = _render(raw_frame.prompt, style, subjects, where)
        # Every value is checked above: built without a second validation, and with one shared
        # fields-set (pydantic's per-instance set of 6 names is 728 bytes, more than the frame
        # itself: 10^6 frames, 1.2 GB against 0.45 GB).
        frames.append(
            Frame.model_construct(
                _FRAME_FIELDS,
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
        storysync=_check_storysync(raw.storysync, source),
        model=_resolve_model_section(raw.model, source),
    )


def _read_parquet_story(source: str) -> dict[str, Any]:
    """A Parquet story (``io.story_table``): the header from the file's metadata or its sidecar
    file, the frames from the rows."""
    from ..io.story_table import SIDECAR_SUFFIXES, read_story_table, sidecar_path  # pyarrow: only here

    header, frames = read_story_table(source)
    if header is None:
        sidecar = sidecar_path(source)
        if sidecar is None:
            stem = os.path.splitext(source)[0]
            raise StorySpecError(
                f"{source}: no story header: write the story without its frames into the file's metadata "
                f"(storysync.story) or beside it as {stem}{SIDECAR_SUFFIXES[0]}"
            )
        header = _read_document(sidecar, "story header")
        if not isinstance(header, dict):
            raise StorySpecError(f"{sidecar}: the story header must be a mapping (id, subjects, ...)")
        source = sidecar
    if "frames" in header:
        raise StorySpecError(f"{source}: the header is the story without its frames; the rows are the frames")
    return {**header, "frames": frames}


def _read_document(source: str, noun: str) -> Any:
    """Read and parse a YAML/JSON file; ``noun`` ("story file", ...) names it in the errors."""
    extension = os.path.splitext(source)[1].lower()
    kind = (_STORY_EXTENSIONS if noun == "story file" else _EXTENSIONS).get(extension)
    if kind is None:
        more = ", .jsonl or .parquet" if noun == "story file" else " or .jsonl"
        raise StorySpecError(f"{source}: unsupported {noun} extension; use .yaml, .yml, .json{more}")
    if kind == "parquet":
        return _read_parquet_story(source)
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
    """Read, validate and resolve a story file (``.yaml``, ``.yml``, ``.json``; ``.jsonl``: a
    header line, then one frame per line; ``.parquet``: one row per frame, see ``io.story_table``).

    Raises ``StorySpecError`` with a one-line message naming the file for every problem: a missing or
    unreadable file, invalid YAML/JSON, schema errors, no frames or subjects, bad or duplicate ids,
    invalid steps/seeds/sizes, unknown anchors or too many of them, unknown ``{placeholders}``, a
    ``storysync:`` section that is not a mapping or has an unknown option or a bad value.
    """
    source = os.fspath(path)
    document = _read_document(source, "story file")
    if not isinstance(document, dict):
        raise StorySpecError(
            f"{source}: the top level must be a mapping (id, subjects, frames, ...), got {type(document).__name__}"
        )
    frames = document.get("frames")
    if isinstance(frames, list):  # validated frame by frame in _build: no raw object of every frame
        document = {**document, "frames": []}
    try:
        raw = _RawStory.model_validate(document)
    except ValidationError as exc:
        raise StorySpecError(_format_validation_error(source, exc)) from None
    return _build(raw, source, frames_in=frames if isinstance(frames, list) else None)


