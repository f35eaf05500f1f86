"""Story files: loading, defaults, rendering, and one-line errors that name the file and frame."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.spec import Defaults, StorySpec, load_story, validate_for_model

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "story.yaml"

BASE = """\
id: ginger-cat
style: "A watercolor illustration of"
subjects:
  - name: cat
    description: "a ginger cat with a blue scarf"
    tokens: ["cat"]
defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: ""}
frames:
  - id: beach
    prompt: "{cat} running on a beach at sunset"
    seed: 7
  - prompt: "{cat} reading a book in a kitchen"
  - id: garden
    prompt: "{cat} in a garden"
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "story.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: pathlib.Path) -> str:
    with pytest.raises(StorySpecError) as info:
        load_story(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert path.name in message, message
    return message


@pytest.fixture(scope="module")
def clip_tokenizer():
    from storysync_dist.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


# ----------------------------------------------------------------------------------------- loading


def test_example_story_loads() -> None:
    spec = load_story(EXAMPLE)
    assert isinstance(spec, StorySpec)
    assert spec.id == "ginger-cat"
    assert len(spec.frames) == 6
    assert [subject.name for subject in spec.subjects] == ["cat"]
    assert spec.anchors == ["beach", "kitchen"]
    assert [frame.id for frame in spec.anchor_frames()] == ["beach", "kitchen"]
    assert len(spec.non_anchor_frames()) == 4
    assert spec.source == str(EXAMPLE)
    for frame in spec.frames:
        assert "{" not in frame.prompt
        assert spec.subjects[0].description in frame.prompt
        assert frame.prompt.startswith(spec.style + " ")


def test_rendering_defaults_and_seeds(tmp_path: pathlib.Path) -> None:
    spec = load_story(write(tmp_path, BASE))
    beach, second, garden = spec.frames
    assert (
        beach.prompt
        == "A watercolor illustration of a ginger cat with a blue scarf running on a beach at sunset"
    )
    assert beach.template == "{cat} running on a beach at sunset"
    assert second.id == "frame-0001" and second.index == 1
    assert [frame.seed for frame in spec.frames] == [7, 1, 2]
    assert [frame.explicit_seed for frame in spec.frames] == [True, False, False]
    # Default anchors: the first two frames.
    assert spec.anchors == ["beach", "frame-0001"]
    assert [frame.id for frame in spec.non_anchor_frames()] == ["garden"]
    assert spec.frame_by_id("garden") is garden
    with pytest.raises(StorySpecError, match="no frame has id 'nope'"):
        spec.frame_by_id("nope")


def test_single_frame_is_its_own_anchor_and_defaults_apply(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """\
        id: solo
        subjects: [{name: cat, description: "a   cat", tokens: [cat]}]
        frames: [{prompt: "{cat}   on a  mat"}]
        """,
    )
    spec = load_story(path)
    assert spec.anchors == ["frame-0000"]
    assert spec.non_anchor_frames() == []
    assert spec.defaults == Defaults()
    # No style: the prompt is just the expanded template, whitespace collapsed.
    assert spec.frames[0].prompt == "a cat on a mat"


def test_placeholders_literal_braces_and_multiple_subjects(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """\
        id: duo
        style: "  A photo of  "
        subjects:
          - {name: cat, description: "a ginger cat", tokens: [cat]}
          - {name: dog_1, description: "a black dog", tokens: [dog]}
        frames:
          - prompt: "{cat} and {dog_1} playing, {{not a placeholder}}, {cat} again"
        """,
    )
    spec = load_story(path)
    assert spec.frames[0].prompt == (
        "A photo of a ginger cat and a black dog playing, {not a placeholder}, a ginger cat again"
    )


def test_explicit_anchors_are_stored_in_frame_order(tmp_path: pathlib.Path) -> None:
    spec = load_story(write(tmp_path, BASE + "anchors: [garden, beach]\n"))
    assert spec.anchors == ["beach", "garden"]
    assert [frame.id for frame in spec.non_anchor_frames()] == ["frame-0001"]


def test_json_story(tmp_path: pathlib.Path) -> None:
    import yaml

    document = yaml.safe_load(BASE)
    path = tmp_path / "story.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert load_story(path).frames == load_story(write(tmp_path, BASE)).frames[:3]


def test_with_overrides(tmp_path: pathlib.Path) -> None:
    spec = load_story(write(tmp_path, BASE))
    assert spec.with_overrides() is spec
    changed = spec.with_overrides(steps=4, height=128, width=64, seed=100)
    assert (changed.defaults.steps, changed.defaults.height, changed.defaults.width) == (4, 128, 64)
    assert changed.defaults.seed == 100
    # The explicit seed stays; derived seeds move with the base seed.
    assert [frame.seed for frame in changed.frames] == [7, 101, 102]
    # The original is untouched (specs are immutable).
    assert spec.defaults.steps == 20 and [frame.seed for frame in spec.frames] == [7, 1, 2]
    assert changed.frames[1].prompt == spec.frames[1].prompt
    with pytest.raises(StorySpecError) as info:
        spec.with_overrides(steps=0)
    assert "story.yaml" in str(info.value) and "steps must be >= 1, got 0" in str(info.value)
    with pytest.raises(StorySpecError, match="seed"):
        spec.with_overrides(seed=-1)


def test_errors_are_user_errors() -> None:
    assert issubclass(StorySpecError, StorySyncUserError)


# ------------------------------------------------------------------------------------ file errors


def test_missing_file(tmp_path: pathlib.Path) -> None:
    message = error_of(tmp_path / "story.yaml")
    assert "not found" in message


def test_unsupported_extension(tmp_path: pathlib.Path) -> None:
    assert "extension" in error_of(write(tmp_path, BASE, name="story.txt"))


def test_invalid_yaml_gives_line_number(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "id: x\nsubjects: [\nframes: {a: b\n")
    message = error_of(path)
    assert "invalid YAML" in message and "line " in message


def test_duplicate_yaml_key(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE + "id: other\n"))
    assert "duplicate key 'id'" in message and "line 15, column 1" in message


def test_invalid_json(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "story.json"
    path.write_text('{"id": "x",\n "frames": [}', encoding="utf-8")
    message = error_of(path)
    assert "invalid JSON" in message and "line 2" in message


def test_empty_and_non_mapping(tmp_path: pathlib.Path) -> None:
    assert "empty" in error_of(write(tmp_path, ""))
    assert "mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_schema_error_names_the_field(tmp_path: pathlib.Path) -> None:
    text = BASE.replace('prompt: "{cat} in a garden"', 'prompt: "{cat} in a garden"\n    seed: seven')
    assert (
        error_of(write(tmp_path, text))
        == f"{tmp_path / 'story.yaml'}: frames[2].seed: Input should be a valid integer"
    )


def test_unknown_key_and_missing_field(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE.replace("    seed: 7\n", "    sed: 7\n")))
    assert "frames[0].sed: Extra inputs are not permitted" in message
    message = error_of(write(tmp_path, BASE.replace('    tokens: ["cat"]\n', "")))
    assert "subjects[0].tokens: Field required" in message
    message = error_of(write(tmp_path, BASE.replace('tokens: ["cat"]', "tokens: []")))
    assert "subjects[0].tokens" in message


def test_no_frames_and_no_subjects(tmp_path: pathlib.Path) -> None:
    text = "id: x\nsubjects: [{name: cat, description: a cat, tokens: [cat]}]\nframes: []\n"
    assert "no frames" in error_of(write(tmp_path, text))
    text = "id: x\nsubjects: []\nframes: [{prompt: a cat}]\n"
    assert "at least one subject" in error_of(write(tmp_path, text))


def test_duplicate_frame_id(tmp_path: pathlib.Path) -> None:
    text = BASE + '  - id: beach\n    prompt: "{cat} on the beach again"\n'
    message = error_of(write(tmp_path, text))
    assert message.endswith("story.yaml: frame 'beach' (#3): duplicate id, first used by frame #0")


def test_bad_ids(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE.replace("id: ginger-cat", "id: Ginger Cat")))
    assert "'Ginger Cat'" in message and "must match" in message
    message = error_of(write(tmp_path, BASE.replace("id: garden", "id: ../garden")))
    assert "frame '../garden' (#2)" in message and "must match" in message


def test_bad_defaults(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE.replace("steps: 20", "steps: -3")))
    assert message.endswith("story.yaml: defaults.steps must be >= 1, got -3")
    message = error_of(write(tmp_path, BASE.replace("height: 256", "height: 0")))
    assert "defaults.height must be a positive number of pixels, got 0" in message
    message = error_of(write(tmp_path, BASE.replace("width: 256", "width: -8")))
    assert "defaults.width" in message
    message = error_of(write(tmp_path, BASE.replace("seed: 0,", "seed: -1,")))
    assert "defaults.seed" in message
    # YAML booleans are not integers.
    message = error_of(write(tmp_path, BASE.replace("steps: 20", "steps: yes")))
    assert "defaults.steps: Input should be a valid integer" in message


def test_negative_frame_seed(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE.replace("seed: 7", "seed: -7")))
    assert "frame 'beach' (#0): seed must be within" in message and "-7" in message


def test_anchor_errors(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE + "anchors: [beach, kitchn]\n"))
    assert "anchors[1]: no frame has id 'kitchn'" in message
    message = error_of(write(tmp_path, BASE + "anchors: [beach, garden, frame-0001, garden2]\n"))
    assert "4 anchors but the story has only 3 frame(s)" in message
    message = error_of(write(tmp_path, BASE + "anchors: [beach, beach]\n"))
    assert "anchors[1]" in message and "twice" in message
    assert "empty" in error_of(write(tmp_path, BASE + "anchors: []\n"))


def test_unknown_placeholder(tmp_path: pathlib.Path) -> None:
    message = error_of(write(tmp_path, BASE.replace("{cat} in a garden", "{cat} and {dog} in a garden")))
    assert "frame 'garden' (#2)" in message and "unknown placeholder {dog}" in message
    message = error_of(write(tmp_path, BASE.replace("{cat} in a garden", "{cat} in a garden }")))
    assert "frame 'garden' (#2)" in message and "braces" in message


# ------------------------------------------------------------------------------- model validation


def test_validate_for_model_returns_token_positions(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write(tmp_path, BASE))
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
    path = write(
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
    spec = load_story(write(tmp_path, BASE.replace("{cat} reading a book", "a dog reading a book")))
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
    spec = load_story(write(tmp_path, BASE.replace("{cat} in a garden", long_prompt)))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8)
    message = str(info.value)
    count = len(clip_tokenizer(spec.frames[2].prompt, truncation=False).input_ids)
    assert "story.yaml: frame 'garden' (#2)" in message
    assert f"{count} tokens" in message and "at most 77" in message


def test_validate_negative_prompt_too_long(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(
        write(tmp_path, BASE.replace('negative_prompt: ""', 'negative_prompt: "' + "ugly " * 90 + '"'))
    )
    with pytest.raises(StorySpecError, match=r"defaults\.negative_prompt is \d+ tokens long.*at most 77"):
        validate_for_model(spec, clip_tokenizer, 8)


def test_validate_size_factor(tmp_path: pathlib.Path, clip_tokenizer) -> None:
    spec = load_story(write(tmp_path, BASE.replace("height: 256", "height: 250")))
    with pytest.raises(StorySpecError) as info:
        validate_for_model(spec, clip_tokenizer, 8)
    assert str(info.value).endswith(
        "story.yaml: defaults.height=250 is not a multiple of 8 required by the model"
    )
    # 256 is a multiple of 16 but not of 96.
    spec = load_story(write(tmp_path, BASE))
    validate_for_model(spec, clip_tokenizer, 16)
    with pytest.raises(StorySpecError, match=r"defaults\.height=256 is not a multiple of 96"):
        validate_for_model(spec, clip_tokenizer, 96)
