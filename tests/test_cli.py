import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("model", "shape", "total"),
    [
        ("basic", "32,32,3", "225,610"),
        ("tiny", "28,28,1", "27,562"),
        ("dropout", "32,32,3", "543,210"),
    ],
)
def test_summary_parameter_counts_equal_keras(capsys, model: str, shape: str, total: str) -> None:
    code, out, _ = run_cli(
        capsys, "summary", "--model", model, "--input-shape", shape, "--classes", "10"
    )
    assert code == 0
    assert f"Total params: {total}" in out


def test_summary_shows_keras_output_shapes(capsys) -> None:
    _, out, _ = run_cli(capsys, "summary", "--model", "basic", "--input-shape", "32,32,3")
    for shape in (
        "(None, 29, 29, 32)",
        "(None, 14, 14, 32)",
        "(None, 11, 11, 32)",
        "(None, 5, 5, 32)",
        "(None, 800)",
        "(None, 256)",
        "(None, 10)",
    ):
        assert shape in out


def test_datasets_lists_every_source(capsys) -> None:
    code, out, _ = run_cli(capsys, "datasets", "--format", "json")
    names = {row["name"] for row in json.loads(out)}
    assert code == 0 and {"digits", "fashion-mnist", "mnist", "cifar10", "cifar100"} <= names
    digits = next(row for row in json.loads(out) if row["name"] == "digits")
    assert digits["available"] is True and digits["train"] + digits["test"] == 1797


def test_train_evaluate_predict_end_to_end(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(
        capsys,
        "train",
        "--dataset",
        "digits",
        "--model",
        "fast",
        "--epochs",
        "3",
        "--project",
        str(tmp_path / "runs"),
        "--lr",
        "0.003",
        "--quiet",
    )
    run_dir = tmp_path / "runs" / "train"
    assert code == 0
    assert out.strip().splitlines()[-1] == f"Results saved to {run_dir}"
    assert "Epoch 3/3" in out and "Test: loss" in out
    code, out, _ = run_cli(capsys, "evaluate", str(run_dir), "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["images"] == 360 and 0 <= report["accuracy"] <= 1
    code, out, _ = run_cli(capsys, "evaluate", str(run_dir))
    assert "precision" in out and "Confusion matrix" in out
    image = tmp_path / "digit.png"
    Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(image)
    code, out, _ = run_cli(capsys, "predict", str(run_dir), str(image), "--format", "json")
    top = json.loads(out)[0]["top"]
    assert code == 0 and len(top) == 3 and top[0]["probability"] >= top[1]["probability"]
    code, out, _ = run_cli(
        capsys, "train", "--config", str(run_dir / "config.yaml"), "--print-config"
    )
    assert "dataset: digits" in out


def test_train_without_validation_still_reports_its_time(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(
        capsys,
        "train",
        "--dataset",
        "digits",
        "--model",
        "fast",
        "--epochs",
        "1",
        "--val-split",
        "0",
        "--project",
        str(tmp_path / "runs"),
        "--quiet",
    )
    assert code == 0
    assert "Best epoch" not in out and "Training took" in out and "Test: loss" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "fashon-mnist"], "Did you mean 'fashion-mnist'"),
        (["train", "--dataset", "digits", "--epochs", "0"], "train.epochs must be positive"),
        (["train", "--dataset", "digits", "--model", "basik"], "Did you mean 'basic'"),
        (["train", "--config", "nowhere.yaml"], "does not exist"),
        (["evaluate", "no/such/run"], "does not exist"),
        (["summary", "--model", "basic", "--input-shape", "32,32"], "--input-shape must be H,W,C"),
        (["train", "--set", "train.lr"], "KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    capsys, tmp_path, monkeypatch, args, message
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_bad_yaml_model_file(capsys, tmp_path: Path) -> None:
    spec = tmp_path / "model.yaml"
    spec.write_text("- Conv2D: {filters: 8, kernel_size: 3}\n- Flaten: {}\n- Dense: {units: 10}\n")
    code, _, err = run_cli(capsys, "summary", "--model", str(spec), "--input-shape", "28,28,1")
    assert code == 2 and "Flaten" in err and "Flatten" in err
    spec.write_text("layers: [Conv2D: {filters: 8\n")
    code, _, err = run_cli(capsys, "summary", "--model", str(spec), "--input-shape", "28,28,1")
    assert code == 2 and "not valid YAML" in err


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab.cli", "--debug", "evaluate", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "cnnlab.cli", "evaluate", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "error:" in plain.stderr
