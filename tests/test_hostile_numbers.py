"""Non-finite numbers stop a run at once with exit code 2, and the best and last checkpoints on
disk keep the last finite state: the failing epoch never touches them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.training import loop
from cnnlab.training import run as run_module
from cnnlab.training.checkpoint import load_checkpoint, load_model

# 180 training images in batches of 30: 6 steps per epoch
TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--limit",
    "200",
    "--batch-size",
    "30",
    "--epochs",
    "3",
    "--optimizer",
    "sgd",
    "--momentum",
    "0",
    "--lr",
    "0.01",
    "--threads",
    "1",
    "--quiet",
]


# no BatchNormalization, which would otherwise keep even a learning rate of 1e6 finite
PLAIN_MODEL = """\
- Conv2D: {filters: 8, kernel_size: 3, activation: relu}
- Flatten: {}
- Dense: {units: 32, activation: relu}
- Dense: {units: 10, activation: softmax}
"""


def train_args(tmp_path: Path) -> list[str]:
    model = tmp_path / "plain.yaml"
    model.write_text(PLAIN_MODEL)
    return [*TRAIN, "--model", str(model), "--project", str(tmp_path / "runs")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The SHA-256 of best.safetensors and last.ckpt right after each time the run writes them."""
    hashes: dict[str, str] = {}
    real_weights, real_checkpoint = run_module.save_weights, run_module.save_checkpoint

    def save_weights(folder, *args, **kwargs):
        real_weights(folder, *args, **kwargs)
        hashes["best.safetensors"] = sha(folder / "best.safetensors")

    def save_checkpoint(path, state):
        real_checkpoint(path, state)
        hashes["last.ckpt"] = sha(path)

    monkeypatch.setattr(run_module, "save_weights", save_weights)
    monkeypatch.setattr(run_module, "save_checkpoint", save_checkpoint)
    return hashes


def assert_stopped_with_last_finite_state(code: int, err: str, run: Path, saved: dict) -> None:
    assert code == 2, err
    assert "Training stopped at epoch 2" in err and "Traceback" not in err
    assert set(saved) == {"best.safetensors", "last.ckpt"}  # epoch 1 wrote both
    assert all(sha(run / name) == digest for name, digest in saved.items())
    assert load_checkpoint(run / "last.ckpt")["loop"]["epoch"] == 1
    model, info = load_model(run)
    assert info.epoch == 1
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_a_learning_rate_of_1e6_stops_the_run_and_keeps_good_checkpoints(
    tmp_path: Path, saved: dict, capsys
) -> None:
    """Epoch 1 trains at lr 0.01; a staircase decay of x1e8 per 6 steps makes epoch 2 run at 1e6."""
    schedule = ["--schedule", "exponential", "--decay-rate", "1e8", "--decay-steps", "6"]
    code = main([*train_args(tmp_path), *schedule, "--staircase"])
    err = capsys.readouterr().err
    assert "Lower the learning rate" in err
    assert_stopped_with_last_finite_state(code, err, tmp_path / "runs" / "train", saved)


def test_nan_pixels_stop_the_run_and_keep_good_checkpoints(
    tmp_path: Path, saved: dict, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """uint8 images cannot hold NaN, so from epoch 2 on NaN goes in where batches become float."""
    real_prepare = loop.prepare_batch
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        batch = real_prepare(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 6:
            batch[0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(loop, "prepare_batch", poisoned)
    code = main(train_args(tmp_path))
    err = capsys.readouterr().err
    assert "check the data for NaN pixels" in err
    assert_stopped_with_last_finite_state(code, err, tmp_path / "runs" / "train", saved)
