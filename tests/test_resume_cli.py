"""The acceptance path through the real command line: kill -9 mid-epoch, then the printed
resume command; the run ends with the weights of an uninterrupted run of the same config."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import state_hash

from cnnlab.config import load_config, replace
from cnnlab.training.checkpoint import load_checkpoint, load_weights
from cnnlab.training.run import train_run

TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--model",
    "fast",
    "--limit",
    "320",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--lr",
    "0.003",
    "--augment",
    "--threads",
    "1",
    "--checkpoint-every-steps",
    "2",
    "--quiet",
]
RESUME_LINE = re.compile(r"[Rr]esume with: (cnnlab train --resume \S+?)\)?$", re.MULTILINE)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cnnlab.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_new_checkpoint(path: Path, process: subprocess.Popen, after: float) -> None:
    """Poll until `path` is (re)written after time `after` while the process runs."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and path.stat().st_mtime > after:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written in time")


def resume_args(stderr: str) -> list[str]:
    found = RESUME_LINE.findall(stderr)
    assert found, stderr
    return shlex.split(found[-1])[1:]  # drop the program name: run as python -m cnnlab.cli


def test_kill_9_mid_epoch_then_the_printed_resume_command_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "runs" / "train"
    ckpt = run_dir / "last.ckpt"

    first = start([*TRAIN, "--project", "runs"], tmp_path)
    wait_for_new_checkpoint(ckpt, first, 0.0)
    first.send_signal(signal.SIGKILL)
    _, err = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["loop"]
    assert 0 < killed_at["step"] < 2 * 18

    second = start(resume_args(err), tmp_path)
    out, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2
    assert f"Results saved to {Path('runs') / 'train'}" in out

    config = load_config(run_dir / "config.yaml")
    reference = train_run(replace(config, project=str(tmp_path / "reference")))
    assert state_hash(load_weights(run_dir / "best.safetensors")) == state_hash(
        reference.model.state_dict()
    )
    last = load_checkpoint(ckpt)
    assert state_hash(last["model"]) == state_hash(
        load_checkpoint(reference.run_dir / "last.ckpt")["model"]
    )
    epochs = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()]
    assert epochs == ["epoch", "1", "2"]
