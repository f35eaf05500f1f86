"""Story files: loading, defaults, rendering, and one-line errors that name the file and frame."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from _stories import CAT_STORY, write_story_text

from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.story import (
    MAX_SEED,
    Defaults,
    StorySpec,
    check_seed,
    load_benchmark,
    load_story,
)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "story.yaml"


def error_of(path: pathlib.Path) -> str:
    with pytest.raises(StorySpecError) as info:
        load_story(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert path.name in message, message
    return message


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
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
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
    path = write_story_text(
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
    # Left out: the model's own sampling defaults (resolved by the engine), no negative prompt at all.
    d = spec.defaults
    assert (d.steps, d.height, d.width, d.guidance_scale, d.negative_prompt) == (None, None, None, None, None)
    assert d.seed == 0 and spec.frames[0].seed == 0
    assert spec.storysync == {}
    # No style: the prompt is just the expanded template, whitespace collapsed.
    assert spec.frames[0].prompt == "a cat on a mat"


def test_explicit_negative_prompt_and_guidance(tmp_path: pathlib.Path) -> None:
    # An explicit empty negative prompt is kept as "" (encoded as given), unlike a left-out one (None).
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
    assert spec.defaults.negative_prompt == ""
    assert (spec.defaults.steps, spec.defaults.height, spec.defaults.width) == (20, 256, 256)
    text = CAT_STORY.replace('negative_prompt: ""', 'negative_prompt: "  blurry,   ugly "').replace("5.0", "5")
    spec = load_story(write_story_text(tmp_path, text))
    assert spec.defaults.negative_prompt == "blurry, ugly"
    # A whole number is a valid guidance scale, stored as a float.
    assert spec.defaults.guidance_scale == 5.0 and isinstance(spec.defaults.guidance_scale, float)
    # Only some defaults given: the others stay the model's.
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace(
        "defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: \"\"}",
        "defaults: {height: 128}",
    )))
    d = spec.defaults
    assert (d.steps, d.height, d.width, d.guidance_scale, d.negative_prompt) == (None, 128, None, None, None)


def test_placeholders_literal_braces_and_multiple_subjects(tmp_path: pathlib.Path) -> None:
    path = write_story_text(
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
    spec = load_story(write_story_text(tmp_path, CAT_STORY + "anchors: [garden, beach]\n"))
    assert spec.anchors == ["beach", "garden"]
    assert [frame.id for frame in spec.non_anchor_frames()] == ["frame-0001"]


def test_json_story(tmp_path: pathlib.Path) -> None:
    import yaml

    document = yaml.safe_load(CAT_STORY)
    path = tmp_path / "story.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert load_story(path).frames == load_story(write_story_text(tmp_path, CAT_STORY)).frames[:3]


def test_with_overrides(tmp_path: pathlib.Path) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
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


def test_with_overrides_keeps_model_defaults(tmp_path: pathlib.Path) -> None:
    spec = load_story(write_story_text(tmp_path, CAT_STORY.replace(
        "defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: \"\"}\n", ""
    )))
    changed = spec.with_overrides(steps=4, width=64)
    d = changed.defaults
    assert (d.steps, d.height, d.width, d.guidance_scale, d.negative_prompt) == (4, None, 64, None, None)
    assert changed.with_overrides(seed=3).defaults.height is None
    with pytest.raises(StorySpecError, match="override height must be a positive number of pixels, got 0"):
        spec.with_overrides(height=0)


def test_errors_are_user_errors() -> None:
    assert issubclass(StorySpecError, StorySyncUserError)


# ------------------------------------------------------------------------------------ file errors


def test_missing_file(tmp_path: pathlib.Path) -> None:
    message = error_of(tmp_path / "story.yaml")
    assert "not found" in message


def test_unsupported_extension(tmp_path: pathlib.Path) -> None:
    assert "extension" in error_of(write_story_text(tmp_path, CAT_STORY, name="story.txt"))


def test_invalid_yaml_gives_line_number(tmp_path: pathlib.Path) -> None:
    path = write_story_text(tmp_path, "id: x\nsubjects: [\nframes: {a: b\n")
    message = error_of(path)
    assert "invalid YAML" in message and "line " in message


def test_duplicate_yaml_key(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY + "id: other\n"))
    assert "duplicate key 'id'" in message and "line 15, column 1" in message


def test_invalid_json(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "story.json"
    path.write_text('{"id": "x",\n "frames": [}', encoding="utf-8")
    message = error_of(path)
    assert "invalid JSON" in message and "line 2" in message


def test_empty_and_non_mapping(tmp_path: pathlib.Path) -> None:
    assert "empty" in error_of(write_story_text(tmp_path, ""))
    assert "mapping" in error_of(write_story_text(tmp_path, "- a\n- b\n"))


def test_schema_error_names_the_field(tmp_path: pathlib.Path) -> None:
    text = CAT_STORY.replace('prompt: "{cat} in a garden"', 'prompt: "{cat} in a garden"\n    seed: seven')
    assert (
        error_of(write_story_text(tmp_path, text))
        == f"{tmp_path / 'story.yaml'}: frames[2].seed: Input should be a valid integer"
    )


def test_unknown_key_and_missing_field(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("    seed: 7\n", "    sed: 7\n")))
    assert "frames[0].sed: Extra inputs are not permitted" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace('    tokens: ["cat"]\n', "")))
    assert "subjects[0].tokens: Field required" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace('tokens: ["cat"]', "tokens: []")))
    assert "subjects[0].tokens" in message


def test_no_frames_and_no_subjects(tmp_path: pathlib.Path) -> None:
    text = "id: x\nsubjects: [{name: cat, description: a cat, tokens: [cat]}]\nframes: []\n"
    assert "no frames" in error_of(write_story_text(tmp_path, text))
    text = "id: x\nsubjects: []\nframes: [{prompt: a cat}]\n"
    assert "at least one subject" in error_of(write_story_text(tmp_path, text))


def test_duplicate_frame_id(tmp_path: pathlib.Path) -> None:
    text = CAT_STORY + '  - id: beach\n    prompt: "{cat} on the beach again"\n'
    message = error_of(write_story_text(tmp_path, text))
    assert message.endswith("story.yaml: frame 'beach' (#3): duplicate id, first used by frame #0")


def test_bad_ids(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("id: ginger-cat", "id: Ginger Cat")))
    assert "'Ginger Cat'" in message and "must match" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("id: garden", "id: ../garden")))
    assert "frame '../garden' (#2)" in message and "must match" in message


def test_bad_defaults(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("steps: 20", "steps: -3")))
    assert message.endswith("story.yaml: defaults.steps must be >= 1, got -3")
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("height: 256", "height: 0")))
    assert "defaults.height must be a positive number of pixels, got 0" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("width: 256", "width: -8")))
    assert "defaults.width" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("seed: 0,", "seed: -1,")))
    assert "defaults.seed" in message
    # YAML booleans are not integers.
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("steps: 20", "steps: yes")))
    assert "defaults.steps: Input should be a valid integer" in message


def test_negative_frame_seed(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("seed: 7", "seed: -7")))
    assert "frame 'beach' (#0): seed must be within" in message and "-7" in message


# ----------------------------------------------------------------------------------- seed range

RANGE = "must be within [0, 2**63 - 1], got"


def test_check_seed() -> None:
    assert check_seed(0, "x") == 0 and check_seed(MAX_SEED, "x") == MAX_SEED
    for bad in (-1, MAX_SEED + 1, True):
        with pytest.raises(StorySpecError) as info:
            check_seed(bad, "story.yaml: frame 'a' (#0): seed")
        assert str(info.value) == f"story.yaml: frame 'a' (#0): seed {RANGE} {bad!r}"
    # A ValueError too, so pydantic validators report it at the field.
    with pytest.raises(ValueError, match=r"^must be within"):
        check_seed(-1, "")


def test_seed_range_is_checked_at_every_entry_point(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "story.yaml"
    too_big = MAX_SEED + 1
    # defaults.seed
    for bad in (-1, too_big):
        message = error_of(write_story_text(tmp_path, CAT_STORY.replace("seed: 0,", f"seed: {bad},")))
        assert message == f"{path}: defaults.seed {RANGE} {bad}"
    # A frame's own seed.
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("seed: 7", f"seed: {too_big}")))
    assert message == f"{path}: frame 'beach' (#0): seed {RANGE} {too_big}"
    # Derived seeds: defaults.seed + index (frame #0 has its own seed, #1 is MAX_SEED, #2 is beyond).
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("seed: 0,", f"seed: {MAX_SEED - 1},")))
    assert message == f"{path}: frame 'garden' (#2): seed (defaults.seed + index) {RANGE} {too_big}"
    # --seed overrides: the base seed itself, and the seeds derived from it.
    spec = load_story(write_story_text(tmp_path, CAT_STORY))
    with pytest.raises(StorySpecError) as info:
        spec.with_overrides(seed=-1)
    assert str(info.value) == f"{path}: override seed {RANGE} -1"
    with pytest.raises(StorySpecError) as info:
        spec.with_overrides(seed=MAX_SEED)
    assert str(info.value) == (
        f"{path}: frame 'frame-0001' (#1): seed (override seed {MAX_SEED} + index) {RANGE} {too_big}"
    )
    # The largest seed is fine where nothing derived goes beyond it.
    assert spec.with_overrides(seed=MAX_SEED - 2).frames[2].seed == MAX_SEED
    assert load_story(write_story_text(tmp_path, CAT_STORY.replace("seed: 7", f"seed: {MAX_SEED}"))).frames[0].seed == MAX_SEED


def test_benchmark_seed_range(tmp_path: pathlib.Path) -> None:
    path = write_story_text(tmp_path, "animals:\n  - {concept_token: fox, subject: A fox, settings: [a, b]}\n", "bench.yaml")
    with pytest.raises(StorySpecError) as info:
        load_benchmark(path, defaults={"seed": MAX_SEED})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:animals[0]: frame 's01' (#1): seed")
    assert f"{RANGE} {MAX_SEED + 1}" in message


# ----------------------------------------------------------------------------- storysync section


def test_storysync_section_is_stored(tmp_path: pathlib.Path) -> None:
    section = "storysync:\n  rfh_gamma: 0.5\n  use_masks: false\n  share_layers: [up_blocks]\n"
    spec = load_story(write_story_text(tmp_path, CAT_STORY + section))
    assert spec.storysync == {"rfh_gamma": 0.5, "use_masks": False, "share_layers": ["up_blocks"]}
    assert json.loads(json.dumps(spec.storysync)) == spec.storysync
    # The same in a JSON story file.
    import yaml

    document = yaml.safe_load(CAT_STORY + section)
    json_path = tmp_path / "story.json"
    json_path.write_text(json.dumps(document), encoding="utf-8")
    assert load_story(json_path).storysync == spec.storysync
    assert load_story(write_story_text(tmp_path, CAT_STORY + "storysync: {}\n")).storysync == {}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("storysync: {rfh_gama: 0.5}", "storysync.rfh_gama: unknown option"),
        ("storysync: {use_masks: maybe}", "storysync.use_masks: must be true or false, got 'maybe'"),
        ("storysync: {rfh_gamma: fast}", "storysync.rfh_gamma: must be a number, got 'fast'"),
        ("storysync: {rfh_gamma: 2.0}", "storysync.rfh_gamma: must be within [0, 1], got 2.0"),
        ("storysync: {first_share_step: -1}", "storysync.first_share_step: must be a whole number >= 0, got -1"),
    ],
)
def test_storysync_section_errors_name_the_option(tmp_path: pathlib.Path, section: str, expected: str) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY + section + "\n"))
    assert message.startswith(f"{tmp_path / 'story.yaml'}: {expected}"), message


def test_storysync_section_out_of_range_exact(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY + "storysync:\n  rfh_gamma: 2.0\n"))
    assert message == f"{tmp_path / 'story.yaml'}: storysync.rfh_gamma: must be within [0, 1], got 2.0"


@pytest.mark.parametrize(
    ("section", "got"), [("storysync: [rfh_gamma]", "list"), ("storysync: 0.5", "float"), ("storysync:", "null")]
)
def test_storysync_section_must_be_a_mapping(tmp_path: pathlib.Path, section: str, got: str) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY + section + "\n"))
    assert message.startswith(f"{tmp_path / 'story.yaml'}: storysync: must be a mapping"), message
    assert message.endswith(f"got {got}")


def test_spec_does_not_import_heavy_libraries() -> None:
    # The CLI validates a story before it starts anything heavy; the storysync: check must not change that.
    code = "import sys, storysync_dist.story; print(sorted(m for m in ('torch', 'diffusers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_anchor_errors(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY + "anchors: [beach, kitchn]\n"))
    assert "anchors[1]: no frame has id 'kitchn'" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY + "anchors: [beach, garden, frame-0001, garden2]\n"))
    assert "4 anchors but the story has only 3 frame(s)" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY + "anchors: [beach, beach]\n"))
    assert "anchors[1]" in message and "twice" in message
    assert "empty" in error_of(write_story_text(tmp_path, CAT_STORY + "anchors: []\n"))


def test_unknown_placeholder(tmp_path: pathlib.Path) -> None:
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("{cat} in a garden", "{cat} and {dog} in a garden")))
    assert "frame 'garden' (#2)" in message and "unknown placeholder {dog}" in message
    message = error_of(write_story_text(tmp_path, CAT_STORY.replace("{cat} in a garden", "{cat} in a garden }")))
    assert "frame 'garden' (#2)" in message and "braces" in message


def test_the_old_package_name_is_a_deprecated_alias() -> None:
    """``storysync_dist.spec`` was renamed ``storysync_dist.story``; the old name works for one release."""
    import importlib
    import sys

    import storysync_dist.story as story

    sys.modules.pop("storysync_dist.spec", None)
    with pytest.warns(DeprecationWarning, match="renamed storysync_dist.story"):
        old = importlib.import_module("storysync_dist.spec")
    assert old.load_story is story.load_story and old.StorySpec is story.StorySpec
