"""The metric encoders of `storysync eval` (eval/encoders.py, background.py, scores.py) on random-tiny
models: shapes, ranges, LPIPS against a plain reference, the pairwise reduction against a hand
computation, background removal through rembg, offline failures, determinism, the real-weights layout."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from storysync_dist.errors import StorySyncUserError
from storysync_dist.eval.background import (
    BACKGROUND_COLOUR,
    BackgroundRemover,
    build_random_tiny_u2net,
    load_background_remover,
)
from storysync_dist.eval.encoders import (
    HIGHER_IS_BETTER,
    METRICS,
    SUBJECT_METRICS,
    MissingWeightsError,
    dreamsim_distance,
    load_encoders,
)
from storysync_dist.eval.scores import STORY_COLUMNS, FrameForEval, score_story

RED, BLUE, GREEN, YELLOW = (200, 30, 30), (30, 30, 200), (30, 200, 30), (220, 220, 40)


@pytest.fixture(scope="module")
def tiny():
    return load_encoders(METRICS, encoders="random-tiny")


def noise(seed: int, size: int = 80) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def subject_on(background: tuple[int, int, int], size: int = 64) -> Image.Image:
    """A red square (the subject) with a yellow stripe, on a flat background."""
    a = np.empty((size, size, 3), dtype=np.uint8)
    a[:] = background
    a[16:48, 16:48] = RED
    a[28:36, 20:44] = YELLOW
    return Image.fromarray(a)


def red_detector(path) -> str:
    """An ONNX model with rembg's u2net interface whose saliency is sigmoid(10·(R − (G + B)/2)) on the
    ImageNet-normalised input: the red/yellow subject ≈ 1, a blue or green background ≈ 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[[[10.0]], [[-5.0]], [[-5.0]]]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["z"], kernel_shape=[1, 1]), helper.make_node("Sigmoid", ["z"], ["out"])],
        "red", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 320, 320])], initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_constants() -> None:
    assert set(SUBJECT_METRICS) == set(METRICS) - {"clip-t"}
    assert HIGHER_IS_BETTER == {"clip-t": True, "clip-i": True, "dino": True, "lpips": False, "dreamsim": False}


def test_shapes_and_ranges(tiny) -> None:
    images = [noise(k) for k in range(3)]
    assert tiny.plumbing_check and set(tiny.weights) == {*METRICS, "background"}
    assert all("random-tiny" in w for w in tiny.weights.values())
    text = tiny.text_embeddings(["a red fox", "a fox in the snow", "x"])
    assert text.shape == (3, 16) and torch.isfinite(text).all()
    assert tiny.clip_image_embeddings(images).shape == (3, 16)
    assert tiny.dino_embeddings(images).shape == (3, 32)
    emb = tiny.dreamsim_embeddings(images)
    assert emb.shape == (3, 32)
    rows, story = score_story(
        [FrameForEval("s", f"f{k}", p, im) for k, (p, im) in enumerate(zip(["a", "b", "c"], images))], tiny, None, METRICS
    )
    assert all(-1.0 <= r["clip_t"] <= 1.0 for r in rows) and -1.0 <= story["clip_t"] <= 1.0
    assert story["lpips"] > 0 and 0.0 <= story["dreamsim"] <= 2.0 and -1.0 <= story["clip_i"] <= 1.0
    assert tiny.lpips_distance(images[0], images[0]) == pytest.approx(0.0, abs=1e-6)
    assert tiny.lpips_distance(images[0], images[1]) > 0.0
    assert dreamsim_distance(emb[0], emb[0]) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= dreamsim_distance(emb[0], emb[1]) <= 2.0
    assert dreamsim_distance(emb[0], -emb[0]) == pytest.approx(2.0)
    same = tiny.dreamsim_embeddings([images[0], images[0].copy()])
    assert dreamsim_distance(same[0], same[1]) == pytest.approx(0.0, abs=1e-6)


def test_lpips_matches_a_plain_reference(tiny) -> None:
    a, b = noise(1, 96), subject_on(BLUE, 70)
    by_hand = [
        torch.from_numpy(np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float64) / 127.5 - 1.0)
        for im in (a, b)
    ]
    pixels = tiny.lpips_pixels([a, b])
    assert pixels.shape == (2, 3, 64, 64)
    assert torch.allclose(pixels.double(), torch.stack(by_hand).permute(0, 3, 1, 2), atol=1e-6)
    with torch.no_grad():
        feats = [f.double() for f in tiny.lpips.layer_features(pixels)]
    heads = [w.detach().double() for w in tiny.lpips.heads()]
    assert len(feats) == 5 and all((w >= 0).all() for w in heads)
    total = 0.0
    for fl, wl in zip(feats, heads):  # Zhang et al. 2018, Eq. 1, one loop per index
        _, channels, height, width = fl.shape
        layer = 0.0
        for h in range(height):
            for w in range(width):
                norm_a = math.sqrt(sum(float(fl[0, c, h, w]) ** 2 for c in range(channels))) + 1e-10
                norm_b = math.sqrt(sum(float(fl[1, c, h, w]) ** 2 for c in range(channels))) + 1e-10
                layer += sum(
                    float(wl[c]) * (float(fl[0, c, h, w]) / norm_a - float(fl[1, c, h, w]) / norm_b) ** 2
                    for c in range(channels)
                )
        total += layer / (height * width)
    assert total > 0
    assert tiny.lpips_distance(a, b) == pytest.approx(total, rel=1e-5)


def test_story_scores_are_the_mean_over_frame_pairs(tiny) -> None:
    images = [noise(10 + k) for k in range(4)]
    prompts = ["a fox", "a fox running", "a fox asleep", "a fox in the snow"]
    frames = [FrameForEval("story-1", f"f{k}", p, im) for k, (p, im) in enumerate(zip(prompts, images))]
    rows, story = score_story(frames, tiny, None, METRICS)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]

    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u.double() @ v.double() / (u.double().norm() * v.double().norm()))

    img, txt = tiny.clip_image_embeddings(images), tiny.text_embeddings(prompts)
    assert [r["clip_t"] for r in rows] == pytest.approx([cos(img[k], txt[k]) for k in range(4)], abs=1e-6)
    assert [r["frame_id"] for r in rows] == ["f0", "f1", "f2", "f3"] and rows[2]["prompt"] == "a fox asleep"
    assert story["clip_t"] == pytest.approx(sum(cos(img[k], txt[k]) for k in range(4)) / 4, abs=1e-6)
    dino, ds = tiny.dino_embeddings(images), tiny.dreamsim_embeddings(images)
    assert story["clip_i"] == pytest.approx(sum(cos(img[i], img[j]) for i, j in pairs) / 6, abs=1e-6)
    assert story["dino"] == pytest.approx(sum(cos(dino[i], dino[j]) for i, j in pairs) / 6, abs=1e-6)
    lpips = sum(tiny.lpips_distance(images[i], images[j]) for i, j in pairs) / 6
    assert story["lpips"] == pytest.approx(lpips, rel=1e-5)
    assert story["dreamsim"] == pytest.approx(sum(1 - cos(ds[i], ds[j]) for i, j in pairs) / 6, abs=1e-6)
    assert list(story) == list(STORY_COLUMNS) and story["num_frames"] == 4 and story["plumbing_check"] is True

    _, only = score_story(frames, tiny, None, ["dino"])
    assert only["dino"] == pytest.approx(story["dino"])
    assert all(math.isnan(only[c]) for c in ("clip_t", "clip_i", "lpips", "dreamsim"))
    _, single = score_story(frames[:1], tiny, None, METRICS)
    assert math.isnan(single["clip_i"]) and single["clip_t"] == pytest.approx(rows[0]["clip_t"])


def test_background_removal_goes_through_rembg_and_changes_the_subject_scores(tiny, tmp_path) -> None:
    remover = BackgroundRemover(red_detector(tmp_path / "red.onnx"))
    from rembg.sessions.base import BaseSession

    assert isinstance(remover.session, BaseSession) and remover.weights.endswith("red.onnx")
    frames = [subject_on(BLUE), subject_on(GREEN)]
    for image in frames:
        mask, removed = np.asarray(remover.mask(image)), np.asarray(remover.remove(image))
        assert mask.shape == (64, 64) and removed.shape == (64, 64, 3)
        assert (mask[20:44, 20:44] >= 250).all() and (mask[:8] == 0).all() and (mask == 255).sum() > 500
        background = mask == 0
        assert background.sum() > 1500
        assert (removed[background] == BACKGROUND_COLOUR).all()  # the flat colour wherever the mask is 0
        assert (removed[mask == 255] == np.asarray(image)[mask == 255]).all()
    story = [FrameForEval("s", f"f{k}", "a red square", im) for k, im in enumerate(frames)]
    _, plain = score_story(story, tiny, None, SUBJECT_METRICS)
    _, cut = score_story(story, tiny, remover, SUBJECT_METRICS)
    # only the backgrounds differ: once removed, the frames are the same but for the mask's soft edge
    assert cut["clip_i"] > 0.99 > plain["clip_i"] and cut["dino"] > 0.99 > plain["dino"]
    assert cut["lpips"] < plain["lpips"] / 20 and cut["dreamsim"] < plain["dreamsim"] / 20


def test_random_tiny_remover_is_deterministic_rembg(tiny, tmp_path) -> None:
    first, second = build_random_tiny_u2net(tmp_path / "a"), build_random_tiny_u2net(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    remover = tiny.remover
    assert remover is not None and remover.plumbing_check and "random-tiny" in remover.weights
    from rembg import remove

    image = subject_on(BLUE, 48)
    mask = remover.mask(image)
    assert mask.mode == "L" and mask.size == (48, 48)
    assert np.array_equal(np.asarray(mask), np.asarray(remove(image, session=remover.session, only_mask=True)))
    assert np.array_equal(np.asarray(BackgroundRemover(second).mask(image)), np.asarray(mask))
    assert load_background_remover(encoders="random-tiny") is remover  # one session per file and device


def test_importing_and_running_rembg_stays_offline(tmp_path) -> None:
    script = (
        "import socket\n"
        "def no(*a, **k): raise RuntimeError('network')\n"
        "socket.socket.connect = socket.create_connection = socket.getaddrinfo = no\n"
        "import rembg\n"
        "from PIL import Image\n"
        "from storysync_dist.eval.background import BackgroundRemover\n"
        f"r = BackgroundRemover.random_tiny(cache_dir={str(tmp_path / 'c')!r})\n"
        "print(r.remove(Image.new('RGB', (40, 30), (9, 99, 199))).size)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME", "REMBG_HOME", "U2NET_HOME")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(40, 30)"
    assert not (tmp_path / ".u2net").exists() and not (tmp_path / ".rembg").exists()


def test_missing_weights_fail_at_once_in_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(MissingWeightsError) as err:
        load_encoders(["clip-i"], weights=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "clip") in message and "clip-i" in message
    assert str(tmp_path / "rembg" / "u2net.onnx") in message and "--encoders random-tiny" in message
    assert isinstance(err.value, StorySyncUserError)

    empty = tmp_path / "hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, nothing may be fetched

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_encoders tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    def no_waiting(seconds: float) -> None:  # "at once": no retry loop that sleeps between tries
        raise AssertionError(f"load_encoders waited {seconds}s")

    monkeypatch.setattr(time, "sleep", no_waiting)
    with pytest.raises(MissingWeightsError) as err:
        load_encoders(["clip-t", "dino"], remove_background=False)
    message = str(err.value)
    assert "\n" not in message and "openai/clip-vit-large-patch14" in message and "facebook/dino-vits16" in message
    with pytest.raises(MissingWeightsError, match=re.escape("--weights DIR with DIR/lpips/lpips_alex.safetensors")):
        load_encoders(["lpips"], remove_background=False)
    for key in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(empty))  # rembg's own home holds no earlier download either
    with pytest.raises(MissingWeightsError) as err:
        load_background_remover()
    assert "\n" not in str(err.value) and str(empty / ".u2net" / "u2net.onnx") in str(err.value)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(StorySyncUserError, match=r"--metrics.*clip-t, clip-i, dino, lpips, dreamsim"):
        load_encoders(["clip-x"], encoders="random-tiny")
    with pytest.raises(StorySyncUserError, match="--encoders"):
        load_encoders(["dino"], encoders="huge")


def test_random_tiny_is_deterministic(tiny) -> None:
    again = load_encoders(METRICS, encoders="random-tiny")
    images = [noise(3), noise(4)]
    for name in ("clip_image_embeddings", "dino_embeddings", "dreamsim_embeddings"):
        assert torch.equal(getattr(tiny, name)(images), getattr(again, name)(images)), name
    assert torch.equal(tiny.text_embeddings(["a fox"]), again.text_embeddings(["a fox"]))
    assert tiny.lpips_distance(*images) == again.lpips_distance(*images)
    assert np.array_equal(np.asarray(tiny.remover.mask(images[0])), np.asarray(again.remover.mask(images[0])))


def test_real_weights_layout_loads_offline(tiny, tmp_path, monkeypatch) -> None:
    """DIR/clip, DIR/dino, DIR/dreamsim (save_pretrained folders), DIR/lpips/lpips_alex.safetensors and
    DIR/rembg/u2net.onnx, here holding the tiny models; and CLIP from a Hugging Face cache layout."""
    from safetensors.torch import save_file

    tiny.clip.save_pretrained(tmp_path / "clip")
    tiny.dino.save_pretrained(tmp_path / "dino")
    tiny.dreamsim.save_pretrained(tmp_path / "dreamsim")
    (tmp_path / "lpips").mkdir()
    save_file({k: v.contiguous() for k, v in tiny.lpips.state_dict().items()}, tmp_path / "lpips" / "lpips_alex.safetensors")
    (tmp_path / "rembg").mkdir()
    (tmp_path / "rembg" / "u2net.onnx").write_bytes(tiny.remover.model_path.read_bytes())
    real = load_encoders(METRICS, weights=str(tmp_path))
    assert not real.plumbing_check and real.weights["clip-t"] == str(tmp_path / "clip")
    assert real.weights["background"] == str(tmp_path / "rembg" / "u2net.onnx") and real.lpips_size == 224
    images = [noise(5), noise(6)]
    for name in ("clip_image_embeddings", "dino_embeddings", "dreamsim_embeddings"):
        assert torch.allclose(getattr(tiny, name)(images), getattr(real, name)(images), atol=1e-5), name
    assert torch.allclose(tiny.text_embeddings(["a fox"]), real.text_embeddings(["a fox"]), atol=1e-5)
    assert real.lpips_distance(*images) > 0

    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    tiny.clip.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = load_encoders(["clip-t"])
    assert cached.weights == {"clip-t": "openai/clip-vit-large-patch14"}
    assert json.loads((snapshot / "config.json").read_text())["projection_dim"] == 16
    assert torch.allclose(tiny.text_embeddings(["a fox"]), cached.text_embeddings(["a fox"]), atol=1e-5)
