"""Story ids of benchmark subject sets: readable, valid, stable, and never shared by two sets."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from storysync_dist.errors import StorySpecError, StorySyncUserError
from storysync_dist.story import ID_PATTERN, load_benchmark
from storysync_dist.story import benchmark as spec_module

ROOT = Path(__file__).resolve().parents[1]


def one_set(token: str, setting: str = "on a hill") -> str:
    return f"  - {{concept_token: {json.dumps(token)}, subject: A {json.dumps(token)[1:-1]}, settings: [{setting}]}}\n"


def write(tmp_path: Path, text: str, name: str = "bench.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def reference_id(category: str, index: int, token: str) -> str:
    """The documented rule, for plain ASCII names."""
    def plain_slug(text: str, limit: int) -> str:
        return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-_")[:limit].strip("-_")

    digest = hashlib.sha256(json.dumps([category, index], ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{plain_slug(category, 24)}-{index:03d}-{plain_slug(token, 16)}-{digest[:8]}"


def test_ids_follow_the_documented_rule(tmp_path: Path) -> None:
    path = write(tmp_path, "animals:\n" + one_set("fox") + one_set("Snow Leopard of the high peaks")
                 + "fairy_tales:\n" + one_set("bagel"))
    stories = load_benchmark(path)
    assert [s.id for s in stories] == [
        reference_id("animals", 0, "fox"),
        reference_id("animals", 1, "Snow Leopard of the high peaks"),
        reference_id("fairy_tales", 0, "bagel"),
    ]
    # The token slug is cut to 16 characters ("snow-leopard-of-" -> "snow-leopard-of").
    assert stories[1].id.startswith("animals-001-snow-leopard-of-") and len(stories[1].id) == 36
    assert stories[2].id.startswith("fairy_tales-000-bagel-")
    assert [s.category for s in stories] == ["animals", "animals", "fairy_tales"]


def test_names_that_slug_alike_get_distinct_ids(tmp_path: Path) -> None:
    # Under the old rule both were "animals-000-000-cat" and the second was skipped as present.
    path = write(tmp_path, "animals:\n" + one_set("000 cat") + "animals-000:\n" + one_set("cat"))
    first, second = load_benchmark(path)
    assert first.id != second.id
    assert first.id.startswith("animals-000-000-cat-") and second.id.startswith("animals-000-000-cat-")
    assert (first.category, second.category) == ("animals", "animals-000")
    assert first.subjects[0].tokens == ["000 cat"] and second.subjects[0].tokens == ["cat"]
    for story in (first, second):
        assert re.fullmatch(ID_PATTERN, story.id)


def test_a_long_category_gives_distinct_valid_ids(tmp_path: Path) -> None:
    category = "c" * 70
    path = write(tmp_path, f"{category}:\n" + one_set("fox") + one_set("fox") + one_set("owl"))
    stories = load_benchmark(path)
    ids = [s.id for s in stories]
    assert len(set(ids)) == 3
    for story_id in ids:
        assert re.fullmatch(ID_PATTERN, story_id) and len(story_id) <= 64
        assert story_id.startswith("c" * 24 + "-")
    assert {s.category for s in stories} == {category}


@pytest.mark.parametrize(
    ("category", "prefix"),
    [
        ("Big Cats", "big-cats-000-fox-"),
        ("fairy_tales", "fairy_tales-000-fox-"),
        ("__x__", "x-000-fox-"),
        ("!!! ???", "000-fox-"),
        ("日本の動物", "000-fox-"),
        ("Crème brûlée", "creme-brulee-000-fox-"),
        ("a:b[c]/../d", "a-b-c-d-000-fox-"),
        ("x" * 300, "x" * 24 + "-000-fox-"),
    ],
)
def test_any_category_name_gives_a_valid_id(tmp_path: Path, category: str, prefix: str) -> None:
    path = write(tmp_path, json.dumps({category: [{"concept_token": "fox", "subject": "A fox", "settings": ["a"]}]}),
                 name="bench.json")
    [story] = load_benchmark(path)
    assert re.fullmatch(ID_PATTERN, story.id), story.id
    assert story.id.startswith(prefix) and re.fullmatch(r"[0-9a-f]{8}", story.id[len(prefix):])
    assert story.category == category


def test_a_token_of_punctuation_only_is_left_out_of_the_id(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"misc": [{"concept_token": "???", "subject": "A ???", "settings": ["a"]}]}),
                 name="bench.json")
    [story] = load_benchmark(path)
    assert re.fullmatch(r"misc-000-[0-9a-f]{8}", story.id)


BENCH = textwrap.dedent("""\
    animals:
      - {concept_token: fox, subject: A fox, settings: [a, b]}
      - {concept_token: owl, subject: An owl, settings: [a]}
      - {concept_token: cat, subject: A cat, settings: [a]}
    foods:
      - {concept_token: bagel, subject: A bagel, settings: [a]}
      - {concept_token: pie, subject: A pie, settings: [a]}
    """)


def test_ids_are_stable_and_do_not_depend_on_the_selection(tmp_path: Path) -> None:
    path = write(tmp_path, BENCH)
    every = {(s.category, s.source): s.id for s in load_benchmark(path)}
    assert len(set(every.values())) == 5
    assert {(s.category, s.source): s.id for s in load_benchmark(path)} == every

    for kwargs in ({"categories": ["foods"]}, {"limit": 1}, {"categories": ["animals"], "limit": 2}):
        chosen = load_benchmark(path, **kwargs)
        assert chosen
        for story in chosen:
            assert story.id == every[story.category, story.source], kwargs
    assert [s.category for s in load_benchmark(path, limit=1)] == ["animals", "foods"]

    # Another copy of the file, with one more category in front: the old sets keep their ids.
    other = write(tmp_path, "birds:\n" + one_set("wren") + BENCH, name="other.yaml")
    moved = {s.source.replace(str(other), str(path)): s.id for s in load_benchmark(other) if s.category != "birds"}
    assert moved == {source: story_id for (_, source), story_id in every.items()}


def test_a_clash_in_load_benchmark_names_both_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A clash needs two 8-hex hashes to agree; force one to see that it is refused.
    monkeypatch.setattr(spec_module, "_benchmark_id", lambda category, index, token: "same-id")
    path = write(tmp_path, BENCH)
    with pytest.raises(StorySpecError) as info:
        load_benchmark(path, categories=["foods"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: animals[0] and animals[1] both get story id 'same-id'")


# ---- jobs/make_dataset.py -----------------------------------------------------------------------


@pytest.fixture
def make_dataset(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import make_dataset

    return make_dataset


def test_make_dataset_refuses_duplicate_ids(make_dataset: ModuleType, tmp_path: Path) -> None:
    first, second, *_ = load_benchmark(write(tmp_path, BENCH))
    make_dataset.check_unique_ids([first, second])  # distinct: fine
    twin = second.model_copy(update={"id": first.id})
    with pytest.raises(StorySyncUserError) as info:
        make_dataset.check_unique_ids([first, twin])
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"{first.source} and {twin.source} both have story id {first.id!r}; nothing was rendered"
    )


def test_make_dataset_exits_2_before_rendering_on_duplicate_ids(
    make_dataset: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import storysync_dist.api
    import storysync_dist.story

    first, second, *_ = load_benchmark(write(tmp_path, BENCH))
    twin = second.model_copy(update={"id": first.id})
    monkeypatch.setattr(storysync_dist.story, "load_benchmark", lambda *args, **kwargs: [first, twin])
    monkeypatch.setattr(make_dataset, "_check_against_model", lambda stories, model: (list(stories), []))

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered despite duplicate ids")

    monkeypatch.setattr(storysync_dist.api, "render_story", no_render)
    out = tmp_path / "out"
    code = make_dataset.main([str(tmp_path / "bench.yaml"), "--model", "tiny-sdxl", "--out", str(out)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"make_dataset: error: {first.source} and {twin.source} both have story id {first.id!r}; "
                     "nothing was rendered"]
    assert not out.exists()
