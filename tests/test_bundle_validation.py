"""The anchor-bundle loader checks everything it reads: every malformed file is one BundleError line.

All bundles are synthetic (built here, no model): 2 anchors, 4 steps, two shared layers at steps 1..3.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storysync_dist.cli import main
from storysync_dist.core.anchors import (
    BUNDLE_FORMAT,
    DEFAULT_MAX_BUNDLE_BYTES,
    MAX_ANCHORS,
    AnchorBundle,
    AnchorStep,
    BundleError,
    SharedLayerState,
)
from storysync_dist.core.config import StorySyncConfig
from storysync_dist.models.unet import MASK_LAYERS, SHARE_LAYERS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "story.yaml"

LAYER_A = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
LAYER_B = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
# layer -> (num_tokens N, C, C_inner)
LAYERS = {LAYER_A: (16, 8, 6), LAYER_B: (64, 4, 4)}
STEPS = 4
# Current-step masks (the default config): the anchors publish every step from step 0.
SHARED_STEPS = range(0, STEPS)
assert StorySyncConfig().first_shared_step() == SHARED_STEPS[0]


# ---- builders --------------------------------------------------------------------------------
def make_meta(**changes: Any) -> dict[str, Any]:
    """A valid version-2 meta matching examples/story.yaml at 64x64 px and 4 steps on tiny-sdxl."""
    meta = {
        "model": "tiny-sdxl",
        "model_revision": None,
        "dtype": "float32",
        "steps": STEPS,
        "height": 64,
        "width": 64,
        "guidance_scale": 5.0,
        "negative_prompt": None,  # examples/story.yaml has none (it renders on every family)
        # as a float32 tiny-sdxl job resolves it (layers, float16 anchors)
        "config": StorySyncConfig().with_layers(SHARE_LAYERS, MASK_LAYERS).with_anchor_dtype("float32").to_dict(),
        "num_anchors": 2,
        "anchor_ids": ["beach", "kitchen"],
        "anchor_prompts": ["a cat on a beach", "a cat in a kitchen"],
        "anchor_seeds": [7, 1],
        "anchor_token_positions": [[[6]], [[6]]],
    }
    meta.update(changes)
    return meta


def make_layer(gen: torch.Generator, num_tokens: int, c: int, c2: int, branches: int = 2) -> SharedLayerState:
    """Random subject tokens of 2 anchors: index (M,), hidden (G, M, C), features (G, M, C2), float16."""
    m = num_tokens // 2
    index = torch.randperm(2 * num_tokens, generator=gen)[:m].sort().values
    return SharedLayerState(
        index=index,
        hidden=torch.randn(branches, m, c, generator=gen).half(),
        features=torch.randn(branches, m, c2, generator=gen).half(),
        num_tokens=num_tokens,
    )


def make_steps(seed: int = 0) -> dict[int, AnchorStep]:
    gen = torch.Generator().manual_seed(seed)
    return {
        t: AnchorStep(t, {name: make_layer(gen, *dims) for name, dims in LAYERS.items()}) for t in SHARED_STEPS
    }


def make_bundle(**meta_changes: Any) -> AnchorBundle:
    return AnchorBundle(make_meta(**meta_changes), make_steps())


def valid_bytes() -> bytes:
    return make_bundle().to_bytes()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, tensor data) of a safetensors file."""
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: Any, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def edit_header(edit: Callable[[dict[str, Any]], None], data: bytes | None = None) -> bytes:
    """A valid bundle whose header JSON ``edit`` changed in place (the tensor data kept)."""
    header, body = split(valid_bytes() if data is None else data)
    edit(header)
    return join(header, body)


def edit_metadata(key: str, edit: Callable[[Any], Any]) -> bytes:
    """A valid bundle whose __metadata__ JSON entry ``key`` ("meta" or "layout") is ``edit(value)``."""

    def apply(header: dict[str, Any]) -> None:
        header["__metadata__"][key] = json.dumps(edit(json.loads(header["__metadata__"][key])))

    return edit_header(apply)


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    """A valid bundle re-saved with its tensors changed by ``edit`` (metadata kept)."""
    data = valid_bytes()
    header, _ = split(data)
    tensors = load_safetensors(data)
    edit(tensors)
    return save_safetensors(tensors, metadata=header["__metadata__"])


def edit_layer(t: int, name: str, part: str, change: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    def apply(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{t}|{name}|{part}"] = change(tensors[f"{t}|{name}|{part}"]).contiguous()

    return edit_tensors(apply)


def with_nan(features: torch.Tensor) -> torch.Tensor:
    features = features.clone()
    features[0, 1, 2] = float("nan")
    return features


def out_of_range(index: torch.Tensor) -> torch.Tensor:
    index = index.clone()
    index[-1] = 2 * LAYERS[LAYER_A][0]  # num_anchors * num_tokens: one past the last token
    return index


def set_meta(key: str, value: Any) -> bytes:
    return edit_metadata("meta", lambda meta: {**meta, key: value})


def drop_metadata(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["__metadata__"].pop(key)


def set_format(fmt: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["__metadata__"].update(format=fmt)


def set_num_tokens(t: str, name: str, value: Any) -> Callable[[Any], Any]:
    def apply(layout: dict[str, Any]) -> dict[str, Any]:
        layout[t][name] = value
        return layout

    return apply


def offsets_past_end(header: dict[str, Any]) -> None:
    entry = header[f"1|{LAYER_A}|hidden"]
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin + 10**6, end + 10**6]


def overlap(header: dict[str, Any]) -> None:
    header[f"2|{LAYER_A}|hidden"]["data_offsets"] = header[f"1|{LAYER_A}|hidden"]["data_offsets"]


def bool_in_shape(header: dict[str, Any]) -> None:
    header[f"1|{LAYER_A}|index"]["shape"] = [True]


def garbage() -> bytes:
    return random.Random(0).randbytes(1000)


def bundle_without(t: int) -> AnchorBundle:
    steps = make_steps()
    del steps[t]
    return AnchorBundle(make_meta(), steps)


def g_mismatch(tensors: dict[str, torch.Tensor]) -> None:
    for part in ("hidden", "features"):
        tensors[f"3|{LAYER_B}|{part}"] = tensors[f"3|{LAYER_B}|{part}"][1:].contiguous()


def channel_mismatch(tensors: dict[str, torch.Tensor]) -> None:
    key = f"2|{LAYER_A}|features"
    tensors[key] = torch.cat([tensors[key], tensors[key][..., :1]], dim=-1).contiguous()


# name -> (malformed file, a piece of the message that names the problem)
MALFORMED: dict[str, tuple[Callable[[], bytes], str]] = {
    "garbage": (garbage, "not a safetensors file"),
    "too-short": (lambda: b"\x01\x02\x03", "only 3 bytes"),
    "truncated-header": (lambda: valid_bytes()[:100], "truncated"),
    "truncated-data": (lambda: valid_bytes()[:-10], "lie outside"),
    "header-over-100mb": (lambda: struct.pack("<Q", 200_000_000) + b"{}" * 10, "header length 200000000"),
    "header-not-utf8": (lambda: struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
    "header-not-json": (lambda: struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
    "header-deeply-nested": (lambda: struct.pack("<Q", 200000) + b"[" * 200000, "not valid JSON"),
    "header-is-a-list": (lambda: join([1, 2, 3], b""), "is a JSON list, expected an object"),
    "no-metadata": (lambda: edit_header(lambda h: h.pop("__metadata__")), "no __metadata__"),
    "metadata-not-strings": (lambda: edit_header(lambda h: h["__metadata__"].update(meta={"a": 1})),
                             "'meta' is a JSON object, expected a string"),
    "no-layout": (lambda: edit_header(drop_metadata("layout")), "no 'layout'"),
    "no-meta": (lambda: edit_header(drop_metadata("meta")), "no 'meta'"),
    "format-1": (lambda: edit_header(set_format("storysync-anchor-bundle/1")), "older version"),
    "other-format": (lambda: edit_header(set_format("something-else/7")), "not a StorySync anchor bundle"),
    "no-format": (lambda: edit_header(drop_metadata("format")), "not a StorySync anchor bundle (no format"),
    "meta-not-json": (lambda: edit_header(lambda h: h["__metadata__"].update(meta="{nope")),
                      "'meta' is not valid JSON"),
    "meta-is-a-list": (lambda: edit_metadata("meta", lambda meta: [meta]), "'meta' is a JSON list"),
    "float64-hidden": (lambda: edit_layer(3, LAYER_A, "hidden", lambda x: x.double()),
                       f"step 3 layer '{LAYER_A}': hidden has dtype float64, expected float16"),
    "float32-index": (lambda: edit_layer(1, LAYER_B, "index", lambda x: x.float()),
                      "index has dtype float32, expected int64"),
    "negative-num-tokens": (lambda: edit_metadata("layout", set_num_tokens("2", LAYER_B, -5)),
                            f"layout step 2 layer '{LAYER_B}': num_tokens must be an integer in 1..1048576, got -5"),
    "bool-num-tokens": (lambda: edit_metadata("layout", set_num_tokens("2", LAYER_B, True)),
                        "num_tokens must be an integer"),
    "layout-step-out-of-range": (lambda: edit_metadata("layout", lambda lay: {**lay, "4": lay["1"]}),
                                 "layout step 4 is outside the bundle's 4 steps"),
    "layout-key-not-a-step": (lambda: edit_metadata("layout", lambda lay: {**lay, "01": {}}),
                              "layout key '01' is not a step number"),
    "layout-empty-layer-name": (lambda: edit_metadata("layout", lambda lay: {**lay, "0": {"": 4}}),
                                "empty name"),
    "huge-num-anchors": (lambda: set_meta("num_anchors", 10**12), f"num_anchors must be an integer in 1..{MAX_ANCHORS}"),
    "num-anchors-disagrees": (lambda: set_meta("num_anchors", 3), "anchor_ids has 2 entries, expected num_anchors=3"),
    "anchor-id-int": (lambda: set_meta("anchor_ids", ["beach", 5]), "anchor_ids[1] must be a frame id"),
    "anchor-id-slash": (lambda: set_meta("anchor_ids", ["beach", "a/b"]), "anchor_ids[1] must be a frame id"),
    "anchor-id-duplicate": (lambda: set_meta("anchor_ids", ["beach", "beach"]), "'beach' twice"),
    "anchor-seed-bool": (lambda: set_meta("anchor_seeds", [7, True]), "anchor_seeds[1] must be an integer"),
    "anchor-seed-negative": (lambda: set_meta("anchor_seeds", [-1, 1]), "anchor_seeds[0]"),
    "anchor-prompt-not-str": (lambda: set_meta("anchor_prompts", ["a", None]), "anchor_prompts[1] must be a string"),
    "token-positions-negative": (lambda: set_meta("anchor_token_positions", [[[6]], [[-1]]]),
                                 "anchor_token_positions[1][0] must be a list of non-negative integer"),
    "token-positions-flat": (lambda: set_meta("anchor_token_positions", [[6], [6]]),
                             "anchor_token_positions[0][0] must be a list"),
    "steps-bool": (lambda: set_meta("steps", True), "meta steps must be an integer in 1..10000, got True"),
    "steps-zero": (lambda: set_meta("steps", 0), "meta steps must be an integer"),
    "height-float": (lambda: set_meta("height", 64.0), "meta height must be an integer"),
    "guidance-nan": (lambda: set_meta("guidance_scale", float("nan")), "guidance_scale must be a finite number"),
    "guidance-negative": (lambda: set_meta("guidance_scale", -1), "guidance_scale must be a finite number >= 0"),
    "dtype-float64": (lambda: set_meta("dtype", "float64"), "meta dtype must be one of"),
    "model-missing": (lambda: edit_metadata("meta", lambda m: {k: v for k, v in m.items() if k != "model"}),
                      "meta has no 'model'"),
    "model-revision-int": (lambda: set_meta("model_revision", 3), "model_revision must be a string or null"),
    "config-unknown-key": (lambda: set_meta("config", {"nope": 1}), "meta config is not a StorySync config"),
    "config-bad-value": (lambda: set_meta("config", {"rfh_gamma": "x"}), "meta config is not a StorySync config"),
    "nan-features": (lambda: edit_layer(2, LAYER_A, "features", with_nan),
                     f"step 2 layer '{LAYER_A}': features holds 1 non-finite value"),
    "inf-hidden": (lambda: edit_layer(1, LAYER_B, "hidden", lambda x: x * float("inf")), "hidden holds"),
    "index-out-of-range": (lambda: edit_layer(1, LAYER_A, "index", out_of_range), "index value 32 is outside [0, 32)"),
    "index-negative": (lambda: edit_layer(1, LAYER_A, "index", lambda x: x - x[0] - 1), "index value -1"),
    "index-not-increasing": (lambda: edit_layer(1, LAYER_A, "index", lambda x: x.flip(0)),
                             "index is not strictly increasing at position 1"),
    "index-2d": (lambda: edit_layer(1, LAYER_A, "index", lambda x: x[None]), "index has shape (1, 8), expected (M,)"),
    "hidden-shape-vs-index": (lambda: edit_layer(2, LAYER_B, "hidden", lambda x: x[:, 1:]),
                              "hidden has shape (2, 31, 4): 31 tokens, index has 32"),
    "hidden-2d": (lambda: edit_layer(2, LAYER_B, "hidden", lambda x: x[0]), "expected (G, M, C)"),
    "three-branches": (lambda: edit_layer(2, LAYER_B, "features", lambda x: torch.cat([x, x[:1]])),
                       "features has 3 guidance branches, expected 1 or 2"),
    "branches-differ": (lambda: edit_tensors(g_mismatch), "has 1 guidance branch(es)"),
    "channels-differ": (lambda: edit_tensors(channel_mismatch), f"hidden/features have 8/7 channels, 8/6 at step {SHARED_STEPS[0]}"),
    "extra-tensor": (lambda: edit_tensors(lambda ts: ts.update({"junk": torch.zeros(2)})),
                     "tensor(s) not in the layout: 'junk'"),
    "missing-tensor": (lambda: edit_tensors(lambda ts: ts.pop(f"3|{LAYER_B}|features")),
                       f"tensor(s) of the layout missing: '3|{LAYER_B}|features'"),
    "offsets-past-end": (lambda: edit_header(offsets_past_end), "data_offsets"),
    "offsets-overlap": (lambda: edit_header(overlap), "overlap tensor"),
    "trailing-data": (lambda: valid_bytes() + b"\0" * 16, "16 bytes of tensor data after the last tensor"),
    "offsets-vs-shape": (lambda: edit_header(lambda h: h[f"1|{LAYER_A}|hidden"].update(shape=[2, 8, 9])),
                         "need"),
    "shape-bool": (lambda: edit_header(bool_in_shape), "expected a list of non-negative integers"),
    "unknown-dtype": (lambda: edit_header(lambda h: h[f"1|{LAYER_A}|hidden"].update(dtype="Q7")),
                      "unsupported dtype 'Q7'"),
    "entry-not-object": (lambda: edit_header(lambda h: h.update(x=[1])), "tensor 'x': header entry is a JSON list"),
}


def assert_one_line_error(data: bytes, expected: str, **kwargs: Any) -> str:
    with pytest.raises(BundleError) as info:
        AnchorBundle.from_bytes(data, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message and "\n" not in message and "\r" not in message
    assert expected in message, message
    return message


# ---- tests -----------------------------------------------------------------------------------
def test_a_valid_bundle_round_trips_and_covers_its_steps() -> None:
    bundle = make_bundle()
    data = bundle.to_bytes()
    assert split(data)[0]["__metadata__"]["format"] == BUNDLE_FORMAT == "storysync-anchor-bundle/2"
    back = AnchorBundle.from_bytes(data)
    assert back.meta == bundle.meta and back.num_anchors == 2
    assert sorted(back.steps) == list(SHARED_STEPS)
    for t, anchor_step in bundle.steps.items():
        assert back.steps[t].step == t and set(back.steps[t].layers) == set(LAYERS)
        for name, layer in anchor_step.layers.items():
            got = back.steps[t].layers[name]
            assert torch.equal(got.index, layer.index) and got.index.dtype == torch.int64
            assert torch.equal(got.hidden, layer.hidden) and got.hidden.dtype == torch.float16
            assert torch.equal(got.features, layer.features) and got.num_tokens == layer.num_tokens
    back.check_coverage(SHARED_STEPS)
    back.check_coverage([1, 3])


def test_extra_meta_keys_are_kept_and_other_anchor_dtypes_and_one_branch_load() -> None:
    gen = torch.Generator().manual_seed(3)
    config = StorySyncConfig(anchor_dtype="bfloat16").to_dict()
    layer = make_layer(gen, 16, 8, 6, branches=1)
    layer = SharedLayerState(layer.index, layer.hidden.bfloat16(), layer.features.bfloat16(), 16)
    bundle = AnchorBundle(make_meta(config=config, extra_key={"x": [1]}), {1: AnchorStep(1, {LAYER_A: layer})})
    back = AnchorBundle.from_bytes(bundle.to_bytes())
    assert back.meta["extra_key"] == {"x": [1]}
    assert back.steps[1].layers[LAYER_A].hidden.dtype == torch.bfloat16
    assert torch.equal(back.steps[1].layers[LAYER_A].features, layer.features)
    # a float16 layer in a bfloat16 bundle is refused
    wrong = AnchorBundle(make_meta(config=config), make_steps())
    assert_one_line_error(wrong.to_bytes(), "hidden has dtype float16, expected bfloat16")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_bundle_is_one_bundle_error_line(case: str) -> None:
    build, expected = MALFORMED[case]
    assert_one_line_error(build(), expected)


def test_the_size_limit_is_checked_first() -> None:
    data = valid_bytes()
    assert DEFAULT_MAX_BUNDLE_BYTES >= 2**30
    assert_one_line_error(data, f"file is {len(data)} bytes, over the limit of 100 bytes", max_bytes=100)
    assert_one_line_error(garbage(), "over the limit of 10 bytes", max_bytes=10)
    AnchorBundle.from_bytes(data, max_bytes=len(data))


def test_the_old_format_asks_to_save_the_bundle_again() -> None:
    message = assert_one_line_error(edit_header(set_format("storysync-anchor-bundle/1")), "--save-anchors")
    assert "older version" in message


def test_messages_do_not_echo_long_or_multiline_values() -> None:
    message = assert_one_line_error(set_meta("anchor_ids", ["beach", "bad\nid" + "x" * 5000]), "anchor_ids[1]")
    assert len(message) < 300


def test_coverage_needs_steps_every_expected_step_and_the_same_layers() -> None:
    empty = AnchorBundle.from_bytes(AnchorBundle(make_meta(), {}).to_bytes())
    with pytest.raises(BundleError, match="holds no anchor steps: it would render every frame without sharing"):
        empty.check_coverage(SHARED_STEPS)
    with pytest.raises(BundleError, match="holds no anchor steps"):
        empty.check_coverage([])

    missing = AnchorBundle.from_bytes(bundle_without(2).to_bytes())
    with pytest.raises(BundleError, match=r"no anchor state for step\(s\) 2: 1 of the 4 steps") as info:
        missing.check_coverage(SHARED_STEPS)
    assert "\n" not in str(info.value)
    missing.check_coverage([0, 1, 3])
    with pytest.raises(BundleError, match=r"step\(s\) 2, 4, 5, \.\.\. \(4 in all\)"):
        missing.check_coverage(range(7))

    steps = make_steps()
    del steps[3].layers[LAYER_B]
    uneven = AnchorBundle.from_bytes(AnchorBundle(make_meta(), steps).to_bytes())
    with pytest.raises(BundleError, match=f"step 3 does not hold the layers of step 0: it lacks layer\\(s\\) '{LAYER_B}'"):
        uneven.check_coverage(SHARED_STEPS)
    steps = make_steps()
    steps[2].layers["up_blocks.9.attn1.processor"] = steps[2].layers[LAYER_A]
    extra = AnchorBundle(make_meta(), steps)
    with pytest.raises(BundleError, match="step 2 does not hold the layers of step 0: it has extra layer"):
        extra.check_coverage(SHARED_STEPS)


def test_nothing_but_bundle_error_escapes_on_damaged_files() -> None:
    """Flip bytes all over a valid file and cut it anywhere: it loads or raises BundleError, nothing else."""
    data = valid_bytes()
    header_len = struct.unpack_from("<Q", data, 0)[0]
    rng = random.Random(1)
    errors = 0
    for trial in range(300):
        damaged = bytearray(data)
        # mostly the header (where the structure is), sometimes the length or the tensors
        region = (0, 8) if trial % 10 == 0 else (8, 8 + header_len) if trial % 3 else (8 + header_len, len(data))
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(*region)] = rng.randrange(256)
        try:
            AnchorBundle.from_bytes(bytes(damaged))
        except BundleError as exc:
            assert "\n" not in str(exc)
            errors += 1
    for cut in range(0, len(data), max(1, len(data) // 100)):
        with pytest.raises(BundleError):
            AnchorBundle.from_bytes(data[:cut])
    assert errors > 100


def test_per_anchor_features_is_bounded_by_max_anchors() -> None:
    back = AnchorBundle.from_bytes(valid_bytes())
    layer = back.steps[1].layers[LAYER_A]
    parts = layer.per_anchor_features(0, back.num_anchors)
    assert len(parts) == 2 and sum(p.shape[0] for p in parts) == layer.index.numel()


# ---- the CLI: one line on stderr, exit 2, nothing written --------------------------------------
CLI_CASES = [
    "garbage", "truncated-header", "truncated-data", "header-is-a-list", "no-layout", "format-1",
    "float64-hidden", "negative-num-tokens", "huge-num-anchors", "anchor-id-slash", "nan-features",
    "index-out-of-range", "hidden-shape-vs-index", "extra-tensor", "missing-tensor", "steps-bool",
]


def render_with_anchors(path: Path, out: Path) -> int:
    return main([
        "render", str(EXAMPLE), "--model", "tiny-sdxl", "--steps", str(STEPS), "--height", "64",
        "--width", "64", "--no-progress", "--out", str(out), "--anchors", str(path),
    ])


def assert_cli_refuses(path: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = render_with_anchors(path, out)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"storysync: error: --anchors {path}: "), err
    assert not out.exists()
    return lines[0]


def test_the_cli_refuses_malformed_bundles_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case in CLI_CASES:
        build, expected = MALFORMED[case]
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(build())
        line = assert_cli_refuses(path, tmp_path / f"out-{case}", capsys)
        assert expected in line, line


def test_the_cli_refuses_bundles_that_do_not_cover_the_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bundles that load, and whose meta matches this render, but cannot serve it: refused before rendering.

    The message names the coverage problem, so the meta really matched the job's settings.
    """
    cases = {
        "no-steps": (AnchorBundle(make_meta(), {}), "holds no anchor steps"),
        "missing-step": (bundle_without(2), "holds no anchor state for step(s) 2:"),
    }
    for case, (bundle, expected) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(bundle.to_bytes())
        line = assert_cli_refuses(path, tmp_path / f"out-{case}", capsys)
        assert expected in line, line
