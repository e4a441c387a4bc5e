"""`cnnlab tune`: an Optuna search over a YAML space; every trial a run folder; results and best.yaml."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  cnnlab tune --config examples/base.yaml --space examples/space.yaml --trials 50
  cnnlab tune --config base.yaml --space space.yaml --trials 20 --workers 2
  cnnlab tune --config base.yaml --space space.yaml --timeout 3600 --sampler random
  cnnlab tune --config base.yaml --space space.yaml --trials 200 --workers 4 \\
      --storage postgresql://tuner:secret@db-host/cnnlab --name fashion
  # on each other machine (same cnnlab and data), add workers to that study:
  cnnlab tune --join --storage postgresql://tuner:secret@db-host/cnnlab --name fashion --workers 4

Rerunning the same command continues the study where it stopped (a larger --trials extends it).
The study folder <project>/<name> holds one run folder per trial, tune_results.csv, results.html
and best.yaml; `cnnlab train --config <project>/<name>/best.yaml` trains the best trial again."""


def register(command: Any) -> None:
    p = command(
        "tune", "search hyperparameters with Optuna; every trial recorded, best config", cmd_tune
    )
    p.epilog = EXAMPLES
    p.add_argument("--config", help="base run config (YAML); default: cnnlab's defaults")
    p.add_argument("--space", help="search space (YAML): dotted settings -> ranges or choices")
    p.add_argument("--trials", type=int, help="trials in the study, all workers together (20)")
    p.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    p.add_argument("--name", help="study name: folder <project>/<name> (default tune)")
    p.add_argument("--project", help="parent folder of the study (default: the config's project)")
    p.add_argument("--metric", help="validation metric to optimise (default val_accuracy)")
    p.add_argument("--sampler", help="tpe (default), random or grid")
    p.add_argument("--pruner", help="median (default), halving or none")
    g = p.add_argument_group("scaling out")
    g.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    g.add_argument(
        "--storage",
        metavar="URL",
        help="shared study database for several machines, e.g. postgresql://USER:PW@HOST/DB",
    )
    g.add_argument(
        "--join",
        action="store_true",
        help="add this machine's workers to the running study --name in --storage",
    )
    g.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        help="seconds between worker heartbeats; a trial silent for 3 is failed and retried",
    )
    g.add_argument(
        "--max-retries", type=int, default=2, help="re-runs of a trial whose worker died (2)"
    )
    p.add_argument(
        "--trial-reports",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="validation metrics files and report.html in every trial folder (default on)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",  # --set a=1 --set b=2 applies both
        metavar="KEY=VALUE",
        help="override base config keys, e.g. --set data.limit=6000 train.epochs=5",
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from cnnlab.cli import out, parse_set
    from cnnlab.errors import ConfigError

    try:
        from cnnlab import tuning
    except ImportError as exc:
        raise ConfigError(f"Tuning needs Optuna: pip install 'cnnlab[tune]' ({exc}).") from exc
    if args.join:
        if not args.storage or not args.name:
            raise ConfigError("--join needs --storage URL and the study's --name.")
        counts = tuning.join(
            args.storage,
            args.name,
            project=args.project or "runs",
            workers=args.workers,
            timeout=args.timeout,
            heartbeat=args.heartbeat,
        )
        out(f"Study {args.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        return 0
    if not args.space:
        raise ConfigError("cnnlab tune needs --space SPACE.yaml (see examples/space.yaml).")
    config = _base_config(args, parse_set(args.set or []))
    result = tuning.tune(
        config,
        args.space,
        trials=args.trials,
        timeout=args.timeout,
        workers=args.workers,
        storage=args.storage,
        name=args.name,
        sampler=args.sampler,
        pruner=args.pruner,
        metric=args.metric,
        max_retries=args.max_retries,
        heartbeat=args.heartbeat,
        trial_reports=args.trial_reports,
    )
    _print_result(result, out)
    return 0


def _base_config(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from cnnlab.config import RunConfig, load_config

    config = load_config(args.config) if args.config else RunConfig()
    if args.project:
        overrides["project"] = args.project
    return config.with_overrides(overrides) if overrides else config


def _print_result(result: Any, out: Any) -> None:
    c = result.counts
    total = sum(c.values())
    out(
        f"Study {result.settings.name}: {total} trials ({c['complete']} complete, "
        f"{c['pruned']} pruned, {c['fail']} failed"
        + (f", {c['running']} still running" if c["running"] else "")
        + ")."
    )
    if result.best_trial is None:
        out("No trial completed yet, so there is no best config.")
    else:
        out(f"Best trial {result.best_trial}: {result.settings.metric} {result.best_value:.4f}")
        for key, value in result.best_params.items():
            out(f"  {key} = {value}")
        if result.test:
            t = result.test
            out(
                f"Test set (best trial, evaluated once): accuracy {t['accuracy']:.4f}, "
                f"loss {t['loss']:.4f}, macro F1 {t['macro_f1']:.4f}."
            )
        out(f"Best config: {result.best_config} (cnnlab train --config {result.best_config})")
    out(f"Results page: {result.results_page}")
    out(f"Results saved to {result.study_dir}")
