"""The toyworld training script (issue 21) resumes exactly: training N steps in one go and
training them in two runs, the second resuming from the first's checkpoint, give the same
weights bit for bit (weights, Adam moments and both random generators are in the checkpoint)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(out: pathlib.Path, steps: int, save_every: int) -> None:
    """The script as a user runs it, in its own process: it sets torch's threads, seeds its
    generator and trains with autograd, none of which may leak into the test session (a fresh-clone
    suite that ran it in-process ended in a segmentation fault at exit)."""
    subprocess.run([sys.executable, str(ROOT / "train" / "train_toyworld.py"), "--out", str(out), "--stage", "vae",
                    "--steps", str(steps), "--batch-size", "2", "--save-every", str(save_every), "--threads", "1"],
                   check=True, capture_output=True, timeout=300)


def test_a_resumed_vae_run_equals_one_run(tmp_path: pathlib.Path) -> None:
    _train(tmp_path / "once", steps=4, save_every=4)
    _train(tmp_path / "twice", steps=2, save_every=2)
    _train(tmp_path / "twice", steps=4, save_every=2)
    once = load_file(str(tmp_path / "once" / "checkpoints" / "vae" / "weights.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "checkpoints" / "vae" / "weights.safetensors"))
    assert once.keys() == twice.keys() and any(k.startswith("optim.") for k in once)
    for key in once:
        assert torch.equal(once[key], twice[key]), key
    # And training moved the weights away from their seeded start.
    start = _seeded_vae().state_dict()
    assert any(not torch.equal(start[k[6:]], v) for k, v in once.items() if k.startswith("model."))


def _seeded_vae():
    spec = importlib.util.spec_from_file_location("train_toyworld", ROOT / "train" / "train_toyworld.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = torch.get_rng_state()
    try:
        return module.build_vae()
    finally:
        torch.set_rng_state(generator)  # build_vae seeds torch's generator
