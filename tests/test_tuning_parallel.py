"""Tuning over worker processes: journal storage with a SIGKILLed worker, and a PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from postgres import postgres_server

from cnnlab.tuning.storage import engine_url

BASE = {
    "data": {"dataset": "digits", "limit": 600, "val_split": 0.25},
    "model": {
        "preset": None,
        "layers": [
            {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"}},
            {"MaxPool2D": {"pool_size": 2}},
            {"Flatten": {}},
            {"Dense": {"units": 10, "activation": "softmax"}},
        ],
    },
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.01, "threads": 1},
}
SPACE = {
    "params": {"train.lr": {"type": "float", "low": 0.005, "high": 0.03, "log": True}},
    "sampler": "random",
    "pruner": "none",
}


def write_inputs(tmp_path: Path) -> list[str]:
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump({**BASE, "project": str(tmp_path / "runs")}))
    space.write_text(yaml.safe_dump(SPACE))
    return ["--config", str(base), "--space", str(space), "--no-trial-reports"]


def cnnlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", "tune", *args]


def journal_study(path: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def wait_for_running_trial(journal: Path, name: str, deadline: float) -> optuna.trial.FrozenTrial:
    """A trial that a worker is training right now (its run folder has been written)."""
    while time.time() < deadline:
        if journal.is_file():
            try:
                trials = journal_study(journal, name).get_trials(deepcopy=False)
            except KeyError:  # the study is not created yet
                trials = []
            for t in trials:
                run_dir = t.user_attrs.get("run_dir")
                if (
                    t.state == TrialState.RUNNING
                    and run_dir
                    and Path(run_dir, "config.yaml").exists()
                ):
                    return t
        time.sleep(0.1)
    pytest.fail("no trial started within the time limit")


def test_journal_workers_retry_the_trial_of_a_killed_worker(tmp_path: Path) -> None:
    """2 workers x 3 trials on journal storage; one worker is SIGKILLed in the middle of a trial."""
    log = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen(
        cnnlab(
            *write_inputs(tmp_path),
            *("--trials", "6", "--workers", "2", "--heartbeat", "1", "--name", "kill"),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    journal = tmp_path / "runs" / "kill" / "journal.log"
    try:
        victim = wait_for_running_trial(journal, "kill", time.time() + 180)
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "tune.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "tune.log").read_text()
    assert "killed by signal SIGKILL" in output
    trials = journal_study(journal, "kill").get_trials(deepcopy=False)
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params  # retried with the same parameters
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and len(set(complete)) == 6
    assert len(trials) == 7  # six outcomes and the killed attempt
    assert {t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE} != {
        victim.user_attrs["worker"]
    }
    rows = (tmp_path / "runs" / "kill" / "tune_results.csv").read_text().splitlines()
    assert len(rows) == 1 + 7
    assert (tmp_path / "runs" / "kill" / "best.yaml").is_file()


def test_postgresql_study_shared_by_two_workers_and_joined(tmp_path: Path) -> None:
    """2 workers x 2 trials on a real PostgreSQL server; a late joiner finds the budget used."""
    with postgres_server() as url:
        done = subprocess.run(
            cnnlab(
                *write_inputs(tmp_path),
                *("--trials", "4", "--workers", "2", "--storage", url, "--name", "pg"),
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        storage = optuna.storages.RDBStorage(engine_url(url))
        trials = optuna.load_study(study_name="pg", storage=storage).get_trials(deepcopy=False)
        numbers = [t.number for t in trials if t.state == TrialState.COMPLETE]
        assert sorted(numbers) == [0, 1, 2, 3]
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
        # another machine joins with only the URL and the name: nothing is left to run
        joined = subprocess.run(
            cnnlab("--join", "--storage", url, "--name", "pg", "--project", str(tmp_path / "b")),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert joined.returncode == 0, joined.stderr
        assert "4 complete" in joined.stdout
        assert "Best trial" in done.stdout
