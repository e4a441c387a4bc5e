"""Test-set evaluation and prediction: metrics, classification report, confusion matrix, top-k."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, f1_score

from cnnlab import fileio
from cnnlab.data.prepare import prepare_data
from cnnlab.data.types import ImageSet
from cnnlab.errors import CnnlabError, DataError
from cnnlab.inference import Preprocessing, predict_logits
from cnnlab.reporting.plots import save_confusion_matrix
from cnnlab.training import runs
from cnnlab.training.checkpoint import ModelInfo, load_model
from cnnlab.training.metrics import confusion_matrix

EVALUATION_FILE = "evaluation.json"  # the test split; other splits add _<split>


@dataclass
class Evaluation:
    """Metrics of a model on one labelled split; `to_dict()` is what `--format json` prints."""

    split: str
    classes: tuple[str, ...]
    loss: float
    accuracy: float
    top_k_accuracy: dict[int, float]
    macro_f1: float
    weighted_f1: float
    report: dict[str, Any]  # scikit-learn's classification_report(output_dict=True)
    report_text: str
    confusion: np.ndarray  # (K, K) counts, rows true
    expected_calibration_error: float
    probabilities: np.ndarray = field(repr=False)  # (N, K)
    labels: np.ndarray = field(repr=False)  # (N,)

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "images": int(self.labels.shape[0]),
            "loss": self.loss,
            "accuracy": self.accuracy,
            "top_k_accuracy": {str(k): v for k, v in self.top_k_accuracy.items()},
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "expected_calibration_error": self.expected_calibration_error,
            "classes": list(self.classes),
            "per_class": {name: self.report[name] for name in self.classes},
            "confusion_matrix": self.confusion.tolist(),
        }


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> float:
    """ECE: the support-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if labels.size == 0:
        return 0.0
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total / labels.size)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins of a reliability diagram (the bins expected_calibration_error uses)."""

    edges: np.ndarray  # (B + 1,) from 0 to 1
    counts: np.ndarray  # (B,) images whose top probability falls in the bin
    accuracy: np.ndarray  # (B,) fraction right in the bin; nan where empty
    confidence: np.ndarray  # (B,) mean top probability in the bin; nan where empty

    @property
    def expected_calibration_error(self) -> float:
        """The support-weighted mean |accuracy - confidence|; equals expected_calibration_error."""
        used = self.counts > 0
        total = self.counts.sum()
        if total == 0:
            return 0.0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.counts[used] * gaps).sum() / total)


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> ReliabilityBins:
    """Per-bin accuracy, mean confidence and count, binned exactly like expected_calibration_error."""
    confidence = probabilities.max(1) if labels.size else np.zeros(0)
    correct = probabilities.argmax(1) == labels if labels.size else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.int64)
    accuracy = np.full(bins, np.nan)
    mean_confidence = np.full(bins, np.nan)
    for b in np.flatnonzero(counts):
        in_bin = which == b
        accuracy[b] = correct[in_bin].mean()
        mean_confidence[b] = confidence[in_bin].mean()
    return ReliabilityBins(edges, counts, accuracy, mean_confidence)


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], split: str = "test"
) -> Evaluation:
    """All evaluation metrics from logits and true labels."""
    k = len(classes)
    probabilities = F.softmax(logits.float(), dim=1).numpy()
    y = labels.numpy()
    predicted = probabilities.argmax(1)
    label_ids = list(range(k))
    report = classification_report(
        y,
        predicted,
        labels=label_ids,
        target_names=list(classes),
        output_dict=True,
        zero_division=0,
    )
    report_text = classification_report(
        y, predicted, labels=label_ids, target_names=list(classes), digits=4, zero_division=0
    )
    ranked = np.argsort(-probabilities, axis=1)
    top_k = {n: float((ranked[:, :n] == y[:, None]).any(1).mean()) for n in (1, 3, 5) if n <= k}
    return Evaluation(
        split=split,
        classes=tuple(classes),
        loss=float(F.cross_entropy(logits.float(), labels)),
        accuracy=float((predicted == y).mean()),
        top_k_accuracy=top_k,
        macro_f1=float(f1_score(y, predicted, labels=label_ids, average="macro", zero_division=0)),
        weighted_f1=float(
            f1_score(y, predicted, labels=label_ids, average="weighted", zero_division=0)
        ),
        report=report,
        report_text=report_text,
        confusion=confusion_matrix(torch.from_numpy(predicted), labels, k).numpy(),
        expected_calibration_error=expected_calibration_error(probabilities, y),
        probabilities=probabilities,
        labels=y,
    )


def evaluate_model(
    model: torch.nn.Module,
    images: ImageSet,
    prep: Preprocessing,
    classes: Sequence[str],
    *,
    split: str = "test",
    batch_size: int = 256,
    tta_flip: bool = False,
    amp: bool = False,
) -> Evaluation:
    if len(images) == 0:
        raise DataError(f"The {split} split is empty, so there is nothing to evaluate.")
    logits = predict_logits(
        model, images.images, prep, batch_size=batch_size, tta_flip=tta_flip, amp=amp
    )
    return metrics_from_logits(logits, images.labels, classes, split)


def load_split(run_dir: Path, split: str) -> ImageSet:
    """The images of `split` (test, val or train) exactly as the run saw them."""
    config = runs.read_config(run_dir)
    data = prepare_data(config.data, config.seed)
    chosen = {"test": data.test, "val": data.val, "train": data.train}.get(split)
    if split not in ("test", "val", "train"):
        raise CnnlabError(f"Unknown split '{split}'. Choose test, val or train.")
    if chosen is None or len(chosen) == 0:
        raise DataError(
            f"The run's dataset has no {split} images. Evaluate another split with --split val."
        )
    return chosen


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    tta_flip: bool | None = None,
    amp: bool | None = None,
    write: bool = True,
) -> Evaluation:
    """Evaluate a run folder's best weights on a split; writes the evaluation files when `write`."""
    run_dir = runs.resolve_run_dir(run_dir)
    model, info = load_model(run_dir)
    config = runs.read_config(run_dir)
    flip = config.train.tta_flip if tta_flip is None else tta_flip
    evaluation = evaluate_model(
        model,
        load_split(run_dir, split),
        info.preprocessing,
        info.classes,
        split=split,
        batch_size=config.train.eval_batch_size,
        tta_flip=flip,
        amp=config.train.amp if amp is None else amp,
    )
    if write:
        write_evaluation(run_dir, evaluation)
    return evaluation


def write_evaluation(run_dir: Path, evaluation: Evaluation) -> list[Path]:
    """evaluation.json, classification_report.txt, confusion matrix CSV and two heatmaps."""
    suffix = "" if evaluation.split == "test" else f"_{evaluation.split}"
    paths = [
        run_dir / EVALUATION_FILE.replace(".json", f"{suffix}.json"),
        run_dir / f"classification_report{suffix}.txt",
        run_dir / f"confusion_matrix{suffix}.csv",
        run_dir / f"confusion_matrix{suffix}.png",
        run_dir / f"confusion_matrix_normalized{suffix}.png",
    ]
    fileio.write_text(paths[0], json.dumps(evaluation.to_dict(), indent=2) + "\n")
    fileio.write_text(paths[1], evaluation.report_text)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *evaluation.classes])
    for name, row in zip(evaluation.classes, evaluation.confusion.tolist(), strict=True):
        writer.writerow([name, *row])
    fileio.write_text(paths[2], buffer.getvalue())
    save_confusion_matrix(evaluation.confusion, evaluation.classes, paths[3])
    save_confusion_matrix(evaluation.confusion, evaluation.classes, paths[4], normalize=True)
    return paths


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image."""

    source: str
    top: list[tuple[str, float]]  # (class name, probability), best first

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.source, "top": [{"class": c, "probability": p} for c, p in self.top]}


def predict_images(
    model: torch.nn.Module,
    info: ModelInfo,
    images: torch.Tensor,
    sources: Sequence[str],
    top_k: int = 3,
) -> list[Prediction]:
    """Top-k predictions for uint8 images (N, C, H, W) already at the model's input shape."""
    logits = predict_logits(model, images, info.preprocessing)
    probabilities = F.softmax(logits, dim=1)
    k = max(1, min(top_k, len(info.classes)))
    values, indices = probabilities.topk(k, dim=1)
    return [
        Prediction(
            source, [(info.classes[int(i)], float(v)) for v, i in zip(vals, idx, strict=True)]
        )
        for source, vals, idx in zip(sources, values, indices, strict=True)
    ]


def predict_files(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    top_k: int = 3,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Decode image files like training data was prepared and predict them.

    Returns (predictions, skipped) where skipped lists (path, reason) of unreadable images.
    """
    from cnnlab.data.images import decode_image

    run_dir = runs.resolve_run_dir(run_dir)
    model, info = load_model(run_dir)
    prep = info.preprocessing
    channels, height, width = prep.input_shape
    arrays, sources, skipped = [], [], []
    for path in expand_image_paths(paths):
        try:
            array = decode_image(
                path,
                image_size=(height, width),
                color_mode="grayscale" if channels == 1 else "rgb",
                resize=prep.resize,
            )
        except CnnlabError as exc:
            skipped.append((str(path), str(exc)))
            continue
        arrays.append(torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)))
        sources.append(str(path))
    if not arrays:
        return [], skipped
    return predict_images(model, info, torch.stack(arrays), sources, top_k), skipped


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def expand_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expand to the images inside them (recursively, sorted)."""
    result: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            result.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")
                )
            )
        elif path.exists():
            result.append(path)
        else:
            raise DataError(f"Image {path} does not exist. Check the path.")
    if not result:
        raise DataError(f"No image files found in {', '.join(map(str, paths))}.")
    return result
