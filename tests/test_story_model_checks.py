"""A story against a model (``story/model_checks.py``): subject-token positions, prompt lengths
and image sizes checked with the model's real CLIP tokenizer, each problem a one-line error."""

from __future__ import annotations

import pathlib

import pytest
from _stories import CAT_STORY, write_story_text

from storysync_dist.errors import StorySpecError
from storysync_dist.story import load_story, validate_for_model


@pytest.fixture(scope="module")
def clip_tokenizer():
    from storysync_dist.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def test_validate_for_model_returns_token_positions(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
    positions = validate_for_model(spec, clip_tokenizer, 8)
    assert len(positions) == 3 and all(len(per_frame) == 1 for per_frame in positions)
    cat_id = clip_tokenizer("cat", add_special_tokens=False).input_ids
    for frame, per_frame in zip(spec.frames, positions):
        padded = clip_tokenizer(frame.prompt, padding="max_length", max_length=77).input_ids
        assert padded[0] == clip_tokenizer.bos_token_id
        assert per_frame[0], frame.id
        assert all(padded[p] == cat_id[0] for p in per_frame[0])
    # "A watercolor illustration of a ginger cat": BOS a watercolor illustration of a ginger cat -> 7.
    assert positions[0] == [[7]]


def test_validate_every_occurrence_and_multi_token_words(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    path = write_story_text(
        tmp_path,
        """\
        id: robo
        subjects: [{name: bot, description: "a shiny robot", tokens: [robot, "shiny robot"]}]
        frames: [{prompt: "{bot} next to another robot"}]
        """,
    )
    spec = load_story(path)
    tokens = clip_tokenizer.convert_ids_to_tokens(clip_tokenizer(spec.frames[0].prompt).input_ids)
    assert tokens[:8] == [
        "<|startoftext|>",
        "a</w>",
        "shiny</w>",
        "robot</w>",
        "next</w>",
        "to</w>",
        "another</w>",
        "robot</w>",
    ]
    # "robot" at 3 and 7, "shiny robot" at 2-3: every occurrence of every word, sorted, no duplicates.
    assert validate_for_model(spec, clip_tokenizer, 8) == [[[2, 3, 7]]]


def test_validate_missing_subject_token(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace("{cat} reading a book", "a dog reading a book")))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8)
    message = str(info.value)
    assert (
        "story.yaml: frame 'frame-0001' (#1): subject 'cat' token 'cat' does not occur in the tokenized prompt"
        in message
    )
    assert '"A watercolor illustration of a dog reading a book in a kitchen"' in message


def test_validate_prompt_too_long(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    long_prompt = "{cat} " + "very " * 80 + "happy"
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace("{cat} in a garden", long_prompt)))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8)
    message = str(info.value)
    count = len(clip_tokenizer(spec.frames[2].prompt, truncation=False).input_ids)
    assert "story.yaml: frame 'garden' (#2)" in message
    assert f"{count} tokens" in message and "at most 77" in message


def test_validate_negative_prompt_too_long(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(
        write_story_text(tmp_path, CAT_STORY.replace('negative_prompt: ""', 'negative_prompt: "' + "ugly " * 90 + '"'))
    )
    with pytest.raises(StorySpecError, match=r"defaults\.negative_prompt is \d+ tokens long.*at most 77"):
        validate_for_model(spec, clip_tokenizer, 8)


def test_validate_size_factor(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace("height: 256", "height: 250")))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8)
    assert str(info.value).endswith(
        "story.yaml: defaults.height=250 is not a multiple of 8 required by the model"
    )
    # 256 is a multiple of 16 but not of 96.
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
    validate_for_model(spec, clip_tokenizer, 16)
    with pytest.raises(StorySpecError, match=r"defaults\.height=256 is not a multiple of 96"):
        validate_for_model(spec, clip_tokenizer, 96)


NO_SIZE = CAT_STORY.replace("height: 256, width: 256, ", "")


def test_validate_size_left_to_the_model(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write_story_text(tmp_path, NO_SIZE))
    assert (spec.defaults.height, spec.defaults.width) == (None, None)
    # Nothing given, nothing to check: the model's own default size is its business.
    validate_for_model(spec, clip_tokenizer, 96)
    # ... unless the caller says what the job will use.
    validate_for_model(spec, clip_tokenizer, 8, size=(1024, 768))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8, size=(1000, 1020))
    # 1000 is a multiple of 8, 1020 is not.
    assert str(info.value) == (
        f"{tmp_path / 'story.yaml'}: the model's default width (1020) is not a multiple of 8 required by the model"
    )
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8, size=(1001, 1024))
    assert str(info.value) == (
        f"{tmp_path / 'story.yaml'}: the model's default height (1001) is not a multiple of 8 required by the model"
    )


def test_validate_resolved_size(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    # Height set by the story, width left to the model: each is named after where it came from.
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace("width: 256, ", "")))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 96, size=(250, 960))
    assert str(info.value).endswith("story.yaml: defaults.height=250 is not a multiple of 96 required by the model")
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 96, size=(960, 1000))
    assert str(info.value).endswith(
        "story.yaml: the model's default width (1000) is not a multiple of 96 required by the model"
    )
    # The resolved size is what is checked, not the story's value.
    validate_for_model(spec, clip_tokenizer, 96, size=(960, 960))
    assert validate_for_model(spec, clip_tokenizer, 8, size=(256, 512)) == validate_for_model(spec, clip_tokenizer, 8)
    for bad in ((256,), (0, 256), (256.0, 256), (True, 256)):
        with pytest.raises(ValueError, match="size must be"):
            validate_for_model(spec, clip_tokenizer, 8, size=bad)


def test_validate_without_negative_prompt(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace(', negative_prompt: ""', "")))
    assert spec.defaults.negative_prompt is None
    assert validate_for_model(spec, clip_tokenizer, 8) == validate_for_model(load_story(write_story_text(tmp_path, CAT_STORY)),
                                                                             clip_tokenizer, 8)
