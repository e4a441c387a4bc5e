"""Tuning in one process: the space, records, continuation, pruning, failures, best.yaml round trip."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest
import yaml

from cnnlab.cli import main
from cnnlab.config import RunConfig, load_config
from cnnlab.errors import ConfigError
from cnnlab.training import runs
from cnnlab.training.run import train_run
from cnnlab.tuning import SearchSpace, tune
from cnnlab.tuning import trial as trial_module
from cnnlab.tuning.storage import redact

LAYERS = [
    {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"}},
    {"MaxPool2D": {"pool_size": 2}},
    {"Flatten": {}},
    {"Dense": {"units": 32, "activation": "relu"}},
    {"Dense": {"units": 10, "activation": "softmax"}},
]


def base_config(tmp_path: Path, epochs: int = 3) -> RunConfig:
    """A small net that learns 8x8 digits in a few tenths of a second per epoch."""
    return RunConfig.from_dict(
        {
            "project": str(tmp_path / "runs"),
            "data": {"dataset": "digits", "limit": 600, "val_split": 0.25},
            "model": {"preset": None, "layers": LAYERS},
            "train": {  # every setting the tests rely on is pinned, not taken from defaults
                "epochs": epochs,
                "batch_size": 32,
                "optimizer": "adam",
                "lr": 0.01,
                "weight_decay": 0.0,
                "label_smoothing": 0.0,
                "schedule": {"name": "constant"},
                "threads": 1,
            },
        }
    )


def read_rows(study_dir: Path) -> list[dict[str, str]]:
    with (study_dir / "tune_results.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------- space
def test_space_reads_every_kind_and_sets_layer_arguments(tmp_path: Path) -> None:
    space = SearchSpace.from_dict(
        {
            "params": {
                "train.lr": {"type": "float", "low": "1e-4", "high": 0.1, "log": True},
                "train.label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2},
                "train.epochs": {"type": "int", "low": 2, "high": 6},
                "train.optimizer": ["adam", "sgd"],
                "data.augment.flip": [False, True],
                "model.layers.0.Conv2D.filters": {"type": "int", "low": 8, "high": 32, "step": 8},
                "model.layers.-2.Dense.units": {"type": "categorical", "choices": [16, 64]},
            },
            "pruner": "halving",
        }
    )
    kinds = {p.path: (p.kind, p.log) for p in space.params}
    assert kinds["train.lr"] == ("float", True) and kinds["train.epochs"] == ("int", False)
    assert kinds["train.optimizer"] == ("categorical", False)
    assert space.pruner == {"name": "halving"}
    base = base_config(tmp_path)
    space.check(base)
    config = space.apply(
        base,
        {
            "train.lr": 0.02,
            "train.optimizer": "sgd",
            "data.augment.flip": True,
            "model.layers.0.Conv2D.filters": 24,
            "model.layers.-2.Dense.units": 64,
        },
    )
    assert config.train.lr == 0.02 and config.train.optimizer == "sgd"
    assert config.data.augment.flip is True
    assert config.model.layers[0]["Conv2D"]["filters"] == 24
    assert config.model.layers[3]["Dense"]["units"] == 64
    assert base.model.layers[0]["Conv2D"]["filters"] == 16  # the base is untouched
    # the base config's own values that lie inside the space become trial 0
    assert space.baseline(base) == {
        "train.lr": 0.01,
        "train.label_smoothing": 0.0,
        "train.epochs": 3,
        "train.optimizer": "adam",
        "data.augment.flip": False,
        "model.layers.0.Conv2D.filters": 16,
    }
    assert SearchSpace.from_dict(space.to_dict()).params == space.params


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"train.lrr": {"type": "float", "low": 0.1, "high": 1}}, "Did you mean 'lr'"),
        ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale"),
        ({"train.lr": {"type": "normal", "low": 0, "high": 1}}, "type must be one of"),
        ({"train.lr": {"type": "float", "low": 0.1, "hi": 1}}, "unknown key 'hi'"),
        ({"train.optimizer": ["adam", "sgdd"]}, "train.optimizer must be one of"),
        ({"model.layers.1.Conv2D.filters": [8, 16]}, "layer 1 is MaxPool2D, not Conv2D"),
        ({"model.layers.9.Dense.units": [8, 16]}, "out of range"),
        ({"train.batch_size": [[32, 64]]}, "choices must be numbers"),
    ],
)
def test_space_errors_name_the_problem(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict({"params": params}, source="space.yaml").check(base_config(tmp_path))


def test_grid_needs_finite_values() -> None:
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 0.001, "high": 0.1}})
    with pytest.raises(ConfigError, match="Grid search needs"):
        space.grid()
    stepped = SearchSpace.from_dict(
        {"train.epochs": {"type": "int", "low": 2, "high": 6, "step": 2}}
    )
    assert stepped.grid() == {"train.epochs": [2, 4, 6]}


def test_storage_passwords_stay_out_of_logs() -> None:
    assert redact("postgresql://tuner:s3cret@db/cnnlab") == "postgresql://tuner:***@db/cnnlab"
    assert redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"


def test_cli_reports_a_bad_space_without_traceback(tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.lr: {type: float, low: 0.1}\n")
    assert main(["tune", "--space", str(space), "--project", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'high' must be a number" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- studies
def test_study_records_continues_and_best_yaml_retrains(tmp_path: Path) -> None:
    base = base_config(tmp_path)
    space = {
        "params": {
            "train.lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
            "model.layers.0.Conv2D.filters": {"type": "int", "low": 8, "high": 24, "step": 8},
        },
        "sampler": "random",
        "pruner": "none",
    }
    first = tune(base, space, trials=3, name="study")
    study_dir = tmp_path / "runs" / "study"
    rows = read_rows(study_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} == {"complete"}
    assert rows[0]["params.train.lr"] == "0.01"  # trial 0 is the base config
    assert all(r["epochs"] == "3" and float(r["seconds"]) > 0 for r in rows)
    assert first.counts["complete"] == 3 and first.best_trial is not None
    # every trial is an ordinary run folder with validation metrics; only the best saw the test set
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "evaluation_val.json").is_file()
        tested = (run_dir / "evaluation.json").is_file()
        assert tested == (int(row["number"]) == first.best_trial)
    assert first.test is not None and first.test["trial"] == first.best_trial
    assert json.loads((study_dir / "best_test.json").read_text())["split"] == "test"
    page = (study_dir / "results.html").read_text(encoding="utf-8")
    for title in ("Optimisation history", "Parameter importances", "Parallel coordinates"):
        assert title in page
    assert page.count("data:image/png;base64,") == 4

    # the same call with a larger budget continues the study: two more trials, new numbers
    second = tune(base, space, trials=5, name="study", trial_reports=False)
    rows = read_rows(study_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert second.counts["complete"] == 5
    with pytest.raises(ConfigError, match="different search space"):
        tune(base, {**space, "params": {"train.lr": [0.01, 0.02]}}, name="study")

    # best.yaml is a full run config; training it (as `cnnlab train --config` does) reproduces
    # the best trial's score
    best_yaml = study_dir / "best.yaml"
    best_trial_dir = Path(rows[second.best_trial]["run_dir"])
    trained = runs.read_config(best_trial_dir)
    config = yaml.safe_load(best_yaml.read_text())
    assert config["model"]["layers"] == json.loads(json.dumps(trained.model.layers))
    assert config["train"]["lr"] == trained.train.lr
    retrained = train_run(load_config(best_yaml))
    assert retrained.run_dir == tmp_path / "runs" / "study-best"
    kept = next(r for r in retrained.history if r["epoch"] == retrained.best_epoch)
    assert kept["val_accuracy"] == pytest.approx(second.best_value, abs=1e-6)


def test_pruning_stops_trials_with_a_learning_rate_that_cannot_learn(tmp_path: Path) -> None:
    space = {
        "params": {"train.lr": [0.01, 1.0e-8], "seed": {"type": "int", "low": 0, "high": 9}},
        "sampler": "random",
        "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
    }
    tune(base_config(tmp_path, epochs=4), space, trials=5, name="prune", trial_reports=False)
    rows = read_rows(tmp_path / "runs" / "prune")
    assert rows[0]["state"] == "complete" and rows[0]["epochs"] == "4"  # the base config
    dead = [r for r in rows if float(r["params.train.lr"]) == 1e-8]
    assert dead, "the seeded sampler should draw the dead learning rate at least once"
    for row in dead:
        assert row["state"] == "pruned"
        assert row["pruned_at"] == row["epochs"] == "1"
        assert len(runs.read_metrics(Path(row["run_dir"]))) == 1


def test_a_trial_that_raises_or_returns_nan_fails_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train_run = trial_module.train_run
    real_value = trial_module.result_value

    def train_run(config, **kwargs):
        if config.train.lr == 0.03:
            raise RuntimeError("simulated crash in the data pipeline")
        return real_train_run(config, **kwargs)

    def result_value(result, metric):
        return math.nan if result.config.train.lr == 0.02 else real_value(result, metric)

    monkeypatch.setattr(trial_module, "train_run", train_run)
    monkeypatch.setattr(trial_module, "result_value", result_value)
    space = {"params": {"train.lr": [0.01, 0.02, 0.03]}, "sampler": "grid", "pruner": "none"}
    result = tune(
        base_config(tmp_path, epochs=2), space, trials=10, name="fail", trial_reports=False
    )
    by_lr = {float(r["params.train.lr"]): r for r in read_rows(tmp_path / "runs" / "fail")}
    assert len(by_lr) == 3  # the grid has three points
    assert by_lr[0.03]["state"] == "fail" and "simulated crash" in by_lr[0.03]["error"]
    assert by_lr[0.02]["state"] == "fail" and "nan" in by_lr[0.02]["error"]
    assert by_lr[0.01]["state"] == "complete"
    assert result.best_params == {"train.lr": 0.01}
    study = result.study
    assert {t.state for t in study.trials} == {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
    }
