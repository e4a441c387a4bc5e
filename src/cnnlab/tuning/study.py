"""Studies: create or continue one, run its workers (in process, as processes, or joining), finish it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from cnnlab import fileio
from cnnlab.config import RunConfig, load_config
from cnnlab.errors import CnnlabError, ConfigError, DataError
from cnnlab.training.cores import usable_cores
from cnnlab.tuning import storage as stores
from cnnlab.tuning.settings import (
    SETTINGS_ATTR,
    StudySettings,
    grid_size,
    make_pruner,
    make_sampler,
)
from cnnlab.tuning.space import LAYER_PREFIX, SearchSpace
from cnnlab.tuning.trial import Objective, best_config

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
BASE_FILE = "base.yaml"
BEST_FILE = "best.yaml"
TEST_FILE = "best_test.json"
POLL_SECONDS = 1.0  # how often an idle worker looks for dead or finished trials


@dataclass
class TuneResult:
    """A finished (or stopped) study: where it lives, its best trial and its one test score."""

    study_dir: Path
    settings: StudySettings
    counts: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None
    results_page: Path
    test: dict[str, Any] | None
    study: optuna.Study = field(repr=False)


# ---------------------------------------------------------------------------------- budget
def counts_toward_budget(trial: FrozenTrial, max_retries: int) -> bool:
    """Whether a trial uses up one of the study's --trials.

    Finished, pruned, failed-by-error, running and queued trials do. A trial whose worker died
    does not while it is retried (its retry counts instead), nor one stopped by Ctrl-C (its
    parameters were queued again).
    """
    if trial.state != TrialState.FAIL:
        return True
    if trial.user_attrs.get("interrupted"):
        return False
    if "error" in trial.user_attrs or trial.values is not None:
        return True
    retried_before = len(trial.system_attrs.get("retry_history", []))
    return retried_before >= max_retries  # no retry left: it is an outcome


def budget(trials: Sequence[FrozenTrial], max_retries: int) -> tuple[int, int, int]:
    """(trials counted, running, waiting)."""
    counted = sum(counts_toward_budget(t, max_retries) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return counted, running, waiting


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


# ---------------------------------------------------------------------------------- workers
def load_settings(study: optuna.Study) -> StudySettings:
    raw = study.user_attrs.get(SETTINGS_ATTR)
    if not raw:
        raise ConfigError(
            f"Study '{study.study_name}' was not made by `cnnlab tune` (it has no settings)."
        )
    return StudySettings.from_json(raw)


def open_study(url: str, name: str, heartbeat: float, max_retries: int) -> optuna.Study:
    store = stores.open_storage(url, heartbeat, max_retries)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise ConfigError(
            f"No study named '{name}' in {stores.redact(url)}. Start it with "
            "`cnnlab tune --config ... --space ...` first, or check --name."
        ) from None


# Loggers held back during trials: Optuna logs failures with tracebacks, and each trial's run
# folder and report lines would bury the one line per trial that cnnlab logs instead.
_QUIET = {
    "optuna": logging.ERROR,
    "cnnlab.data": logging.WARNING,
    "cnnlab.training": logging.WARNING,
    "cnnlab.reporting": logging.WARNING,
}


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Hold the chatty loggers back while trials run."""
    loggers = {logging.getLogger(name): level for name, level in _QUIET.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def run_worker(
    url: str,
    name: str,
    trial_root: Path,
    *,
    heartbeat: float = 10.0,
    index: int = 0,
    deadline: float | None = None,
    threads: int | None = None,
    parallel: bool = False,
) -> int:
    """Run trials of study `name` until its budget is used up (or `deadline`); returns how many.

    Every worker claims its next trial under a study-wide lock, so the workers together run
    exactly the budget. A worker with nothing left to claim waits while other trials still run:
    if their worker dies, the trial is failed by heartbeat and retried here.
    """
    probe = open_study(url, name, heartbeat, 0)
    settings = load_settings(probe)
    study = open_study(url, name, heartbeat, settings.max_retries)
    space = settings.search_space()
    seed = settings.seed + 1000 * index + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(settings, space, seed, parallel)
    study.pruner = make_pruner(settings)
    objective = Objective(settings, trial_root, threads)
    lock_dir = _lock_dir(url, trial_root)
    ran = 0
    with _quiet_optuna():
        while deadline is None or time.time() < deadline:
            with stores.claim_lock(url, lock_dir, name) as release:
                stores.fail_stale_trials(study)
                counted, running, waiting = budget(
                    study.get_trials(deepcopy=False), settings.max_retries
                )
                if waiting or counted < settings.trials:
                    objective.release = release
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(Exception,),
                        callbacks=[_TrialLogger(settings, trial_root)],
                        gc_after_trial=True,
                    )
                    ran += 1
                    continue
            if not running:
                break
            time.sleep(POLL_SECONDS)
    return ran


def _lock_dir(url: str, trial_root: Path) -> Path:
    """Where the claim lock file lives: next to a study file, else in the trial folder."""
    if url.startswith(stores.JOURNAL_SCHEME):
        return Path(url[len(stores.JOURNAL_SCHEME) :]).parent
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :]).parent
    return trial_root


class _TrialLogger:
    """One log line per finished trial; keeps tune_results.csv current."""

    def __init__(self, settings: StudySettings, study_dir: Path) -> None:
        self.settings = settings
        self.study_dir = study_dir

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from cnnlab.tuning.results import write_results_csv

        metric = self.settings.metric
        if trial.state == TrialState.COMPLETE:
            best = study.best_trial
            log.info(
                "Trial %d: %s %.4f in %.1f s (best %.4f, trial %d)",
                trial.number,
                metric,
                trial.value,
                trial.user_attrs.get("seconds", 0.0),
                best.value,
                best.number,
            )
        elif trial.state == TrialState.PRUNED:
            log.info(
                "Trial %d: pruned at epoch %s", trial.number, trial.user_attrs.get("pruned_at")
            )
        else:
            log.warning(
                "Trial %d failed: %s", trial.number, trial.user_attrs.get("error", "stopped")
            )
        with contextlib.suppress(OSError, CnnlabError):
            write_results_csv(study, self.settings, self.study_dir)


def spawn_workers(
    url: str,
    name: str,
    trial_root: Path,
    count: int,
    *,
    heartbeat: float,
    deadline: float | None,
    threads: int | None,
) -> list[int]:
    """Run `count` worker processes on this host and wait for them; returns their exit codes."""
    from cnnlab.tuning.worker import STORAGE_ENV

    env = {**os.environ, STORAGE_ENV: url}  # not on the command line: it may hold a password
    procs = []
    for index in range(count):
        cmd = [
            sys.executable,
            "-m",
            "cnnlab.tuning.worker",
            "--name",
            name,
            "--trial-root",
            str(trial_root),
            "--index",
            str(index),
            "--heartbeat",
            str(heartbeat),
            "--parallel",
        ]
        if deadline is not None:
            cmd += ["--deadline", str(deadline)]
        if threads:
            cmd += ["--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env))
    log.info("Started %d workers: pids %s", count, ", ".join(str(p.pid) for p in procs))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # they got the same Ctrl-C; give them time to stop cleanly
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for index, (proc, code) in enumerate(zip(procs, codes, strict=True)):
        if code < 0:
            log.warning(
                "Worker %d (pid %d) was killed by signal %s; its running trial was failed by "
                "heartbeat and retried by another worker.",
                index,
                proc.pid,
                signal.Signals(-code).name,
            )
        elif code:
            log.warning("Worker %d (pid %d) exited with code %d.", index, proc.pid, code)
    return codes


def default_threads(base: RunConfig, workers: int) -> int | None:
    """Share the cores between local workers unless the base config fixes the thread count."""
    if base.train.threads or workers <= 1:
        return None
    return max(1, usable_cores() // workers)


# ---------------------------------------------------------------------------------- coordinator
def tune(
    config: RunConfig | str | Path | None,
    space: SearchSpace | dict[str, Any] | str | Path,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    storage: str | None = None,
    name: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    metric: str | None = None,
    max_retries: int = 2,
    heartbeat: float = 10.0,
    trial_reports: bool = True,
) -> TuneResult:
    """Create (or continue) a study and run it to its budget; writes results, best.yaml, test score.

    >>> result = tune("base.yaml", "space.yaml", trials=20, workers=2)
    >>> result.best_config  # runs/tune/best.yaml
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}.")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout must be positive seconds, got {timeout}.")
    base = _base_config(config)
    search = _search_space(space)
    name = name or "tune"
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"study name '{name}' must be a plain folder name.")
    study_dir = Path(base.project) / name
    base = _resolve_layers(base, search)
    search.check(base)
    url = _storage_url(study_dir, storage, workers)
    settings = StudySettings(
        name=name,
        base=json.loads(json.dumps(base.to_dict())),
        space=search.to_dict(),
        metric=metric or search.metric or "val_accuracy",
        sampler=sampler or search.sampler or "tpe",
        pruner={**(search.pruner or {"name": "median"}), **({"name": pruner} if pruner else {})},
        trials=trials if trials is not None else 20,
        max_retries=max_retries,
        seed=base.seed,
        trial_reports=trial_reports,
    )
    settings.check()
    if settings.sampler == "grid" and settings.trials > grid_size(search):
        log.info("The grid has %d points; running %d trials.", grid_size(search), grid_size(search))
        settings.trials = grid_size(search)
    study_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_optuna():
        study = _create_or_continue(url, settings, heartbeat, search, base, trials is not None)
    settings = load_settings(study)
    _write_study_files(study_dir, settings, url, base)
    deadline = time.time() + timeout if timeout else None
    threads = default_threads(base, workers)
    try:
        if workers == 1:
            parallel = stores.kind_of(url) != "sqlite"  # others may join a database study
            run_worker(
                url,
                name,
                study_dir,
                heartbeat=heartbeat,
                deadline=deadline,
                threads=threads,
                parallel=parallel,
            )
        else:
            spawn_workers(
                url,
                name,
                study_dir,
                workers,
                heartbeat=heartbeat,
                deadline=deadline,
                threads=threads,
            )
    except KeyboardInterrupt:
        log.warning("Interrupted: writing the results so far. Rerun the same command to continue.")
        finish(study_dir, url, name, heartbeat)
        raise
    return finish(study_dir, url, name, heartbeat)


def join(
    storage: str,
    name: str,
    *,
    project: str | Path = "runs",
    workers: int = 1,
    timeout: float | None = None,
    heartbeat: float = 10.0,
) -> dict[str, int]:
    """Add this machine's workers to a study on a shared database; trial folders go to project/name."""
    if stores.kind_of(storage) in ("sqlite", "journal"):
        raise ConfigError(
            "--join needs a database server that every machine reaches, e.g. "
            "--storage postgresql://USER:PASSWORD@HOST/DB."
        )
    study = open_study(storage, name, heartbeat, 0)
    load_settings(study)
    trial_root = Path(project) / name
    trial_root.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + timeout if timeout else None
    if workers == 1:
        run_worker(storage, name, trial_root, heartbeat=heartbeat, deadline=deadline, parallel=True)
    else:
        spawn_workers(
            storage, name, trial_root, workers, heartbeat=heartbeat, deadline=deadline, threads=None
        )
    return state_counts(study)


def finish(study_dir: Path, url: str, name: str, heartbeat: float = 10.0) -> TuneResult:
    """Results table and page, best.yaml, and the single test evaluation of the best trial."""
    from cnnlab.tuning.results import write_results

    study = open_study(url, name, heartbeat, 0)
    settings = load_settings(study)
    counts = state_counts(study)
    best = _best_trial(study)
    best_path = test = None
    if best is not None:
        best_path = write_best_config(study_dir, settings, best)
        test = evaluate_best_once(study_dir, settings, best)
    page = write_results(study, settings, study_dir, test=test)
    return TuneResult(
        study_dir=study_dir,
        settings=settings,
        counts=counts,
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_config=best_path,
        results_page=page,
        test=test,
        study=study,
    )


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def write_best_config(study_dir: Path, settings: StudySettings, best: FrozenTrial) -> Path:
    config = best_config(settings, best.params)
    path = study_dir / BEST_FILE
    header = (
        f"# Best trial {best.number} of study '{settings.name}': {settings.metric} "
        f"{best.value:.4f}.\n# `cnnlab train --config {path}` trains it again.\n"
    )
    fileio.write_text(path, header + config.to_yaml())
    return path


def evaluate_best_once(
    study_dir: Path, settings: StudySettings, best: FrozenTrial
) -> dict[str, Any] | None:
    """Test metrics of the best trial, computed once per best trial (kept in best_test.json)."""
    from cnnlab.evaluation import evaluate_run
    from cnnlab.training.run import train_run

    record = study_dir / TEST_FILE
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if previous.get("trial") == best.number:
            return previous
    run_dir = Path(best.user_attrs.get("run_dir", ""))
    if not (run_dir / "config.yaml").is_file():
        log.info("Trial %d ran on another machine; training its config here.", best.number)
        config = replace(best_config(settings, best.params), project=str(study_dir))
        run_dir = train_run(replace(config, name=f"best-trial-{best.number:04d}")).run_dir
    try:
        evaluation = evaluate_run(run_dir, split="test")
    except DataError as exc:
        log.warning("No test evaluation of the best trial: %s", exc)
        return None
    summary = {
        "trial": best.number,
        "run_dir": str(run_dir),
        "split": "test",
        "images": int(evaluation.labels.shape[0]),
        "loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "macro_f1": evaluation.macro_f1,
    }
    fileio.write_text(record, json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------- helpers
def _base_config(config: RunConfig | str | Path | None) -> RunConfig:
    if config is None:
        return RunConfig()
    return config if isinstance(config, RunConfig) else load_config(config)


def _search_space(space: SearchSpace | dict[str, Any] | str | Path) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, dict):
        return SearchSpace.from_dict(space)
    return SearchSpace.load(space)


def _resolve_layers(base: RunConfig, space: SearchSpace) -> RunConfig:
    """Expand a preset into its layer list when the space searches layer arguments."""
    if base.model.layers or not any(n.startswith(LAYER_PREFIX) for n in space.names):
        return base
    from cnnlab.data.prepare import prepare_data
    from cnnlab.training.run import resolve_layers

    data = prepare_data(base.data, base.seed)
    layers = resolve_layers(base.model, data.num_classes, data.input_shape)
    return base.with_overrides({"model.layers": json.loads(json.dumps(layers))})


def _storage_url(study_dir: Path, storage: str | None, workers: int) -> str:
    """The study's storage: the given URL, else the study file it was started with, else new."""
    if storage is not None:
        stores.kind_of(storage)
        return storage
    study_file = study_dir / STUDY_FILE
    recorded = None
    if study_file.is_file():
        recorded = (yaml.safe_load(study_file.read_text(encoding="utf-8")) or {}).get("storage")
    if recorded:
        kind = stores.kind_of(recorded)
        if kind not in ("sqlite", "journal"):
            raise ConfigError(
                f"Study {study_dir} lives in the database {recorded}; give it again with "
                "--storage to continue the study."
            )
        if kind == "sqlite" and workers > 1:
            raise ConfigError(
                f"Study {study_dir} was started with one worker and keeps its trials in SQLite, "
                "which several processes should not share. Continue it with --workers 1, or "
                "start a new study with --name to use --workers."
            )
        return recorded
    if workers > 1:
        return stores.journal_url(study_dir / "journal.log")
    return stores.sqlite_url(study_dir / "study.db")


def _create_or_continue(
    url: str,
    settings: StudySettings,
    heartbeat: float,
    space: SearchSpace,
    base: RunConfig,
    trials_given: bool,
) -> optuna.Study:
    store = stores.open_storage(url, heartbeat, settings.max_retries)
    study = optuna.create_study(
        study_name=settings.name, storage=store, direction=settings.direction, load_if_exists=True
    )
    previous = study.user_attrs.get(SETTINGS_ATTR)
    new = settings.to_json()
    if previous is None:
        study.set_user_attr(SETTINGS_ATTR, new)
        baseline = space.baseline(base) if settings.sampler != "grid" else {}
        if baseline:  # trial 0 is the base config itself, so the study can only improve on it
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
        log.info("New study '%s' in %s", settings.name, stores.redact(url))
        return study
    for key, label in (("base", "base config"), ("space", "search space"), ("metric", "metric")):
        if previous[key] != new[key]:
            raise ConfigError(
                f"Study '{settings.name}' exists with a different {label}. Rerun with the same "
                f"files to continue it, or pick a new study name with --name."
            )
    if not trials_given:
        new["trials"] = previous["trials"]
    study.set_user_attr(SETTINGS_ATTR, new)
    done, _, _ = budget(study.get_trials(deepcopy=False), new["max_retries"])
    log.info("Continuing study '%s': %d of %d trials used.", settings.name, done, new["trials"])
    return study


def _write_study_files(study_dir: Path, settings: StudySettings, url: str, base: RunConfig) -> None:
    body = {
        "study": settings.name,
        "storage": stores.redact(url),
        "metric": settings.metric,
        "direction": settings.direction,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "trials": settings.trials,
        "max_retries": settings.max_retries,
        **settings.space,
    }
    header = "# cnnlab tuning study: rerun the same `cnnlab tune` command to continue it.\n"
    fileio.write_text(study_dir / STUDY_FILE, header + yaml.safe_dump(body, sort_keys=False))
    fileio.write_text(study_dir / BASE_FILE, base.to_yaml())
