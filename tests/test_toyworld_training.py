"""The toyworld training script (issue 21) resumes exactly: training N steps in one go and
training them in two runs, the second resuming from the first's checkpoint, give the same
weights bit for bit (weights, Adam moments and both random generators are in the checkpoint)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_toyworld", ROOT / "train" / "train_toyworld.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_toyworld", module)
    spec.loader.exec_module(module)
    return module


def test_a_resumed_vae_run_equals_one_run(tmp_path: pathlib.Path) -> None:
    # The script sets the process's thread count and seeds torch's generator: both put back.
    threads, generator = torch.get_num_threads(), torch.get_rng_state()
    try:
        # With gradients off, as a process that rendered has them: the script turns them on itself.
        with torch.no_grad():
            _check_resume(tmp_path)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(generator)


def _check_resume(tmp_path: pathlib.Path) -> None:
    train = _script()
    train.main(["--out", str(tmp_path / "once"), "--stage", "vae", "--steps", "4", "--batch-size", "2",
                "--save-every", "4", "--threads", "1"])
    train.main(["--out", str(tmp_path / "twice"), "--stage", "vae", "--steps", "2", "--batch-size", "2",
                "--save-every", "2", "--threads", "1"])
    train.main(["--out", str(tmp_path / "twice"), "--stage", "vae", "--steps", "4", "--batch-size", "2",
                "--save-every", "2", "--threads", "1"])
    once = load_file(str(tmp_path / "once" / "checkpoints" / "vae" / "weights.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "checkpoints" / "vae" / "weights.safetensors"))
    assert once.keys() == twice.keys() and any(k.startswith("optim.") for k in once)
    for key in once:
        assert torch.equal(once[key], twice[key]), key
    # And training moved the weights away from their seeded start.
    start = train.build_vae().state_dict()
    assert any(not torch.equal(start[k[6:]], v) for k, v in once.items() if k.startswith("model."))
