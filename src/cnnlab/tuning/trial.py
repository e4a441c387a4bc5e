"""One trial: a config from the sampled values, an ordinary run folder, pruning per epoch, records."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from cnnlab.config import RunConfig
from cnnlab.evaluation import evaluate_model, write_evaluation
from cnnlab.training import runs
from cnnlab.training.loop import Callback, Trainer
from cnnlab.training.run import TrainingInterrupted, TrainResult, train_run
from cnnlab.tuning.settings import StudySettings
from cnnlab.tuning.space import SearchSpace
from cnnlab.tuning.storage import worker_id

log = logging.getLogger(__name__)


class PruningCallback(Callback):
    """Reports the metric each epoch; when Optuna says prune, the loop ends after this epoch."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None
        self.epochs = 0

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        epoch = int(logs["epoch"])
        self.epochs = epoch
        value = logs.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), step=epoch)
        if epoch < trainer.config.epochs and self.trial.should_prune():
            self.pruned_at = epoch
            trainer.state.stop_reason = f"pruned at epoch {epoch}"


def trial_config(
    base: RunConfig, space: SearchSpace, values: dict[str, Any], root: Path, number: int
) -> RunConfig:
    """The base config with the trial's values, named trial-NNNN inside the study folder."""
    config = space.apply(base, values)
    return config.with_overrides({"name": f"trial-{number:04d}", "project": str(root)})


def result_value(result: TrainResult, metric: str) -> float:
    """The metric of the weights the run kept: the best epoch when restored, else the last."""
    if not result.history:
        return math.nan
    row = result.history[-1]
    if result.config.train.early_stopping.restore_best:
        row = next((r for r in result.history if int(r["epoch"]) == result.best_epoch), row)
    value = row.get(metric)
    if value is None:
        raise ValueError(
            f"The runs log no {metric}: the study's metric needs a validation split "
            "(data.val_split above 0)."
        )
    return float(value)


class Objective:
    """The function Optuna calls per trial. `release` is called first: the claim lock's key."""

    def __init__(self, settings: StudySettings, root: Path, threads: int | None = None) -> None:
        self.settings = settings
        self.space = settings.search_space()
        self.base = settings.base_config()
        if threads:
            self.base = self.base.with_overrides({"train.threads": threads})
        self.root = root
        self.release: Callable[[], None] = lambda: None

    def __call__(self, trial: optuna.Trial) -> float:
        self.release()
        trial.set_user_attr("worker", worker_id())
        pruning = PruningCallback(trial, self.settings.metric)
        try:
            values = self.space.suggest(trial)
            config = trial_config(self.base, self.space, values, self.root, trial.number)
            run_dir = runs.new_run_dir(config.project, config.name)
            trial.set_user_attr("run_dir", str(run_dir.resolve()))
            result = train_run(config, callbacks=[pruning], run_dir=run_dir)
        except TrainingInterrupted as exc:
            _requeue_interrupted(trial)
            raise KeyboardInterrupt from exc
        except Exception as exc:
            trial.set_user_attr("epochs", pruning.epochs)
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise
        trial.set_user_attr("epochs", len(result.history))
        trial.set_user_attr("seconds", round(result.seconds, 3))
        trial.set_user_attr("best_epoch", result.best_epoch)
        value = result_value(result, self.settings.metric)
        if self.settings.trial_reports:
            write_trial_report(result)
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at", pruning.pruned_at)
            raise optuna.TrialPruned(f"pruned at epoch {pruning.pruned_at}")
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{self.settings.metric} is {value}")
        return value


def _requeue_interrupted(trial: optuna.Trial) -> None:
    """Ctrl-C: the trial ends failed but queues its parameters again for the next run."""
    trial.set_user_attr("interrupted", True)
    trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def write_trial_report(result: TrainResult) -> None:
    """Validation metrics (never the test set) and the run report, as an ordinary run has."""
    if result.data.val is None or len(result.data.val) == 0:
        return
    evaluation = evaluate_model(
        result.model,
        result.data.val,
        result.info.preprocessing,
        result.info.classes,
        split="val",
        batch_size=result.config.train.eval_batch_size,
        amp=result.config.train.amp,
    )
    write_evaluation(result.run_dir, evaluation)
    try:
        from cnnlab.reporting.report import write_report
    except ImportError:
        log.debug("cnnlab.reporting.report is not available; no report.html for trials")
        return
    try:
        write_report(result.run_dir, evaluation=evaluation)
    except Exception as exc:  # a report problem must not lose the trial's result
        log.warning("Could not write the report of %s: %s", result.run_dir, exc)


def best_config(settings: StudySettings, params: dict[str, Any]) -> RunConfig:
    """The full run config of a trial's parameters, named for a fresh `cnnlab train` run."""
    base = settings.base_config()
    config = settings.search_space().apply(base, params)
    return replace(config, name=f"{settings.name}-best")
