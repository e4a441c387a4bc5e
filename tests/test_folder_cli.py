"""The folder path through the CLI: check, quarantine, train --data, splits reuse, predict."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """3 classes of 16x16 RGB pictures (a bright bar in a class-specific place) + 2 bad files."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("bars", "columns", "dots")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
            if label == 0:
                pixels[7:9, :] = 240
            elif label == 1:
                pixels[:, 7:9] = 240
            else:
                pixels[2:4, 2:4] = 240
                pixels[11:13, 11:13] = 240
            Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "bars" / "empty.png").write_bytes(b"")
    (root / "dots" / "notes.jpg").write_text("not a picture")
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_lists_the_planted_problems_and_quarantines_them(capsys, photo_folder, tmp_path):
    code, out, _ = run(capsys, "check", str(photo_folder), "--format", "json")
    report = json.loads(out)
    assert code == 1
    bad = {Path(p["path"]).name: p["kind"] for p in report["problems"]}
    assert bad == {"empty.png": "zero-byte", "notes.jpg": "non-image"}
    quarantine = tmp_path / "quarantine"
    code, out, _ = run(capsys, "check", str(photo_folder), "--quarantine", str(quarantine))
    assert (quarantine / "bars" / "empty.png").exists()
    assert (quarantine / "dots" / "notes.jpg").exists()
    assert not (photo_folder / "bars" / "empty.png").exists()
    assert "Quarantined 2 files" in out
    code, _, _ = run(capsys, "check", str(photo_folder))
    assert code == 0


def test_train_on_a_folder_then_reuse_its_split(capsys, caplog, photo_folder, tmp_path):
    project = tmp_path / "runs"
    code, out, err = run(
        capsys,
        "train",
        "--data",
        str(photo_folder),
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--val-split",
        "0.2",
        "--test-split",
        "0.2",
        "--batch-size",
        "16",
        "--project",
        str(project),
        "--quiet",
    )
    assert code == 0, err
    assert "Skipped 2 unusable files" in caplog.text
    run_dir = project / "train"
    rows = list(csv.DictReader((run_dir / "splits.csv").open()))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["label"] for r in rows} == {"bars", "columns", "dots"}
    assert len(rows) == 60
    code, _, err = run(
        capsys,
        "train",
        "--data",
        str(photo_folder),
        "--epochs",
        "1",
        "--splits",
        str(run_dir / "splits.csv"),
        "--batch-size",
        "16",
        "--project",
        str(project),
        "--quiet",
    )
    assert code == 0, err
    again = list(csv.DictReader((project / "train-2" / "splits.csv").open()))
    assert sorted(map(tuple, (r.values() for r in again))) == sorted(
        map(tuple, (r.values() for r in rows))
    )
    code, out, _ = run(
        capsys, "predict", str(run_dir), str(photo_folder / "dots"), "--format", "json"
    )
    predictions = json.loads(out)
    assert code == 0 and len(predictions) == 20
    assert {p["top"][0]["class"] for p in predictions} <= {"bars", "columns", "dots"}


def test_a_folder_with_one_class_is_refused(capsys, tmp_path):
    only = tmp_path / "one" / "cats"
    only.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(only / "a.png")
    code, _, err = run(
        capsys, "train", "--data", str(tmp_path / "one"), "--project", str(tmp_path / "runs")
    )
    assert code == 2 and "at least 2 classes" in err and "Traceback" not in err
