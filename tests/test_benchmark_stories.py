"""Benchmark prompt files (ConsiStory+ shape) as one-subject stories, and their errors. The files
are written here, in the shape of ConsiStory+ (categories of subject sets, each a concept token, a
subject, a style and settings): no test depends on a file outside the repository."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from storysync_dist.errors import StorySpecError
from storysync_dist.story import BENCHMARK_SUBJECT, ID_PATTERN, load_benchmark, slug

SMALL = """\
animals:
  - concept_token: fox
    subject: A red fox with a bushy tail
    style: A watercolor painting of
    settings: [running through snow, sleeping in a den, "jumping over a {log}"]
  - concept_token: Snow Leopard
    subject: A snow leopard with pale fur
    style: A photo of
    settings: [on a cliff, in the mist]
foods:
  - concept_token: bagel
    subject: A sesame bagel
    style: ""
    settings: [on a plate]
"""


def collapse(text: str) -> str:
    return " ".join(text.split())


def write(tmp_path: Path, text: str, name: str = "bench.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(StorySpecError) as info:
        load_benchmark(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


CATEGORIES = ["animals", "foods", "objects", "nature"]


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    """A ConsiStory+-shaped file: four categories of four to six subject sets, with 2 to 6 settings
    each, one- and two-word concept tokens, styles with spaces to collapse, and long subjects
    whose slugs are cut."""
    raw = {
        category: [
            {
                "concept_token": f"{category[:-1]} {'toy' if i % 2 else ''}".strip(),
                "subject": f"A  remarkable {category[:-1]} {'toy ' if i % 2 else ''}with feature number {i}",
                "style": ["A photo of", "A watercolor  painting of", "", "An oil painting of"][i % 4],
                "settings": [f"in place {j} of set {i}" for j in range(2 + (i + c) % 5)],
            }
            for i in range(4 + c % 3)
        ]
        for c, category in enumerate(CATEGORIES)
    }
    path = tmp_path / "consistory_plus.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_a_consistory_plus_file_parses_into_one_story_per_subject_set(suite_file: Path) -> None:
    raw = yaml.safe_load(suite_file.read_text(encoding="utf-8"))
    stories = load_benchmark(suite_file)
    sets = [entry for entries in raw.values() for entry in entries]
    assert len(stories) == len(sets) == 4 + 5 + 6 + 4
    assert sum(len(story.frames) for story in stories) == sum(len(entry["settings"]) for entry in sets)
    assert len({story.id for story in stories}) == len(stories)

    expected = [(category, i, entry) for category, entries in raw.items() for i, entry in enumerate(entries)]
    for story, (category, i, entry) in zip(stories, expected, strict=True):
        assert re.fullmatch(ID_PATTERN, story.id)
        token = slug(entry["concept_token"])[:16].strip("-")
        assert re.fullmatch(rf"{category}-{i:03d}-{token}-[0-9a-f]{{8}}", story.id), story.id
        assert story.source == f"{suite_file}:{category}[{i}]"
        assert story.category == category
        [subject] = story.subjects
        assert subject.name == BENCHMARK_SUBJECT and subject.tokens == [entry["concept_token"]]
        assert story.style == collapse(entry["style"])
        assert [frame.id for frame in story.frames] == [f"s{j:02d}" for j in range(len(entry["settings"]))]
        assert story.anchors == ["s00", "s01"]
        for frame, setting in zip(story.frames, entry["settings"], strict=True):
            # The paper's frame prompt.
            assert frame.prompt == collapse(f"{entry['style']} {entry['subject']} {setting}")
            assert frame.seed == story.defaults.seed + frame.index


def test_categories_limit_and_defaults(suite_file: Path) -> None:
    stories = load_benchmark(
        suite_file, categories=["foods", "animals"], limit=2, defaults={"steps": 4, "height": 64, "width": 96}
    )
    # File order, the first two sets of each category.
    assert [story.id.split("-")[:2] for story in stories] == [
        ["animals", "000"], ["animals", "001"], ["foods", "000"], ["foods", "001"]
    ]
    assert {(s.defaults.steps, s.defaults.height, s.defaults.width) for s in stories} == {(4, 64, 96)}
    # Left out: the model's own default, resolved by the engine.
    assert stories[0].defaults.guidance_scale is None


def test_small_file(tmp_path: Path) -> None:
    stories = load_benchmark(write(tmp_path, SMALL))
    assert [s.id.rsplit("-", 1)[0] for s in stories] == ["animals-000-fox", "animals-001-snow-leopard", "foods-000-bagel"]
    assert all(re.fullmatch(r"[0-9a-f]{8}", s.id.rsplit("-", 1)[1]) for s in stories)
    assert [s.category for s in stories] == ["animals", "animals", "foods"]
    fox, leopard, bagel = stories
    # Braces in a setting are text, not placeholders.
    assert fox.frames[2].prompt == "A watercolor painting of A red fox with a bushy tail jumping over a {log}"
    assert fox.frames[2].template == "{subject} jumping over a {{log}}"
    # The concept token as the subject spells it ("A snow leopard"): T5 tokenizers keep case.
    assert leopard.subjects[0].tokens == ["snow leopard"]
    # One setting: the only frame is the only anchor.
    assert bagel.frames[0].prompt == "A sesame bagel on a plate" and bagel.anchors == ["s00"]


def test_json_and_long_tokens(tmp_path: Path) -> None:
    token = "very " * 30 + "long thing"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"misc": [{"concept_token": token, "subject": f"A {token}", "style": "x",
                                          "settings": ["here"]}]}))
    [story] = load_benchmark(path)
    assert len(story.id) <= 64 and re.fullmatch(ID_PATTERN, story.id) and story.id.startswith("misc-000-very-")


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("- a\n- b\n", {}, "top level must map category names"),
        ("animals: 3\n", {}, "animals: expected a non-empty list of subject sets, got int"),
        ("animals: []\n", {}, "animals: expected a non-empty list of subject sets, got an empty list"),
        ("animals:\n  - just a string\n", {}, "animals[0]: expected a mapping"),
        ("animals:\n  - {concept_token: fox, subject: A fox, style: s}\n", {}, "animals[0].settings: Field required"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: []}\n", {}, "animals[0].settings:"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n"
         "  - {concept_token: ' ', subject: A fox, settings: [a]}\n", {},
         "animals[1].concept_token must not be empty"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a, ' ']}\n", {},
         "animals[0].settings must not contain an empty setting (item 1)"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a, 1984]}\n", {},
         "animals[0].settings[1]: Input should be a valid string"),
        ("animals:\n  - {concept_token: fox, subject: A fox, setting: [a]}\n", {}, "animals[0].setting: Extra inputs"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n", {"categories": ["plants"]},
         "unknown category 'plants' (the file has: animals)"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n", {"categories": []},
         "categories: the list is empty"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n", {"limit": 0}, "limit must be"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n", {"defaults": {"steps": 0}},
         "defaults.steps must be >= 1"),
        ("animals:\n  - {concept_token: fox, subject: A fox, settings: [a]}\n", {"defaults": {"stepz": 3}},
         "defaults.stepz: Extra inputs"),
        ("animals:\n  - {concept_token: fox, concept_token: cat, subject: A fox, settings: [a]}\n", {},
         "duplicate key 'concept_token'"),
        ("animals: [\n", {}, "invalid YAML"),
        ("", {}, "the benchmark file is empty"),
    ],
)
def test_errors_are_one_line_and_name_the_entry(tmp_path: Path, text: str, kwargs: dict, expected: str) -> None:
    assert expected in error_of(write(tmp_path, text), **kwargs)


def test_file_errors(tmp_path: Path) -> None:
    assert "benchmark file not found" in error_of(tmp_path / "missing.yaml")
    assert "unsupported benchmark file extension" in error_of(write(tmp_path, SMALL, name="bench.txt"))


def test_a_bad_entry_fails_even_when_not_selected(tmp_path: Path) -> None:
    text = SMALL + "nature:\n  - {concept_token: oak, subject: An oak, settings: oops}\n"
    assert "nature[0].settings: Input should be a valid list" in error_of(
        write(tmp_path, text), categories=["animals"]
    )
