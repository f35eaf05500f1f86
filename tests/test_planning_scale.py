"""Planning stays linear (issue 20): the dry-run summary of a long story against a dataset that
already holds some of its frames equals a plain computation from what is stored, and a story of
10^5 frames plans in seconds (the budget itself is a benchmark, not this test)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from _stories import fox_story

from storysync_dist.api import RenderOptions, render_story
from storysync_dist.engine.job import prepare_job
from storysync_dist.errors import StorySpecError
from storysync_dist.io.sink import ParquetFrameSink
from storysync_dist.io.story_table import write_story_table
from storysync_dist.models.info import load_model_info
from storysync_dist.story import StorySpec, load_story
from storysync_dist.story.model_checks import _token_ids, _token_ids_of_all

SMALL = {"steps": 2, "height": 64, "width": 64}


def _story(frames: list[dict]) -> dict:
    story = fox_story(1, **SMALL)
    story["frames"] = frames
    return story


def _write(path: Path, story: dict) -> str:
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return str(path)


def _ids(items: list[str]) -> str:
    """The summary's way of listing ids, written out plainly."""
    if not items:
        return ""
    shown = ", ".join(items[:10])
    if len(items) > 10:
        shown += f", ... ({len(items) - 10} more)"
    return f" ({shown})"


def test_the_dry_run_summary_of_a_long_story_equals_a_plain_count_of_what_is_stored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = [{"id": f"s{i}", "prompt": f"{{fox}} in scene {i}", "seed": i} for i in range(6)]
    render_story(_write(tmp_path / "first.yaml", _story(first)), RenderOptions(model="tiny-sdxl", out=str(out),
                                                                               progress=False))
    # 300 frames: s0 and s1 kept as stored, s2 and s3 with new prompts, s4 and s5 gone, 296 new ones.
    frames = [*first[:2], {**first[2], "prompt": "{fox} somewhere else"}, {**first[3], "seed": 99}]
    frames += [{"id": f"n{i:03d}", "prompt": f"{{fox}} in new scene {i}", "seed": 100 + i} for i in range(296)]
    story = _write(tmp_path / "long.yaml", _story(frames))
    result = render_story(story, RenderOptions(model="tiny-sdxl", out=str(out), progress=False, dry_run=True))

    # The plain way: what the dataset holds, frame by frame, against the story's ids.
    stored = set(ParquetFrameSink(str(out), read_only=True).existing("fox"))
    story_ids = [f["id"] for f in frames]
    replaced = ["s2", "s3"]  # stored, but rendered from other inputs now
    kept = [i for i in story_ids if i in stored and i not in replaced]
    new = [i for i in story_ids if i not in stored]
    removed = sorted(stored - set(story_ids))
    lines = {line.split(":", 1)[0].strip(): line for line in result.notes}
    assert lines["render"] == f"render:  {len(new)}{_ids(new)}"
    assert lines["replace"] == f"replace: {len(replaced)}{_ids(replaced)}  (stored with other inputs: rendered again)"
    assert lines["remove"] == f"remove:  {len(removed)}{_ids(removed)}  (no longer in the story)"
    assert lines["skip"] == f"skip:    {len(kept)} already present"
    assert (len(new), len(kept), removed) == (296, 2, ["s4", "s5"])
    # The plan itself, against the same plain sets: what renders, what is kept, removed, replaced.
    plan = prepare_job(story, RenderOptions(model="tiny-sdxl", out=str(out), progress=False, dry_run=True))
    writes = {job.frame_id for job in plan.frame_jobs} | set(plan.anchor_writes)
    assert writes == set(new) | set(replaced)
    assert [job.frame_id for job in plan.frame_jobs] == [i for i in story_ids if i in writes - set(plan.anchor_writes)]
    assert (plan.skipped, sorted(plan.replace), sorted(plan.remove)) == (kept, replaced, removed)
    assert plan.new_frames() == new and set(plan.fingerprints) == set(story_ids)


def test_a_dry_run_of_a_hundred_thousand_frames_is_not_quadratic(tmp_path: Path) -> None:
    story = tmp_path / "big.jsonl"
    header = {k: v for k, v in _story([]).items() if k != "frames"}
    lines = [json.dumps(header), *(json.dumps({"id": f"f{i}", "prompt": f"{{fox}} in scene {i}"})
                                   for i in range(100_000))]
    story.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    result = render_story(str(story), RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), progress=False,
                                                    dry_run=True))
    seconds = time.perf_counter() - start
    assert any(line.startswith("render:  100000 ") for line in result.notes)
    # A guard against a quadratic step coming back, not the budget (bench/planning_benchmark.py):
    # this takes about 6 s here; the old summary alone took 9 s for 10^4 frames, so 15 min for these.
    assert seconds < 90, seconds


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd", "tiny-flux", "tiny-kandinsky3"])
def test_batched_tokenization_equals_one_prompt_at_a_time(model: str) -> None:
    tokenizer = load_model_info(model).tokenizer
    words = ["fox", "Füchsin", "naïve café", "{braces}", "  spaces  ", "emoji 🦊", "a-b_c", "UPPER lower"]
    prompts = [" ".join(words[(i + k) % len(words)] for k in range(i % 40)) for i in range(600)]
    prompts += ["", "x" * 500]
    one_by_one = [_token_ids(tokenizer, p, special=True) for p in prompts]
    assert list(_token_ids_of_all(tokenizer, prompts)) == one_by_one
    # Without the Rust backend's batch call (a tokenizer that only takes one text at a time): the same.
    assert list(_token_ids_of_all(_OneByOne(tokenizer), prompts[:50])) == one_by_one[:50]


class _OneByOne:
    """A tokenizer whose batch call gives nothing usable: the fallback path."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: object, **kwargs: object) -> dict:
        if isinstance(text, list):
            return {"input_ids": None}
        return self.tokenizer(text, **kwargs)


# ---- stories written by programs: JSON and JSON Lines ---------------------------------------------------
STORY = {
    "id": "fox-lines", "style": "A photo of",
    "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
    "defaults": {"steps": 3, "height": 64, "width": 64, "seed": 7},
    "anchors": ["b", "d"], "storysync": {"rfh_gamma": 0.5},
    "frames": [{"id": "a", "prompt": "{fox} in a meadow"}, {"id": "b", "prompt": "{fox} by a stream", "seed": 3},
               {"prompt": "{fox} in the snow"}, {"id": "d", "prompt": "{fox} in a city at night"}],
}


def _json_lines(story: dict) -> str:
    header = {k: v for k, v in story.items() if k != "frames"}
    return "\n".join(json.dumps(x) for x in [header, *story["frames"]]) + "\n"


def _same_spec(a: StorySpec, b: StorySpec) -> None:
    assert a.model_dump(exclude={"source"}) == b.model_dump(exclude={"source"})


def test_json_and_json_lines_stories_load_to_their_yaml_twins_spec(tmp_path: Path) -> None:
    want = load_story(_write(tmp_path / "story.yaml", STORY))
    (tmp_path / "story.json").write_text(json.dumps(STORY))
    (tmp_path / "story.jsonl").write_text(_json_lines(STORY).replace("\n", "\n\n", 1))  # a blank line is skipped
    _same_spec(load_story(str(tmp_path / "story.json")), want)
    _same_spec(load_story(str(tmp_path / "story.jsonl")), want)
    assert [f.id for f in want.frames] == ["a", "b", "frame-0002", "d"]


@pytest.mark.parametrize(("text", "message"), [
    ('{"id": "x", "subjects": []}\n{"prompt": "a"}\n{"prompt": \n', "story.jsonl: line 3, column 12: invalid JSON"),
    ('{"id": "x"}\n["a"]\n', "story.jsonl: line 2: must be a JSON object, got list"),
    ('{"id": "x"}\n{"prompt": "a", "sed": 3}\n', "story.jsonl: line 2: sed: Extra inputs are not permitted"),
    ('{"id": "x"}\n{"id": "a"}\n', "story.jsonl: line 2: prompt: Field required"),
    ('{"id": "x", "frames": []}\n', "story.jsonl: line 1: the first line is the story without its frames"),
    ("\n\n", "story.jsonl: the story file is empty"),
])
def test_json_lines_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "story.jsonl"
    path.write_text(text)
    with pytest.raises(StorySpecError) as caught:
        load_story(str(path))
    assert str(caught.value).startswith(f"{tmp_path}/{message}"), str(caught.value)
    assert "\n" not in str(caught.value)


# ---- Parquet stories: one row per frame --------------------------------------------------------------
def test_parquet_stories_load_to_their_yaml_twins_spec(tmp_path: Path) -> None:
    want = load_story(_write(tmp_path / "story.yaml", STORY))
    header = {k: v for k, v in STORY.items() if k != "frames"}
    write_story_table(str(tmp_path / "meta.parquet"), header, STORY["frames"])  # header in the metadata
    _same_spec(load_story(str(tmp_path / "meta.parquet")), want)
    # As pandas writes it: the header in a sidecar, a missing id and seed are nulls (the seed
    # column becomes float64 with a NaN).
    pandas.DataFrame(STORY["frames"]).to_parquet(tmp_path / "frames.parquet")
    assert str(pq.read_schema(tmp_path / "frames.parquet").field("seed").type) == "double"
    (tmp_path / "frames.header.json").write_text(json.dumps(header))
    _same_spec(load_story(str(tmp_path / "frames.parquet")), want)
    (tmp_path / "frames.header.json").unlink()
    (tmp_path / "frames.header.yaml").write_text(yaml.safe_dump(header))
    _same_spec(load_story(str(tmp_path / "frames.parquet")), want)


def _parquet(path: Path, columns: dict, header: dict | None = None) -> str:
    table = pa.table(columns)
    if header is not None:
        table = table.replace_schema_metadata({b"storysync.story": json.dumps(header).encode()})
    pq.write_table(table, path)
    return str(path)


HEADER = {k: v for k, v in STORY.items() if k not in ("frames", "anchors")}


@pytest.mark.parametrize(("columns", "header", "message"), [
    ({"prompt": ["{fox} a", None, "{fox} c"]}, HEADER, "story.parquet: row 1: prompt is null"),
    ({"prompt": ["{fox} a", "{fox} b"], "seed": [1.0, 2.5]}, HEADER, "story.parquet: row 1: seed 2.5 is not a whole"),
    ({"prompt": ["{fox} a"], "seed": [-1.0]}, HEADER, "story.parquet: row 0: seed must be within [0, 2**63 - 1]"),
    ({"prompt": ["{fox} a"], "sed": [3]}, HEADER, "story.parquet: column 'sed' is not a frame field"),
    ({"id": ["a"]}, HEADER, "story.parquet: no 'prompt' column"),
    ({"prompt": [1, 2]}, HEADER, "story.parquet: column 'prompt' is int64; it must hold strings"),
    ({"prompt": ["{fox} a", "{fox} b"], "id": ["a", "A b"]}, HEADER, "story.parquet: frame 'A b' (#1): id must"),
    ({"prompt": ["{fox} a", "{fox} b"], "id": ["a", "a"]}, HEADER, "story.parquet: frame 'a' (#1): duplicate id"),
    ({"prompt": ["{fox} a", "{fox} b"], "seed": [0, 2**63 - 1]}, {**HEADER, "defaults": {"seed": 0}}, None),
    ({"prompt": ["{fox} a"]}, None, "story.parquet: no story header: write the story without its frames into"),
    ({"prompt": ["{fox} a"]}, {**HEADER, "frames": []}, "story.parquet: the header is the story without its frames"),
    ({"prompt": ["{fox} a"]}, [1], "story.parquet: metadata storysync.story: must be a JSON object"),
])
def test_parquet_story_errors_name_the_row_or_column(tmp_path: Path, columns: dict, header: dict | None,
                                                     message: str | None) -> None:
    path = _parquet(tmp_path / "story.parquet", columns, header)
    if message is None:  # the edge of the seed range loads
        assert [f.seed for f in load_story(path).frames] == [0, 2**63 - 1]
        return
    with pytest.raises(StorySpecError) as caught:
        load_story(path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_parquet_or_a_bad_sidecar_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "story.parquet").write_text("id: not parquet\n")
    with pytest.raises(StorySpecError, match=r"story.parquet: not a readable Parquet file"):
        load_story(str(tmp_path / "story.parquet"))
    path = _parquet(tmp_path / "frames.parquet", {"prompt": ["{fox} a"]})
    (tmp_path / "frames.header.json").write_text('{"id": "x", "subjects": [')
    with pytest.raises(StorySpecError, match=r"frames.header.json: line 1, column 26: invalid JSON"):
        load_story(path)
    (tmp_path / "frames.header.json").write_text("[]")
    with pytest.raises(StorySpecError, match=r"frames.header.json: the story header must be a mapping"):
        load_story(path)


def test_a_json_lines_story_renders_from_the_cli_and_a_bad_one_exits_2(tmp_path: Path, capsys) -> None:
    from storysync_dist.cli import main

    good = tmp_path / "story.jsonl"
    good.write_text(_json_lines({**STORY, "frames": STORY["frames"][:2], "anchors": ["a"]}))
    assert main(["render", str(good), "--model", "tiny-sdxl", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "rendered 2 frame(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n{"prompt": 3}\n')
    assert main(["render", str(bad), "--model", "tiny-sdxl", "--out", str(tmp_path / "bad-out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: line 2: prompt" in err[0] and not (tmp_path / "bad-out").exists()


def test_fingerprints_made_once_per_identity_equal_the_whole_description_hashed(tmp_path: Path) -> None:
    import hashlib

    from storysync_dist.engine.identity import FINGERPRINT_VERSION, frame_fingerprint

    story = _write(tmp_path / "fp.yaml", _story([{"id": "a", "prompt": "{fox} naïve café 🦊", "seed": 1},
                                                   {"id": "b", "prompt": "{fox} in the snow", "seed": 2}]))
    plan = prepare_job(load_story(story), RenderOptions(model="tiny-sdxl", out=str(tmp_path / "out"), loras=[]))
    for job in plan.jobs.values():
        is_anchor = job.frame_id in plan.anchor_ids
        description = {"version": FINGERPRINT_VERSION, "render": plan.identity.to_dict(),
                       "frame": {"id": job.frame_id, "prompt": job.prompt, "seed": job.seed,
                                 "token_positions": [list(p) for p in job.token_positions],
                                 "role": "anchor" if is_anchor else "frame"}}
        plain = hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False).encode("utf-8")).hexdigest()
        assert plan.fingerprints[job.frame_id] == plain
        assert frame_fingerprint(plan.identity, frame_id=job.frame_id, prompt=job.prompt, seed=job.seed,
                                 token_positions=job.token_positions, is_anchor=is_anchor) == plain


def test_finding_a_token_run_equals_comparing_every_window() -> None:
    from storysync_dist.story.model_checks import _find_runs

    rng = random.Random(3)
    for _ in range(2000):
        haystack = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        needle = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
        plain = [i for i in range(len(haystack)) if haystack[i : i + len(needle)] == needle]
        assert _find_runs(haystack, needle) == plain, (haystack, needle)


def test_a_story_checked_again_reuses_its_positions_and_a_changed_one_does_not(monkeypatch, tmp_path) -> None:
    """jobs/make_dataset.py checks every subject set, then plans each: the second check of the same
    prompts with the same tokenizer reuses the first one's positions (no second tokenization)."""
    from storysync_dist.story import model_checks
    from storysync_dist.story.model_checks import validate_for_model

    info = load_model_info("tiny-sdxl")
    story = load_story(_write(tmp_path / "a.yaml", _story([{"id": f"f{i}", "prompt": f"{{fox}} at {i}"}
                                                            for i in range(5)])))
    first = validate_for_model(story, info.tokenizer, info.size_factor)
    calls: list[int] = []
    real = model_checks._token_ids_of_all
    monkeypatch.setattr(model_checks, "_token_ids_of_all", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    assert validate_for_model(story, info.tokenizer, info.size_factor) is first and calls == []
    # The fox moved one word to the right in frame 2: its own positions, from a tokenization.
    moved = load_story(_write(tmp_path / "b.yaml", _story([{"id": f"f{i}", "prompt": f"{{fox}} at {i}"} for i in range(5)]
                                                          [:2] + [{"id": "f2", "prompt": "one {fox} at 2"}]
                                                          + [{"id": f"f{i}", "prompt": f"{{fox}} at {i}"} for i in (3, 4)])))
    again = validate_for_model(moved, info.tokenizer, info.size_factor)
    assert calls == [5] and again[2] == [[p + 1 for p in first[2][0]]] and again[:2] == first[:2]
    # Bounded: past CHECKED_FRAMES the oldest story is forgotten and tokenized again.
    monkeypatch.setattr(model_checks, "CHECKED_FRAMES", 6)
    validate_for_model(load_story(_write(tmp_path / "c.yaml", _story([{"prompt": "{fox} alone"}]))), info.tokenizer,
                       info.size_factor)
    validate_for_model(story, info.tokenizer, info.size_factor)
    assert calls == [5, 1, 5]


def test_a_config_as_a_dict_equals_dataclasses_asdict() -> None:
    import dataclasses

    from storysync_dist.core.config import _LATER_DEFAULTS, _PREFIXES, StorySyncConfig

    # Options added later are left out at their defaults (config.py, _LATER_DEFAULTS); set here so
    # the dict holds every field.
    config = StorySyncConfig(share_dropout_scope="resolution", bli_window="while_sharing", bli_lambda_end=0.5,
                             bli_layers="shared", bli_latents="consistent", mask_window=5,
                             feature_injection=True).with_layers(
        ("down_blocks.1", "up_blocks.0"), ("up_blocks.1",))
    want = dataclasses.asdict(config)
    for key in _PREFIXES:
        want[key] = None if getattr(config, key) is None else list(getattr(config, key))
    assert config.to_dict() == want
    assert [type(v) for v in config.to_dict().values()] == [type(v) for v in want.values()]
    stock = StorySyncConfig()
    assert stock.to_dict() == {k: v for k, v in dataclasses.asdict(stock).items() if k not in _LATER_DEFAULTS}
