"""Checks of a story against a model: token lengths, subject tokens and image size.

``validate_for_model`` needs the model's tokenizer and latent size factor, so it runs once the model
is known (still without loading weights), after the model-independent checks of ``load_story``. It
returns the subject-token positions the engine needs for the masks.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import StorySpecError
from .schema import StorySpec

__all__ = ["validate_for_model"]

# Model-dependent checks.


def _token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    encoded = tokenizer(text, truncation=False, add_special_tokens=special)
    ids = encoded["input_ids"] if isinstance(encoded, dict) else encoded.input_ids
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


_WORDS: weakref.WeakKeyDictionary[Any, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    """A subject token word's ids (no start/end tokens), once per tokenizer and word: a suite of
    10^4 subject sets asks for the same few words 10^4 times, a tokenizer call (~0.2 ms) each."""
    try:
        known = _WORDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        return _token_ids(tokenizer, word, special=False)
    if word not in known:
        known[word] = _token_ids(tokenizer, word, special=False)
    return list(known[word])


BATCH = 4096  # prompts per tokenizer call: one Rust call each for a fast tokenizer, bounded memory


def _token_ids_of_all(tokenizer: Any, texts: Sequence[str]) -> Iterator[list[int]]:
    """The ids of every text with start/end tokens, as :func:`_token_ids` gives them one by one,
    from batched calls (10^5 prompts: about 7.5 s one by one on this 2-CPU VM)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer itself: what the transformers call returns without truncation or padding,
        # without building a BatchEncoding per text (about 2.5x faster on 10^4 prompts).
        for first in range(0, len(texts), BATCH):
            for encoding in backend.encode_batch(list(texts[first : first + BATCH]), add_special_tokens=True):
                yield list(encoding.ids)
        return
    for first in range(0, len(texts), BATCH):
        chunk = list(texts[first : first + BATCH])
        encoded = tokenizer(chunk, truncation=False, add_special_tokens=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) else getattr(encoded, "input_ids", None)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not isinstance(ids, list) or len(ids) != len(chunk) or not all(isinstance(x, list) for x in ids):
            ids = [_token_ids(tokenizer, text, special=True) for text in chunk]  # a tokenizer without batches
        for row in ids:
            yield [int(i) for i in row]


def _find_runs(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Every start of ``needle`` as a contiguous run in ``haystack``. Only where the first token
    matches is the rest compared (this runs once per frame and subject word: 10^6 frames)."""
    width, first = len(needle), needle[0]
    rest = list(needle[1:])
    last = len(haystack) - width
    return [start for start, token in enumerate(haystack)
            if token == first and start <= last and list(haystack[start + 1 : start + width]) == rest]


def validate_for_model(
    spec: StorySpec, tokenizer: Any, size_factor: int, *, size: tuple[int, int] | None = None,
    max_tokens: int | None = None,
) -> list[list[list[int]]]:
    """Check the story against a model and return the subject-token positions.

    ``tokenizer`` is a Hugging Face CLIPTokenizer-like object: callable (``truncation=False``,
    ``add_special_tokens=...``) returning ``.input_ids``, with ``.model_max_length``.
    ``size_factor`` is what height and width must be multiples of (VAE factor x patch size).
    ``size`` is the resolved ``(height, width)`` the job will render at (the story's values, or the
    model's defaults where the story leaves them out); when given it is what is checked, otherwise
    only the height/width the story sets are (a ``None`` one is the model's default, which the
    model is trusted to get right). ``max_tokens``, when given, is the text length the job encodes
    (``ModelInfo.text_len``) where it is shorter than ``model_max_length`` (FLUX.1-schnell: 256 of
    the T5 tokenizer's 512): prompts are checked against the shorter.

    Errors (``StorySpecError``): height/width not a multiple of ``size_factor``; a frame prompt or the
    negative prompt longer than ``model_max_length`` tokens (counted untruncated, start/end tokens
    included); a subject token word whose ids (tokenized without start/end tokens) do not occur as a
    contiguous run in a frame's tokenized prompt. Every subject must appear in every frame: the masks
    of StorySync come from the subject tokens, so a frame without them has nothing to share.
    Multi-subject stories where a subject sits out a scene are a later feature.

    Returns ``positions[frame][subject]``: sorted indices into the frame's input_ids (the same in the
    padded 77-long sequence; BOS is index 0) of every occurrence of every token word of the subject.
    Frames and subjects are in ``story.frames`` / ``story.subjects`` order.
    """
    if size_factor < 1:
        raise ValueError(f"size_factor must be >= 1, got {size_factor}")
    if size is not None and (
        len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
    ):
        raise ValueError(f"size must be (height, width) in whole pixels >= 1, got {size!r}")
    source = spec.source
    for axis, name in enumerate(("height", "width")):
        story_value = getattr(spec.defaults, name)
        value = story_value if size is None else size[axis]
        if value is None:
            continue
        # Name the value after where it came from, so the user knows what to change.
        what = f"defaults.{name}={value}" if story_value is not None else f"the model's default {name} ({value})"
        if value % size_factor:
            raise StorySpecError(f"{source}: {what} is not a multiple of {size_factor} required by the model")

    limit = int(tokenizer.model_max_length)
    if max_tokens is not None:
        limit = min(limit, int(max_tokens))
    # None (no negative prompt) and "" (the empty prompt) have nothing to count.
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
            ids = _word_ids(tokenizer, word)
            if not ids:
                raise StorySpecError(
                    f"{source}: subject {subject.name!r} token {word!r} tokenizes to nothing with this model"
                )
            words.append((word, ids))
        subject_words.append(words)

    # The same story checked again with the same tokenizer (jobs/make_dataset.py checks every
    # subject set, then plans each): the positions of the first check, not a second tokenization.
    key = (limit, tuple(tuple(tuple(ids) for _, ids in words) for words in subject_words),
           tuple(frame.prompt for frame in spec.frames))
    checked = _checked_for(tokenizer)
    known = checked.get(key) if checked is not None else None
    if known is not None:
        return known
    positions: list[list[list[int]]] = []
    shared: dict[tuple[tuple[int, ...], ...], list[list[int]]] = {}
    all_ids = _token_ids_of_all(tokenizer, [frame.prompt for frame in spec.frames])
    for frame, ids in zip(spec.frames, all_ids):
        where = f"{source}: frame {frame.id!r} (#{frame.index})"
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
        # Frames written from one template have the same positions: one shared list for all of
        # them (never mutated; 10^6 frames hold one list, not 10^6).
        run = tuple(tuple(p) for p in per_subject)
        positions.append(shared.setdefault(run, per_subject))
    if checked is not None:
        checked.put(key, positions)
    return positions


class _Checked:
    """The positions of the stories checked with one tokenizer, the oldest dropped first once
    they hold more than ``CHECKED_FRAMES`` frames."""

    def __init__(self) -> None:
        self.stories: OrderedDict[Any, list[list[list[int]]]] = OrderedDict()
        self.frames = 0

    def get(self, key: Any) -> list[list[list[int]]] | None:
        return self.stories.get(key)

    def put(self, key: Any, positions: list[list[list[int]]]) -> None:
        if key in self.stories:
            return
        self.stories[key] = positions
        self.frames += len(positions)
        while self.frames > CHECKED_FRAMES and len(self.stories) > 1:
            _, dropped = self.stories.popitem(last=False)
            self.frames -= len(dropped)


_CHECKED: weakref.WeakKeyDictionary[Any, _Checked] = weakref.WeakKeyDictionary()
CHECKED_FRAMES = 2_000_000  # frames whose positions are kept per tokenizer


def _checked_for(tokenizer: Any) -> _Checked | None:
    try:
        return _CHECKED.setdefault(tokenizer, _Checked())
    except TypeError:  # a tokenizer that cannot be weakly referenced: no memory of earlier checks
        return None
