"""cnnlab compare: a leaderboard over runs of different models and datasets; clear refusals."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import corner_squares
from PIL import Image
from test_report import digits_run

from cnnlab import api
from cnnlab.cli import main
from cnnlab.models import summarize
from cnnlab.reporting.compare import compare_runs, find_runs
from cnnlab.training.checkpoint import read_model_info

SQUARE_LAYERS = [
    {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
    {"Flatten": {}},
    {"Dense": {"units": 4, "activation": "softmax"}},
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A digits run and a run on a folder of corner-square PNGs, with different models."""
    folder = tmp_path_factory.mktemp("squares")
    squares = corner_squares(64)
    for i, (image, label) in enumerate(zip(squares.images, squares.labels.tolist(), strict=True)):
        (folder / f"corner{label}").mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"corner{label}" / f"{i}.png")
    project = tmp_path_factory.mktemp("compare_runs")
    squares_run = api.train(
        data__path=str(folder),
        data__val_split=0.25,
        data__test_split=0.25,
        model__layers=SQUARE_LAYERS,
        train__epochs=1,
        train__batch_size=16,
        project=str(project),
        name="squares",
        report=False,
    ).run_dir
    digits = digits_run(tmp_path_factory)
    return [digits, squares_run], str(folder)


def test_leaderboard_of_runs_with_different_models_and_datasets(two_runs, tmp_path) -> None:
    two_runs, folder = two_runs
    comparison = compare_runs(two_runs, out_dir=tmp_path)
    assert {row.dataset for row in comparison.rows} == {"digits", folder}
    assert len({row.params for row in comparison.rows}) == 2  # two different models
    for run_dir in two_runs:
        row = next(r for r in comparison.rows if r.run == str(run_dir))
        info = read_model_info(run_dir)
        expected = summarize(info.layers, info.preprocessing.input_shape, len(info.classes))
        assert row.params == expected.total_params
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        assert row.test_accuracy == pytest.approx(evaluation["accuracy"])
        assert row.epochs == len(row.history) > 0 and row.seconds > 0
    accuracies = [row.test_accuracy for row in comparison.rows]
    assert accuracies == sorted(accuracies, reverse=True)
    with comparison.csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in table] == [1, 2]
    assert {r["run"] for r in table} == {str(p) for p in two_runs}
    page = comparison.html_path.read_text()
    assert page.count("<tr>") == 3 and "data:image/png;base64," in page  # header + 2 runs


def test_cli_compare_prints_the_leaderboard(two_runs, tmp_path, capsys) -> None:
    two_runs, _ = two_runs
    code = main(["compare", *map(str, two_runs), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "test acc" in out and "digits" in out and f"Results saved to {tmp_path}" in out
    assert (tmp_path / "compare.html").is_file() and (tmp_path / "leaderboard.csv").is_file()


def test_a_folder_of_runs_expands_to_its_runs(two_runs) -> None:
    two_runs, _ = two_runs
    assert find_runs([two_runs[1].parent]) == [two_runs[1]]


def test_compare_refuses_a_folder_without_runs(tmp_path, capsys) -> None:
    (tmp_path / "notes").mkdir()
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no cnnlab runs" in err and "cnnlab compare runs" in err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
