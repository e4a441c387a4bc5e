import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import classification_report, confusion_matrix

from cnnlab.evaluation import (
    evaluate_run,
    expected_calibration_error,
    metrics_from_logits,
    predict_files,
)
from cnnlab.training.run import train_run


def test_metrics_equal_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5, generator=generator)
    labels = torch.randint(0, 5, (300,), generator=generator)
    labels[:150] = logits[:150].argmax(1)  # half right, so the metrics are not trivial
    classes = ("a", "b", "c", "d", "e")
    result = metrics_from_logits(logits, labels, classes)
    predicted = logits.argmax(1).numpy()
    expected = classification_report(
        labels.numpy(), predicted, target_names=list(classes), output_dict=True, zero_division=0
    )
    for name in classes:
        for metric in ("precision", "recall", "f1-score", "support"):
            assert result.report[name][metric] == pytest.approx(expected[name][metric])
    assert result.accuracy == pytest.approx(expected["accuracy"])
    assert result.macro_f1 == pytest.approx(expected["macro avg"]["f1-score"])
    assert result.weighted_f1 == pytest.approx(expected["weighted avg"]["f1-score"])
    np.testing.assert_array_equal(result.confusion, confusion_matrix(labels.numpy(), predicted))
    assert result.top_k_accuracy[1] == pytest.approx(result.accuracy)
    assert result.top_k_accuracy[3] >= result.top_k_accuracy[1]
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))


def test_calibration_error_against_a_hand_computation() -> None:
    # Two bins used: confidence 0.95 (4 images, 3 right) and 0.55 (2 images, 2 right).
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.45, 0.55]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    expected = (4 * abs(0.75 - 0.95) + 2 * abs(1.0 - 0.55)) / 6
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)


def test_evaluate_and_predict_a_trained_run(digits_config, tmp_path) -> None:
    run_dir = train_run(digits_config.with_overrides({"train.epochs": 4})).run_dir
    evaluation = evaluate_run(run_dir)
    assert evaluation.labels.shape[0] == 360
    assert evaluation.accuracy > 0.5
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["accuracy"] == pytest.approx(evaluation.accuracy)
    for name in (
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "classification_report.txt",
    ):
        assert (run_dir / name).is_file()
    # A big RGB picture of a "1" is brought to 8x8 grayscale like the training data.
    picture = np.zeros((64, 48, 3), dtype=np.uint8)
    picture[8:56, 20:28] = 255
    Image.fromarray(picture).save(tmp_path / "one.png")
    (tmp_path / "notes.png").write_text("not an image")
    predictions, skipped = predict_files(
        run_dir, [tmp_path / "one.png", tmp_path / "notes.png"], top_k=3
    )
    assert len(predictions) == 1 and len(predictions[0].top) == 3
    probabilities = [p for _, p in predictions[0].top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert skipped and "notes.png" in skipped[0][0]


def test_no_amp_evaluates_in_exact_fp32(digits_config, capsys) -> None:
    from cnnlab.cli import main
    from cnnlab.evaluation import load_model, load_split
    from cnnlab.inference import prepare_batch

    run_dir = train_run(digits_config.with_overrides({"train.epochs": 2})).run_dir
    model, info = load_model(run_dir)
    test = load_split(run_dir, "test")
    with torch.no_grad():
        inputs = prepare_batch(test.images, info.preprocessing, torch.device("cpu"), False)
        expected = torch.softmax(model.eval()(inputs), 1).numpy()
    exact = evaluate_run(run_dir, amp=False, write=False)
    assert np.abs(exact.probabilities - expected).max() < 1e-5
    assert main(["evaluate", str(run_dir), "--no-amp", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(exact.accuracy)
    assert printed["loss"] == pytest.approx(exact.loss, abs=1e-6)
