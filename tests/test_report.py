"""report.html: numbers equal `cnnlab evaluate --format json`, and the page loads in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cnnlab import api
from cnnlab.cli import main
from cnnlab.config import RunConfig
from cnnlab.reporting.report import _augment_text, most_confused_pairs

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECTIONS = ("overview", "model", "curves", "test", "confused", "errors", "calibration", "data")
_RUNS: dict[str, Path] = {}
DIGITS_LAYERS = [  # small and quick on 8x8 digits; global pooling, so explained by Grad-CAM
    {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"}},
    {"MaxPooling2D": {"pool_size": 2}},
    {"Conv2D": {"filters": 32, "kernel_size": 3, "padding": "same", "activation": "relu"}},
    {"GlobalAveragePooling2D": {}},
    {"Dense": {"units": 10, "activation": "softmax"}},
]


def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short digits run with augmentation, trained once per test session (api.train)."""
    if "digits" not in _RUNS:
        project = tmp_path_factory.mktemp("report_runs")
        run = api.train(
            data__dataset="digits",
            data__val_split=0.2,
            data__augment__shift=0.1,
            model__layers=DIGITS_LAYERS,
            train__epochs=2,
            train__batch_size=64,
            train__lr=0.01,
            project=str(project),
        )
        _RUNS["digits"] = run.run_dir
    return _RUNS["digits"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return digits_run(tmp_path_factory)


def metric_values(page: str) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in re.findall(r'id="metric-([\w-]+)" data-value="([^"]+)"', page)
    }


def test_train_writes_a_report_whose_numbers_equal_evaluate_json(run_dir, capsys) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert main(["evaluate", str(run_dir), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "evaluation.json").read_text())
    values = metric_values(page)
    for expected in (printed, saved):
        assert values["images"] == expected["images"] == 360
        for key in ("loss", "accuracy", "macro_f1", "weighted_f1", "expected_calibration_error"):
            assert values[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (
                key
            )  # float32 noise only
        for k, value in expected["top_k_accuracy"].items():
            if k != "1":
                assert values[f"top{k}_accuracy"] == pytest.approx(value, rel=1e-6)
        f1 = dict(re.findall(r'data-class="([^"]+)" data-f1="([^"]+)"', page))
        assert {name: float(v) for name, v in f1.items()} == pytest.approx(
            {name: row["f1-score"] for name, row in expected["per_class"].items()}
        )


def test_report_has_every_section_and_inline_images_only(run_dir) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page and f'href="#{section}"' in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) > 20 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "Augmentation preview" in page and "@media print" in page
    for text in ("conv2d (Conv2D)", "Total", "Reliability", "Grad-CAM", "Most-confused"):
        assert text.lower() in page.lower()


def test_report_opens_in_chromium_without_errors(run_dir, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto((run_dir / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
            )
            toc = page.evaluate("getComputedStyle(document.querySelector('nav.toc')).position")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            page.emulate_media(media="print")
            printed_toc = page.evaluate(
                "getComputedStyle(document.querySelector('nav.toc')).display"
            )
        finally:
            browser.close()
    assert errors == []
    assert len(images) > 20
    assert [alt for complete, width, alt in images if not (complete and width > 0)] == []
    assert toc == "sticky" and printed_toc == "none"
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_cli_report_rewrites_the_page(run_dir, capsys) -> None:
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert f"Report saved to {run_dir / 'report.html'}" in capsys.readouterr().out
    assert metric_values((run_dir / "report.html").read_text())["images"] == 360


def test_cli_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a cnnlab run folder" in capsys.readouterr().err


def test_most_confused_pairs_are_off_diagonal_and_largest_first() -> None:
    import numpy as np

    confusion = np.array([[50, 3, 0], [7, 40, 1], [0, 0, 9]])
    assert most_confused_pairs(confusion, limit=5) == [(1, 0, 7), (0, 1, 3), (1, 2, 1)]
    assert most_confused_pairs(np.eye(3, dtype=int) * 5) == []


def test_learning_curves_name_the_label_smoothing_of_the_training_loss() -> None:
    import matplotlib.pyplot as plt

    from cnnlab.reporting.plots import learning_curves_figure

    history = [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 0.5, "train_accuracy": 0.8, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.7, "val_loss": 0.4, "train_accuracy": 0.9, "lr": 1e-4},
    ]
    smoothed = learning_curves_figure(history, 2, label_smoothing=0.1)
    plain = learning_curves_figure(history, 2)
    try:
        labels = [line.get_label() for line in smoothed.axes[0].get_lines()]
        assert labels[:2] == ["train (label smoothing 0.1)", "val"]
        assert [line.get_label() for line in plain.axes[0].get_lines()][:2] == ["train", "val"]
    finally:  # pyplot keeps figures open; other tests check that nothing is left behind
        plt.close(smoothed)
        plt.close(plain)


@pytest.mark.parametrize(
    ("augment", "text"),
    [
        ({}, "off"),
        ({"data.augment.flip": True}, "shift 0, flip on"),
        ({"data.augment.shift": 0.1}, "shift 0.1, flip off"),
        ({"data.augment.erase": 0.5}, "shift 0, flip off, random erasing 0.5"),
    ],
)
def test_report_names_every_augmentation_in_use(augment, text) -> None:
    assert _augment_text(RunConfig().with_overrides(augment)) == text
