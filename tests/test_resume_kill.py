"""Exact resume after SIGKILL: real processes killed mid-epoch, mid-checkpoint-write and between
best.safetensors and model.json end, once resumed, with the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import state_hash

from cnnlab import fileio
from cnnlab.config import RunConfig
from cnnlab.training import checkpoint as checkpoint_module
from cnnlab.training import run as run_module
from cnnlab.training.checkpoint import load_checkpoint, load_model, load_weights
from cnnlab.training.loop import Callback
from cnnlab.training.run import train_run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def config(tmp_path: Path) -> RunConfig:
    """192 training images, 6 steps per epoch, 3 epochs, a checkpoint every 2 steps, augmented."""
    return RunConfig.from_dict(
        {
            "project": str(tmp_path / "runs"),
            "data": {
                "dataset": "digits",
                "limit": 256,
                "val_split": 0.25,
                "augment": {"shift": 0.1, "flip": True},
            },
            "model": {"preset": "fast"},
            "train": {
                "epochs": 3,
                "batch_size": 32,
                "lr": 0.003,
                "threads": 1,
                "checkpoint_every_steps": 2,
                "monitor": "val_accuracy",  # best at epochs 1 and 2 with this seed
            },
        }
    )


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, trainer, logs) -> None:
        if trainer.state.step == self.step:
            die()


def run_in_killed_child(work: Callable[[], None]) -> None:
    """Fork; the child does `work` and must die by SIGKILL (a clean exit fails the test)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            work()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"child exited with {os.waitstatus_to_exitcode(status)}"
    assert os.WTERMSIG(status) == signal.SIGKILL


def kill_during_checkpoint_write() -> None:
    """Patch torch.save (in the child only) to write half a checkpoint, then SIGKILL."""

    def torn_save(obj, handle) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        die()

    real_save = torch.save
    checkpoint_module.torch.save = torn_save


def kill_between_weights_and_model_json(min_epoch: int) -> None:
    """SIGKILL after best.safetensors of epoch >= min_epoch is replaced, before model.json is."""
    armed = {"on": False}
    real_save_weights, real_write_text = run_module.save_weights, fileio.write_text

    def save_weights(folder, model, info, *args, **kwargs):
        armed["on"] = info.epoch >= min_epoch
        return real_save_weights(folder, model, info, *args, **kwargs)

    def write_text(path, text):
        if armed["on"] and Path(path).name == "model.json":
            die()
        return real_write_text(path, text)

    run_module.save_weights = save_weights
    fileio.write_text = write_text


def checkpoint_step(run_dir: Path) -> int:
    return int(load_checkpoint(run_dir / "last.ckpt")["loop"]["step"])


def test_sigkill_anywhere_then_resume_gives_bit_identical_weights(config: RunConfig) -> None:
    straight = train_run(config)
    run_dir = Path(config.project) / "train-2"

    # 1. killed mid-epoch 1, after step 5; the checkpoint of step 4 survives
    run_in_killed_child(lambda: train_run(config, callbacks=[KillAtStep(5)]))
    assert checkpoint_step(run_dir) == 4

    # 2. resumed, killed while writing the step-6 checkpoint: a torn temp file, last.ckpt intact
    def torn_write() -> None:
        kill_during_checkpoint_write()
        train_run(RunConfig(), resume=run_dir)

    run_in_killed_child(torn_write)
    assert list(run_dir.glob(".last.ckpt.*.tmp")), "the torn write should have left its temp file"
    assert checkpoint_step(run_dir) == 4

    # 3. resumed, killed between best.safetensors and model.json of epoch 2 or later
    def between_files() -> None:
        kill_between_weights_and_model_json(min_epoch=2)
        train_run(RunConfig(), resume=run_dir)

    run_in_killed_child(between_files)
    assert not list(run_dir.glob(".*.tmp")), "a resume removes stale temp files"
    load_model(run_dir)  # new weights, older model.json: still a loadable pair
    assert checkpoint_step(run_dir) == 12  # the step-12 checkpoint precedes the epoch's end

    # 4. resumed, killed mid-epoch 3 between two checkpoints
    run_in_killed_child(lambda: train_run(RunConfig(), resume=run_dir, callbacks=[KillAtStep(15)]))
    assert checkpoint_step(run_dir) == 14

    resumed = train_run(RunConfig(), resume=run_dir)
    assert state_hash(resumed.model.state_dict()) == state_hash(straight.model.state_dict())
    assert state_hash(load_weights(run_dir / "best.safetensors")) == state_hash(
        load_weights(straight.run_dir / "best.safetensors")
    )
    last = load_checkpoint(run_dir / "last.ckpt")
    reference = load_checkpoint(straight.run_dir / "last.ckpt")
    assert state_hash(last["model"]) == state_hash(reference["model"])
    assert last["loop"]["step"] == reference["loop"]["step"] == 18
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    straight_rows = list(csv.DictReader((straight.run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in straight_rows]
    assert not list(run_dir.glob(".*.tmp"))


def test_killed_before_the_first_checkpoint_restarts_from_the_beginning(
    config: RunConfig,
) -> None:
    config = config.with_overrides({"train.epochs": 1, "train.checkpoint_every_steps": 0})
    straight = train_run(config)
    run_dir = Path(config.project) / "train-2"
    run_in_killed_child(lambda: train_run(config, callbacks=[KillAtStep(3)]))
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "last.ckpt").exists()
    resumed = train_run(RunConfig(), resume=run_dir)
    assert state_hash(resumed.model.state_dict()) == state_hash(straight.model.state_dict())


def test_ctrl_c_saves_prints_the_resume_command_and_resumes_exactly(
    config: RunConfig, tmp_path: Path
) -> None:
    """A real SIGINT through the CLI's handler: exit 130, last.ckpt at that step, the command."""
    from cnnlab.cli import main

    config = config.with_overrides({"train.epochs": 2, "train.checkpoint_every_steps": 0})
    straight = train_run(config)
    run_dir = Path(config.project) / "train-2"
    log = tmp_path / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        try:
            original = run_module.RunFolderWriter.on_batch_end

            def ctrl_c_at_step_5(self, trainer, logs) -> None:
                original(self, trainer, logs)
                if trainer.state.step == 5:
                    os.kill(os.getpid(), signal.SIGINT)

            run_module.RunFolderWriter.on_batch_end = ctrl_c_at_step_5
            fd = os.open(log, os.O_WRONLY | os.O_CREAT)
            os.dup2(fd, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            config_file = tmp_path / "config.yaml"
            config_file.write_text(config.to_yaml())
            code = main(["train", "--config", str(config_file), "--quiet"])
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err = log.read_text()
    assert os.waitstatus_to_exitcode(status) == 130, err
    assert f"Resume with: cnnlab train --resume {run_dir}" in err and "Traceback" not in err
    assert checkpoint_step(run_dir) == 5

    resumed = train_run(RunConfig(), resume=run_dir)
    assert state_hash(resumed.model.state_dict()) == state_hash(straight.model.state_dict())
    assert main(["train", "--resume", str(run_dir)]) == 2  # finished runs are not trained again
