"""``storysync eval --metrics oracle``: toyworld frames drawn from known scenes (``world.render``),
so the truth is known, scored by the oracle metric: identity consistency against a plain pairwise
loop, adherence for a wrong background or place, background leakage onto an anchor's background,
a missing subject, a prompt outside toyworld (exit 2), and the whole path through
``evaluate_dataset`` on a real storysync dataset (tables, summary, plumbing check, rerun, Ray)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storysync_dist.cli import main
from storysync_dist.errors import StorySyncUserError
from storysync_dist.eval.encoders import METRICS, ORACLE_WEIGHTS, load_encoders
from storysync_dist.eval.oracle import anchor_positions, background_leakage, score_oracle, subject_class
from storysync_dist.eval.report import SETTINGS_NOTE, bench_rows, plot_adherence, table_markdown
from storysync_dist.eval.run import EvalOptions, check_eval_options, evaluate_dataset
from storysync_dist.eval.scores import FrameForEval, score_story
from storysync_dist.io import FrameRecord, ParquetFrameSink, png_bytes
from storysync_dist.toyworld.world import Identity, Placed, Scene, prompt_of, render

RED_HAT = Identity("red", "plain", "hat")
LIME_SPOT = Identity("lime", "spot", "none")
PINK_HALVES = Identity("pink", "halves", "none")


def drawn(background: str, *objects: Placed, prompt_background: str | None = None,
          prompt_objects: tuple[Placed, ...] | None = None) -> tuple[np.ndarray, str]:
    """A true picture of ``objects`` on ``background`` and a prompt: the picture's own, or one that
    asks for ``prompt_background`` / ``prompt_objects`` instead (a frame that got it wrong)."""
    kind = "single" if len(objects) == 1 else "pair"
    image, _ = render(Scene(background, objects, kind))
    asked = prompt_objects or objects
    prompt = prompt_of(Scene(prompt_background or background, asked, "single" if len(asked) == 1 else "pair"))
    return image, prompt


def ball(place: str, identity: Identity = RED_HAT) -> Placed:
    return Placed("ball", place, identity)


def score(frames: list[tuple[np.ndarray, str]], anchors: list[bool | None] | None = None):
    ids = [f"f{k}" for k in range(len(frames))]
    return score_oracle("story", ids, [p for _, p in frames], [im for im, _ in frames], anchors)


def test_identity_consistency_is_the_fraction_of_equal_pairs() -> None:
    # Three frames of one identity, one of another: 3 of the 6 pairs are equal.
    frames = [drawn("beach", ball("left")), drawn("forest", ball("right"), Placed("tent", "left", PINK_HALVES)),
              drawn("lake", ball("middle")), drawn("city", ball("left", LIME_SPOT))]
    rows, story = score(frames)
    identities = [r["oracle_identity"] for r in rows]
    assert identities == [RED_HAT.label()] * 3 + [LIME_SPOT.label()]  # the companion tent is not the subject
    pairs = list(itertools.combinations(identities, 2))
    equal = 0
    for a, b in pairs:
        if a is not None and b is not None and a == b:
            equal += 1
    assert story["identity_consistency"] == equal / len(pairs) == 0.5
    assert story["adherence"] == 1.0 and [r["oracle_adherent"] for r in rows] == [1.0] * 4
    assert [r["oracle_background"] for r in rows] == ["beach", "forest", "lake", "city"]
    # One frame: no pair.
    assert math.isnan(score(frames[:1])[1]["identity_consistency"])


def test_a_wrong_background_or_place_is_not_adherent() -> None:
    frames = [
        drawn("beach", ball("left")),  # as prompted
        drawn("beach", ball("left"), prompt_background="forest"),  # asked for the forest
        drawn("city", ball("right"), prompt_objects=(ball("left"),)),  # asked for the left
        drawn("lake", ball("left"), Placed("tent", "right", LIME_SPOT),
              prompt_objects=(ball("right"), Placed("tent", "left", LIME_SPOT))),  # the pair swapped
    ]
    rows, story = score(frames)
    assert [r["oracle_adherent"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert story["adherence"] == 0.25
    assert rows[1]["oracle_background"] == "beach"
    # Identity does not depend on adherence: the subject is read wherever it is.
    assert story["identity_consistency"] == 1.0


def test_background_leakage_onto_an_anchor_background() -> None:
    frames = [
        drawn("beach", ball("left")),  # anchor
        drawn("forest", ball("right")),  # anchor
        drawn("beach", ball("middle"), prompt_background="lake"),  # leaked: the first anchor's beach
        drawn("forest", ball("left"), prompt_background="city"),  # leaked: the second anchor's forest
        drawn("lake", ball("left"), prompt_background="city"),  # wrong, but no anchor's: not leakage
        drawn("city", ball("left")),  # right
        drawn("beach", ball("right")),  # eligible (the forest anchor differs), right
    ]
    rows, story = score(frames)
    assert [r["oracle_background"] for r in rows] == ["beach", "forest", "beach", "forest", "lake", "city", "beach"]
    assert story["background_leakage"] == pytest.approx(2 / 5)
    # The dataset's flags decide the anchors when it has them: frames 5 and 6 (city, beach).
    flags = [False] * 5 + [True, True]
    _, flagged = score(frames, flags)
    # Eligible: frames 0-4 (each differs from city or beach); leaked: frame 2 read beach for lake.
    assert flagged["background_leakage"] == pytest.approx(1 / 5)
    # Unknown or no flags: the first two frames.
    assert anchor_positions(None, 7) == anchor_positions([None] * 7, 7) == anchor_positions([False] * 7, 7) == [0, 1]
    assert anchor_positions(None, 1) == [0]
    # No eligible frame: every prompt asks for the anchors' one background.
    same = [drawn("lake", ball("left")), drawn("lake", ball("right")), drawn("forest", ball("middle"),
                                                                             prompt_background="lake")]
    assert math.isnan(score(same)[1]["background_leakage"])
    assert math.isnan(background_leakage(["beach", "forest"], ["beach", "forest"], [0, 1]))


def test_a_missing_subject_has_no_identity_and_never_matches() -> None:
    frames = [
        drawn("beach", ball("left")),
        drawn("forest", Placed("tent", "left", RED_HAT), prompt_objects=(ball("left"),)),  # a tent, no ball
        drawn("city", ball("right")),
    ]
    empty = np.empty((64, 64, 3), np.uint8)
    empty[:] = (164, 164, 172)  # the city, and nothing on it
    frames.append((empty, "a ball in the middle in the city"))
    rows, story = score(frames)
    assert [r["oracle_identity"] for r in rows] == [RED_HAT.label(), None, RED_HAT.label(), None]
    assert [r["oracle_adherent"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    # Six pairs; only (0, 2) is equal: the two frames without a subject do not match each other.
    assert story["identity_consistency"] == pytest.approx(1 / 6)


def test_the_subject_class_is_the_most_common_first_named_class() -> None:
    assert subject_class(["tent", "ball", "ball", "tent", "ball"]) == "ball"
    assert subject_class(["tent", "ball", "ball", "tent"]) == "tent"  # a tie: the first frame's
    assert subject_class(["log", "ball", "tent", "tent", "ball"]) == "ball"  # a tie without it: the earliest
    # The subject follows the story, not each frame: a frame naming the tent first reads the ball.
    frames = [drawn("beach", ball("left")), drawn("forest", ball("right")),
              drawn("lake", Placed("tent", "left", LIME_SPOT), ball("right"))]
    rows, story = score(frames)
    assert frames[2][1].startswith("a tent")
    assert [r["oracle_identity"] for r in rows] == [RED_HAT.label()] * 3 and story["identity_consistency"] == 1.0


def test_a_prompt_outside_toyworld_is_a_one_line_user_error() -> None:
    frames = [drawn("beach", ball("left")), (drawn("lake", ball("left"))[0], "a red fox in the snow")]
    with pytest.raises(StorySyncUserError, match=r"story story frame f1 \(index 1\).*toyworld renders only") as err:
        score(frames)
    assert "\n" not in str(err.value)


def test_oracle_alone_loads_nothing_and_is_not_in_the_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no encoder weights anywhere
    for source in ({}, {"encoders": "random-tiny"}):
        enc = load_encoders(["oracle"], **source)
        assert enc.metrics == ("oracle",) and enc.weights == {"oracle": ORACLE_WEIGHTS}
        assert (enc.clip, enc.dino, enc.lpips, enc.dreamsim, enc.remover) == (None,) * 5
        assert enc.plumbing_check is False  # random-tiny loads nothing random for the oracle
    assert check_eval_options(EvalOptions(dataset="x")) == METRICS and "oracle" not in METRICS
    assert check_eval_options(EvalOptions(dataset="x", metrics=["oracle", "clip-t"])) == ("oracle", "clip-t")
    # Scoring with the oracle alone: the other columns are NaN.
    frames = [FrameForEval("s", f"f{k}", p, Image.fromarray(im)) for k, (im, p) in
              enumerate([drawn("beach", ball("left")), drawn("forest", ball("right"))])]
    rows, story = score_story(frames, enc, None, ["oracle"])
    assert story["identity_consistency"] == 1.0 and story["adherence"] == 1.0
    assert math.isnan(story["clip_t"]) and math.isnan(story["clip_i"]) and math.isnan(rows[0]["clip_t"])


# -- the whole path: a real dataset, evaluate_dataset, the tables ------------------------------------------


def _story(name: str) -> list[tuple[np.ndarray, str]]:
    """Five frames, anchors first. ``same``: one identity, all as prompted. ``mixed``: identities
    3 + 1 + a frame without its ball, one frame drawn on the first anchor's beach."""
    if name == "same":
        return [drawn("beach", ball("left")), drawn("forest", ball("right")), drawn("lake", ball("middle")),
                drawn("city", ball("left"), Placed("log", "right", LIME_SPOT)), drawn("beach", ball("right"))]
    return [
        drawn("beach", ball("left", LIME_SPOT)),
        drawn("forest", ball("right", LIME_SPOT)),
        drawn("beach", ball("middle", LIME_SPOT), prompt_background="lake"),  # leaked, not adherent
        drawn("city", ball("left", RED_HAT)),
        drawn("lake", Placed("tent", "right", PINK_HALVES), prompt_objects=(ball("right"),)),  # no ball
    ]


def write_dataset(root: Path, model: str, stories: dict[str, list[tuple[np.ndarray, str]]],
                  anchors: tuple[int, ...] = (0, 1)) -> Path:
    """A storysync dataset of ``stories`` (frames in order), the frames at ``anchors`` flagged
    ``is_anchor``."""
    sink = ParquetFrameSink(str(root))
    for story_id, frames in stories.items():
        sink.write([FrameRecord(
            story_id=story_id, frame_id=f"f{k:03d}", frame_index=k, prompt=prompt, seed=k,
            image_png=png_bytes(Image.fromarray(image)), width=64, height=64, model=model, method="storysync",
            config="{}", is_anchor=k in anchors, fingerprint=f"{story_id}-{k}")
            for k, (image, prompt) in enumerate(frames)])
        sink.commit_story(story_id)
    return root


@pytest.fixture(scope="module")
def toyworld_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("oracle") / "toyworld", "toyworld",
                         {"mixed": _story("mixed"), "same": _story("same")})


def test_evaluate_dataset_writes_the_oracle_scores(toyworld_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    result = evaluate_dataset(EvalOptions(dataset=str(toyworld_dataset), out=str(out), metrics=["oracle"],
                                          progress=False))
    stories = {r["story_id"]: r for r in pq.read_table(out / "per_story.parquet").to_pylist()}
    mixed, same = stories["mixed"], stories["same"]
    # mixed: identities lime x3, red, none -> pairs (0,1),(0,2),(1,2) of 10 equal.
    assert mixed["identity_consistency"] == pytest.approx(3 / 10)
    assert mixed["adherence"] == pytest.approx(3 / 5)
    # Eligible: frames 2, 3, 4 (lake, city, lake prompted); frame 2 read the beach anchor's beach.
    assert mixed["background_leakage"] == pytest.approx(1 / 3)
    assert (same["identity_consistency"], same["adherence"], same["background_leakage"]) == (1.0, 1.0, 0.0)
    for row in stories.values():
        assert row["plumbing_check"] is False and math.isnan(row["clip_t"]) and math.isnan(row["dreamsim"])
    frames = {(r["story_id"], r["frame_id"]): r for r in pq.read_table(out / "per_frame.parquet").to_pylist()}
    assert frames["mixed", "f002"]["oracle_background"] == "beach" and frames["mixed", "f002"]["oracle_adherent"] == 0.0
    assert frames["mixed", "f004"]["oracle_identity"] is None
    assert frames["mixed", "f003"]["oracle_identity"] == "red/plain/hat"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plumbing_check"] is False and summary["random_weight_models"] == []
    assert summary["metrics"] == ["oracle"] and summary["weights"] == {"oracle": ORACLE_WEIGHTS}
    assert summary["mean"] == pytest.approx({"identity-consistency": (0.3 + 1.0) / 2, "adherence": (0.6 + 1.0) / 2,
                                             "background-leakage": (1 / 3 + 0.0) / 2})
    assert result.summary["mean"] == summary["mean"]
    header = (out / "per_story.csv").read_text().splitlines()[0].split(",")
    assert {"identity_consistency", "adherence", "background_leakage"} <= set(header)
    # A rerun keeps every story.
    again = evaluate_dataset(EvalOptions(dataset=str(toyworld_dataset), out=str(out), metrics=["oracle"],
                                         progress=False))
    assert again.scored == [] and again.reused == ["mixed", "same"] and again.summary["mean"] == summary["mean"]
    # The same frames (ids, fingerprints) with other anchors flagged: scored again, and the new
    # anchors (city, lake) make the beach read for the lake no leakage.
    late = write_dataset(tmp_path / "late", "toyworld", {"mixed": _story("mixed"), "same": _story("same")},
                         anchors=(3, 4))
    moved = evaluate_dataset(EvalOptions(dataset=str(late), out=str(out), metrics=["oracle"], progress=False))
    assert moved.scored == ["mixed", "same"]
    assert {r["story_id"]: r["background_leakage"] for r in moved.story_rows} == {"mixed": 0.0, "same": 0.0}


def test_anchors_default_to_the_first_two_frames_and_random_presets_are_a_plumbing_check(tmp_path: Path) -> None:
    # No anchor flagged (as vanilla renders): the first two frames; tiny-sd has random weights.
    root = write_dataset(tmp_path / "tiny", "tiny-sd", {"mixed": _story("mixed")}, anchors=())
    result = evaluate_dataset(EvalOptions(dataset=str(root), metrics=["oracle"], progress=False))
    (row,) = result.story_rows
    assert row["background_leakage"] == pytest.approx(1 / 3) and row["plumbing_check"] is True
    assert result.summary["plumbing_check"] is True and result.summary["random_weight_models"] == ["tiny-sd"]


def test_eval_cli_refuses_a_non_toyworld_dataset_with_exit_2(tmp_path: Path, capsys) -> None:
    frames = _story("same")
    frames[3] = (frames[3][0], "a red fox in the snow")
    root = write_dataset(tmp_path / "fox", "toyworld", {"fox": frames})
    out = tmp_path / "scores"
    assert main(["eval", str(root), "--metrics", "oracle", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "story fox frame f003" in err and "toyworld renders only" in err
    assert not out.exists()


def test_ray_workers_give_the_oracle_scores_of_one_process(tmp_path: Path, ray_cluster) -> None:
    # Anchors flagged on the last two frames (city, lake), so that the flags must reach the worker:
    # the beach read for the lake is no anchor's background then, and "mixed" leaks nothing.
    root = write_dataset(tmp_path / "late", "toyworld", {"mixed": _story("mixed"), "same": _story("same")},
                         anchors=(3, 4))
    local = evaluate_dataset(EvalOptions(dataset=str(root), out=str(tmp_path / "local"),
                                         metrics=["oracle"], progress=False))
    remote = evaluate_dataset(EvalOptions(dataset=str(root), out=str(tmp_path / "ray"),
                                          metrics=["oracle"], workers=1, progress=False))
    assert {r["story_id"]: r["background_leakage"] for r in remote.story_rows}["mixed"] == 0.0
    assert remote.summary["mean"] == local.summary["mean"]
    columns = ["story_id", "frame_id", "oracle_adherent", "oracle_identity", "oracle_background"]
    assert pq.read_table(tmp_path / "ray" / "per_frame.parquet", columns=columns).to_pylist() == \
        pq.read_table(tmp_path / "local" / "per_frame.parquet", columns=columns).to_pylist()


def test_bench_report_has_the_oracle_columns_and_plot() -> None:
    summaries = {
        "vanilla": {"stories": 2, "frames": 10, "mean": {"identity-consistency": 0.05, "adherence": 0.9,
                                                         "background-leakage": 0.0}},
        "storysync": {"stories": 2, "frames": 10, "mean": {"identity-consistency": 0.7, "adherence": 0.85,
                                                           "background-leakage": 0.1}},
    }
    rows = bench_rows(summaries, model="toyworld", metrics=["oracle"])
    assert rows[1] == {"method": "storysync", "model": "toyworld", "stories": 2, "frames": 10,
                       "identity_consistency": 0.7, "adherence": 0.85, "background_leakage": 0.1}
    table = table_markdown(rows, ["oracle"], plumbing_check=False)
    assert "| Method | Model | Identity ↑ | Adherence ↑ | BG leakage ↓ |" in table
    assert "| StorySync | toyworld | 0.7000 | 0.8500 | 0.1000 |" in table
    # A table with a StorySync row says which of its settings are the paper's and which are ours.
    assert table.rstrip().endswith(SETTINGS_NOTE) and "γ 0.3, λ 0.7" in SETTINGS_NOTE
    assert SETTINGS_NOTE not in table_markdown(rows[:1], ["oracle"], plumbing_check=False)
    # print_bench_result passes the row keys back as names: the same table.
    names = [k.replace("_", "-") for k in rows[0] if k not in ("method", "model", "stories", "frames")]
    assert table_markdown(rows, names, plumbing_check=False) == table
    png = plot_adherence(rows, plumbing_check=False)
    assert png.startswith(b"\x89PNG")
    # With CLIP-T and the oracle, both sets of columns; CLIP-T stays the plot's x.
    both = bench_rows({"vanilla": {"stories": 1, "frames": 5, "mean": {"clip-t": 0.3, "adherence": 1.0}}},
                      model="toyworld", metrics=["clip-t", "oracle"])
    assert list(both[0])[4:] == ["clip_t", "identity_consistency", "adherence", "background_leakage"]
    assert plot_adherence(both, plumbing_check=True).startswith(b"\x89PNG")
