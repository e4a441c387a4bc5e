"""Comparing runs: a leaderboard of settings and results, and their learning curves overlaid in one page."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnnlab import fileio
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import EVALUATION_FILE
from cnnlab.models import summarize
from cnnlab.reporting import html as h
from cnnlab.reporting.plots import compare_curves_figure
from cnnlab.training import runs
from cnnlab.training.checkpoint import read_model_info

log = logging.getLogger(__name__)

LEADERBOARD_CSV = "leaderboard.csv"
COMPARE_HTML = "compare.html"


@dataclass
class RunRow:
    """One line of the leaderboard."""

    run: str  # the run folder as given or found
    dataset: str
    model: str
    params: int | None
    optimizer: str
    lr: float
    batch_size: int
    epochs: int  # epochs actually run
    best_epoch: int
    seconds: float  # training time, summed over epochs
    best_val_loss: float | None
    best_val_accuracy: float | None
    test_accuracy: float | None
    test_macro_f1: float | None
    test_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        return out


@dataclass
class Comparison:
    """The leaderboard rows (best first) and the files written."""

    rows: list[RunRow]
    csv_path: Path | None = None
    html_path: Path | None = None


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders among `paths`: each is a run folder or a folder whose sub-folders are runs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise CnnlabError(f"{path} is not a folder. Give run folders or a folder of runs.")
        if (path / runs.CONFIG_FILE).is_file():
            found.append(path)
            continue
        inside = sorted(
            p for p in path.iterdir() if p.is_dir() and (p / runs.CONFIG_FILE).is_file()
        )
        if not inside:
            raise CnnlabError(
                f"{path} holds no cnnlab runs (no sub-folder with {runs.CONFIG_FILE}). Give run "
                "folders made by `cnnlab train`, e.g. `cnnlab compare runs/train runs/train-2`, "
                "or their parent folder, e.g. `cnnlab compare runs`."
            )
        found.extend(inside)
    if not found:
        raise CnnlabError("No runs to compare. Give run folders or a folder of runs.")
    seen: set[Path] = set()
    unique = []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def summarize_run(run_dir: Path) -> RunRow:
    """The leaderboard row of one run folder, from its config, metrics, model and evaluation."""
    config = runs.read_config(run_dir)
    history = runs.read_metrics(run_dir)
    params = best_epoch = None
    model_name = config.model.preset or "custom"
    try:
        info = read_model_info(run_dir)
        model_name = info.model_name or model_name
        best_epoch = info.epoch
        shape = info.preprocessing.input_shape
        params = summarize(info.layers, shape, len(info.classes)).total_params
    except CnnlabError as exc:
        log.warning("%s: %s", run_dir, exc)
    evaluation = _read_evaluation(run_dir)
    val_losses = [row["val_loss"] for row in history if "val_loss" in row]
    val_accuracies = [row["val_accuracy"] for row in history if "val_accuracy" in row]
    return RunRow(
        run=str(run_dir),
        dataset=config.data.path or config.data.dataset,
        model=model_name,
        params=params,
        optimizer=config.train.optimizer,
        lr=config.train.lr,
        batch_size=config.train.batch_size,
        epochs=len(history),
        best_epoch=best_epoch or 0,
        seconds=sum(row.get("seconds", 0.0) for row in history),
        best_val_loss=min(val_losses) if val_losses else None,
        best_val_accuracy=max(val_accuracies) if val_accuracies else None,
        test_accuracy=evaluation.get("accuracy"),
        test_macro_f1=evaluation.get("macro_f1"),
        test_loss=evaluation.get("loss"),
        history=history,
    )


def _read_evaluation(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EVALUATION_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        log.warning("%s is not valid JSON; its test metrics are left out", path)
        return {}


def _sort_key(row: RunRow) -> tuple[float, float]:
    def value(v: float | None) -> float:
        return -1.0 if v is None else v

    return (value(row.test_accuracy), value(row.best_val_accuracy))


def compare_runs(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> Comparison:
    """Leaderboard of the runs (best test accuracy first), saved as CSV and an HTML page.

    `out_dir` defaults to the folder the runs share (e.g. runs/).
    """
    run_dirs = find_runs(paths)
    rows = sorted((summarize_run(d) for d in run_dirs), key=_sort_key, reverse=True)
    folder = Path(out_dir) if out_dir is not None else _common_parent(run_dirs)
    folder.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(rows, folder / LEADERBOARD_CSV, folder / COMPARE_HTML)
    fileio.write_text(comparison.csv_path, leaderboard_csv(rows))
    fileio.write_text(comparison.html_path, compare_page(rows))
    log.debug("Comparison saved to %s", comparison.html_path)
    return comparison


def _common_parent(run_dirs: Sequence[Path]) -> Path:
    """The folder the runs share: runs/ for runs/a and runs/b."""
    if len({d.resolve().parent for d in run_dirs}) == 1:
        return run_dirs[0].parent
    return Path(os.path.commonpath([str(d.resolve().parent) for d in run_dirs]))


COLUMNS = (
    ("run", "run"),
    ("dataset", "dataset"),
    ("model", "model"),
    ("params", "params"),
    ("optimizer", "optimizer"),
    ("lr", "lr"),
    ("batch", "batch_size"),
    ("epochs", "epochs"),
    ("best ep.", "best_epoch"),
    ("time", "seconds"),
    ("best val loss", "best_val_loss"),
    ("best val acc", "best_val_accuracy"),
    ("test acc", "test_accuracy"),
    ("test F1", "test_macro_f1"),
)
NUMERIC = {"params", "lr", "batch_size", "epochs", "best_epoch", "seconds"} | {
    "best_val_loss",
    "best_val_accuracy",
    "test_accuracy",
    "test_macro_f1",
}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "params":
        return f"{value:,}"
    if key == "lr":
        return f"{value:g}"
    if key == "seconds":
        return f"{value:.1f}s"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_leaderboard(rows: Sequence[RunRow]) -> str:
    """The leaderboard as an aligned text table, best first."""
    header = ["#", *(title for title, _ in COLUMNS)]
    cells = [
        [str(i), *(_cell(key, getattr(row, key)) for _, key in COLUMNS)]
        for i, row in enumerate(rows, 1)
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    right = {0} | {i + 1 for i, (_, key) in enumerate(COLUMNS) if key in NUMERIC}

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(c) for c in cells)])


def leaderboard_csv(rows: Sequence[RunRow]) -> str:
    buffer = io.StringIO()
    names = [key for _, key in COLUMNS] + ["test_loss"]
    writer = csv.DictWriter(buffer, fieldnames=["rank", *names])
    writer.writeheader()
    for i, row in enumerate(rows, 1):
        data = row.to_dict()
        writer.writerow({"rank": i, **{k: "" if data[k] is None else data[k] for k in names}})
    return buffer.getvalue()


def compare_page(rows: Sequence[RunRow]) -> str:
    """The comparison as one self-contained HTML page: leaderboard and overlaid curves."""
    numeric = [0] + [i + 1 for i, (_, key) in enumerate(COLUMNS) if key in NUMERIC]
    table = h.table(
        ["#", *(title for title, _ in COLUMNS)],
        [
            [i, *(_cell(key, getattr(row, key)) for _, key in COLUMNS)]
            for i, row in enumerate(rows, 1)
        ],
        numeric=numeric,
        css_class="leaderboard",
    )
    names = _short_names([row.run for row in rows])
    histories = {name: row.history for name, row in zip(names, rows, strict=True) if row.history}
    sections = [
        h.Section(
            "leaderboard",
            "Leaderboard",
            table
            + '<p class="note">Sorted by test accuracy, then best validation accuracy. Time is '
            "training time summed over epochs; params counts every weight of the model.</p>",
        )
    ]
    if histories:
        figure = h.img(
            h.figure_png(compare_curves_figure(histories)), "learning curves of the runs"
        )
        sections.append(h.Section("curves", "Learning curves", figure))
    subtitle = f"{len(rows)} runs · written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    return h.page("cnnlab: comparing runs", subtitle, sections)


def _short_names(paths: Sequence[str]) -> list[str]:
    """Run folder names, with the parent prefixed where two runs share a name."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
