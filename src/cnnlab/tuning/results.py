"""Study records: tune_results.csv (one row per trial) and the results page with its figures."""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnlab import fileio
from cnnlab.tuning.settings import StudySettings

log = logging.getLogger(__name__)

RESULTS_CSV = "tune_results.csv"
RESULTS_PAGE = "results.html"
TOP_TRIALS = 10


def trial_seconds(trial: FrozenTrial) -> float | None:
    if "seconds" in trial.user_attrs:
        return float(trial.user_attrs["seconds"])
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_rows(study: optuna.Study, settings: StudySettings) -> list[dict[str, Any]]:
    """One plain row per trial, in trial-number order."""
    names = settings.search_space().names
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        seconds = trial_seconds(t)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name.lower(),
            settings.metric: t.value if t.values else None,
            **{f"params.{n}": t.params.get(n) for n in names},
            "epochs": t.user_attrs.get("epochs"),
            "seconds": round(seconds, 2) if seconds is not None else None,
            "pruned_at": t.user_attrs.get("pruned_at"),
            "retry_of": t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of")),
            "worker": t.user_attrs.get("worker"),
            "run_dir": t.user_attrs.get("run_dir"),
            "error": t.user_attrs.get("error"),
        }
        rows.append(row)
    return rows


def write_results_csv(study: optuna.Study, settings: StudySettings, study_dir: Path) -> Path:
    rows = trial_rows(study, settings)
    columns = list(rows[0]) if rows else ["number", "state", settings.metric]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    path = study_dir / RESULTS_CSV
    fileio.write_text(path, buffer.getvalue())
    return path


def write_results(
    study: optuna.Study,
    settings: StudySettings,
    study_dir: Path,
    *,
    test: dict[str, Any] | None = None,
) -> Path:
    """tune_results.csv, figures as PNG and one self-contained results.html; returns the page."""
    write_results_csv(study, settings, study_dir)
    figures = save_figures(study, study_dir)
    page = study_dir / RESULTS_PAGE
    fileio.write_text(page, render_page(study, settings, figures, test))
    return page


# ---------------------------------------------------------------------------------- figures
def _plots() -> dict[str, tuple[str, Callable[[optuna.Study], Any]]]:
    from optuna.visualization import matplotlib as ovm

    return {
        "history": ("Optimisation history", ovm.plot_optimization_history),
        "importances": ("Parameter importances", ovm.plot_param_importances),
        "parallel_coordinates": ("Parallel coordinates", ovm.plot_parallel_coordinate),
        "slices": ("Slice plots", ovm.plot_slice),
    }


def save_figures(study: optuna.Study, study_dir: Path) -> dict[str, tuple[str, Path | str]]:
    """{key: (title, png path or the reason it could not be drawn)}, drawn with Optuna's plots."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    figures: dict[str, tuple[str, Path | str]] = {}
    for key, (title, plot) in _plots().items():
        if len(complete) < 2:
            figures[key] = (title, "needs at least two complete trials")
            continue
        path = study_dir / f"{key}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = _figure_of(axes)
            width = 11 if key in ("slices", "parallel_coordinates") else 8
            figure.set_size_inches(width, max(4.5, figure.get_size_inches()[1]))
            fileio.write_with(
                path, lambda handle, f=figure: f.savefig(handle, format="png", dpi=90)
            )
            plt.close(figure)
            figures[key] = (title, path)
        except Exception as exc:  # e.g. importances of a parameter that never varied
            plt.close("all")
            figures[key] = (title, f"not drawn: {exc}")
    return figures


def _figure_of(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.figure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colour bars do not take part in tight_layout
        figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------- page
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} img{max-width:100%}
.note{color:#777}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def render_page(
    study: optuna.Study,
    settings: StudySettings,
    figures: dict[str, tuple[str, Path | str]],
    test: dict[str, Any] | None,
) -> str:
    rows = trial_rows(study, settings)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    done = [r for r in rows if r["state"] == "complete"]
    reverse = settings.direction == "maximize"
    top = sorted(done, key=lambda r: r[settings.metric], reverse=reverse)[:TOP_TRIALS]
    names = [f"params.{n}" for n in settings.search_space().names]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Study {html.escape(settings.name)}"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>Study {html.escape(settings.name)}</h1>",
        f"<p>{len(rows)} trials: "
        + ", ".join(f"{v} {html.escape(k)}" for k, v in sorted(counts.items()))
        + f". Objective: {settings.direction} {html.escape(settings.metric)} (validation split); "
        f"sampler {html.escape(settings.sampler)}, pruner {html.escape(settings.pruner['name'])}."
        "</p>",
    ]
    if top:
        best = top[0]
        parts.append(
            f"<h2>Best trial {best['number']}</h2><p>{html.escape(settings.metric)} "
            f"{_fmt(best[settings.metric])}; its full config is best.yaml.</p>"
        )
        parts.append(_table([best], names))
    if test:
        parts.append(
            f"<p>Test set, evaluated once for trial {test['trial']}: accuracy "
            f"{test['accuracy']:.4f}, loss {test['loss']:.4f}, macro F1 {test['macro_f1']:.4f} "
            f"({test['images']:,} images).</p>"
        )
    for title, target in figures.values():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(target, Path):
            parts.append(_image(target))
        else:
            parts.append(f"<p class='note'>{html.escape(target)}</p>")
    columns = ["number", settings.metric, *names, "epochs", "seconds"]
    parts.append(f"<h2>Top {len(top)} trials</h2>" + _table(top, columns))
    parts.append(f"<p class='note'>Every trial: {RESULTS_CSV}.</p></body></html>")
    return "\n".join(parts)
