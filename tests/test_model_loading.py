"""Model loading never runs code from a model folder and never reaches the network: a hub id must
already be in the Hugging Face cache, and a model_index.json that names custom code is refused."""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import sys

import huggingface_hub.constants
import pytest
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from storysync_dist.models.info import load_model_info, model_folder
from storysync_dist.models.presets import UnknownModelError, check_model_index, load_pipeline, preset_path

MARKER_CODE = "import pathlib\npathlib.Path({path!r}).write_text('imported')\nclass {cls}:\n    pass\n"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any attempt to open a connection fails the test (and is recorded)."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise AssertionError(f"network access to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def empty_hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    home = tmp_path / "hf-home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # huggingface_hub reads the variables once, at import: point its constant there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def tiny_index() -> dict[str, object]:
    return json.loads((preset_path("tiny-sdxl") / "model_index.json").read_text())


def fake_folder(tmp_path: pathlib.Path, index: dict[str, object], module: str, cls: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A folder whose model_index.json is ``index``, with ``<module>.py`` at the top and in unet/
    that write a marker file when imported."""
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    marker = tmp_path / "imported.txt"
    (folder / "model_index.json").write_text(json.dumps(index))
    for place in (folder, folder / "unet"):
        (place / f"{module}.py").write_text(MARKER_CODE.format(path=str(marker), cls=cls))
    return folder, marker


def assert_one_line_refusal(call: object, *needles: str) -> str:
    with pytest.raises(UnknownModelError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_custom_component_module_is_refused_before_any_import(tmp_path: pathlib.Path) -> None:
    index = tiny_index()
    index["unet"] = ["my_module", "MyUNet"]
    folder, marker = fake_folder(tmp_path, index, "my_module", "MyUNet")
    for call in (lambda: load_pipeline(str(folder)), lambda: load_model_info(str(folder))):
        message = assert_one_line_refusal(call, str(folder), '"unet"', '["my_module", "MyUNet"]', "my_module")
        assert "custom code" in message
    assert not marker.exists()
    assert "my_module" not in sys.modules


def test_a_custom_pipeline_class_is_refused_before_any_import(tmp_path: pathlib.Path) -> None:
    index = tiny_index()
    index["_class_name"] = ["my_pipeline", "MyPipeline"]
    folder, marker = fake_folder(tmp_path, index, "my_pipeline", "MyPipeline")
    for call in (lambda: load_pipeline(str(folder)), lambda: load_model_info(str(folder))):
        assert_one_line_refusal(call, str(folder), "_class_name", '["my_pipeline", "MyPipeline"]')
    assert not marker.exists()
    assert "my_pipeline" not in sys.modules


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"_class_name": "UNet2DConditionModel"}, "_class_name \"UNet2DConditionModel\" is not a pipeline class"),
        ({"_class_name": "NoSuchPipeline"}, "_class_name \"NoSuchPipeline\""),
        ({"_class_name": "__loader__"}, "_class_name \"__loader__\""),
        ({"_class_name": None}, "_class_name null"),
        ({"unet": ["diffusers", "NoSuchUNet"]}, 'entry "unet": ["diffusers", "NoSuchUNet"]: diffusers has no class'),
        ({"unet": ["diffusers", "__class__"]}, 'entry "unet"'),
        ({"text_encoder": ["transformers", "NotAModel"]}, 'entry "text_encoder"'),
        ({"vae": ["os", "system"]}, 'entry "vae": ["os", "system"] names library "os"'),
        ({"vae": ["diffusers.models", "AutoencoderKL"]}, 'names library "diffusers.models"'),
        ({"vae": [3, "AutoencoderKL"]}, "names library 3"),
        ({"vae": ["diffusers", None]}, 'entry "vae"'),
    ],
)
def test_bad_entries_are_refused(tmp_path: pathlib.Path, change: dict[str, object], needle: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**tiny_index(), **change}))
    assert_one_line_refusal(lambda: check_model_index(folder), f"{folder}: model_index.json", needle)
    assert_one_line_refusal(lambda: load_pipeline(str(folder)), needle)


def test_a_library_named_file_in_a_component_folder_is_refused(tmp_path: pathlib.Path) -> None:
    # diffusers would load unet/diffusers.py as the component's code rather than the library.
    folder, marker = fake_folder(tmp_path, tiny_index(), "diffusers", "UNet2DConditionModel")
    assert_one_line_refusal(lambda: load_pipeline(str(folder)), 'entry "unet"', "unet/diffusers.py")
    assert not marker.exists()


def test_a_folder_without_model_index_is_refused(tmp_path: pathlib.Path) -> None:
    assert_one_line_refusal(lambda: load_pipeline(str(tmp_path)), f"{tmp_path}: not a diffusers pipeline folder")


def test_plain_indexes_pass(tmp_path: pathlib.Path) -> None:
    check_model_index(preset_path("tiny-sdxl"))
    check_model_index(preset_path("tiny-sd"))
    # SD 1.x checkpoints name a diffusers pipeline package as the library of their safety checker,
    # and transformers' old CLIPFeatureExtractor name.
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": [None, None],
        "requires_safety_checker": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
    }))
    check_model_index(folder)


def test_an_uncached_hub_id_fails_without_network(empty_hf_cache: pathlib.Path, no_network: list[object]) -> None:
    model = "nobody-here/not-cached-model"
    for call in (lambda: load_pipeline(model), lambda: load_model_info(model), lambda: model_folder(model)):
        assert_one_line_refusal(
            call, f"{model!r} is not in the Hugging Face cache", f"hf download {model}",
            f"huggingface-cli download {model}",
        )
    assert no_network == []


def cache_snapshot(hub: pathlib.Path, repo: str, source: pathlib.Path) -> pathlib.Path:
    """Lay ``source`` out as the Hugging Face cache does: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_a_cached_hub_id_loads_offline_with_safetensors_only(
    empty_hf_cache: pathlib.Path, no_network: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = cache_snapshot(empty_hf_cache, "someone/tiny-sdxl", preset_path("tiny-sdxl"))
    calls: list[dict[str, object]] = []
    real = DiffusionPipeline.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls: type, path: object, **kwargs: object) -> DiffusionPipeline:
        calls.append({"path": path, **kwargs})
        return real(cls, path, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    pipe = load_pipeline("someone/tiny-sdxl")
    assert type(pipe) is StableDiffusionXLPipeline
    [call] = calls
    assert pathlib.Path(str(call["path"])) == snapshot
    assert call["use_safetensors"] is True and call["local_files_only"] is True
    assert "trust_remote_code" not in call and "custom_pipeline" not in call
    info = load_model_info("someone/tiny-sdxl")
    assert info.size_factor == load_model_info("tiny-sdxl").size_factor
    assert info.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert no_network == []


def test_a_cached_snapshot_naming_custom_code_is_refused(
    empty_hf_cache: pathlib.Path, no_network: list[object], tmp_path: pathlib.Path
) -> None:
    index = tiny_index()
    index["unet"] = ["my_module", "MyUNet"]
    folder, marker = fake_folder(tmp_path, index, "my_module", "MyUNet")
    snapshot = cache_snapshot(empty_hf_cache, "someone/custom", folder)
    for call in (lambda: load_pipeline("someone/custom"), lambda: load_model_info("someone/custom")):
        assert_one_line_refusal(call, str(snapshot), '"unet"', "my_module")
    assert not marker.exists()
    assert no_network == []
