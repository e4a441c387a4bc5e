"""Run folders: auto-numbered creation, lookup with clear errors, and the files they hold."""

from __future__ import annotations

import csv
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from cnnlab import fileio
from cnnlab.config import RunConfig, load_config
from cnnlab.errors import CheckpointError, CnnlabError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SPLITS_FILE = "splits.csv"
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "val_macro_f1",
    "val_balanced_accuracy",
)


def new_run_dir(project: str | Path, name: str) -> Path:
    """Create runs/<name>, or <name>-2, -3, ... if taken; never reuses an existing folder."""
    project = Path(project)
    try:
        project.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError) as exc:
        raise CnnlabError(
            f"Cannot create the runs folder {project}: {exc.strerror or exc}. "
            "Choose another with --project."
        ) from exc
    for number in range(1, 100_000):
        candidate = project / (name if number == 1 else f"{name}-{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except PermissionError as exc:
            raise CnnlabError(
                f"Cannot create {candidate}: permission denied. Choose a writable --project folder."
            ) from exc
        return candidate
    raise CnnlabError(f"Too many runs named '{name}' in {project}; pick another --name.")


def resolve_run_dir(path: str | Path) -> Path:
    """Check that `path` is a run folder (it has config.yaml); errors say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Run folder {path} does not exist. List runs with `ls runs/`.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; give the run folder that contains it instead.")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a cnnlab run folder (no {CONFIG_FILE}). Give a folder made by "
            "`cnnlab train`, such as runs/train."
        )
    return path


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files an atomic write leaves when the process is killed mid-write."""
    removed = []
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def environment() -> dict[str, Any]:
    """Versions and hardware, written into config.yaml for people to read (ignored on load)."""
    from cnnlab import __version__

    return {
        "cnnlab": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_config(run_dir: Path, config: RunConfig) -> None:
    body = config.to_dict()
    body["environment"] = environment()
    header = "# cnnlab run config: `cnnlab train --config THIS_FILE` repeats the run.\n"
    fileio.write_text(run_dir / CONFIG_FILE, header + yaml.safe_dump(body, sort_keys=False))


def read_config(run_dir: Path) -> RunConfig:
    return load_config(run_dir / CONFIG_FILE)


def read_environment(run_dir: Path) -> dict[str, Any]:
    raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    return dict(raw.get("environment") or {})


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite metrics.csv from the full history: each epoch appears once, also after a resume."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
    fileio.write_text(run_dir / METRICS_FILE, buffer.getvalue())


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def write_splits(
    run_dir: Path,
    rows: list[tuple[str, str, object]],
    header: tuple[str, ...] = ("id", "split", "label"),
) -> None:
    """splits.csv: one row per image: id (or folder-relative path), split, label.

    For folder datasets this is the file `--splits` reads back.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    fileio.write_text(run_dir / SPLITS_FILE, buffer.getvalue())


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"
