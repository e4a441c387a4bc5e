"""The public workflow in a few calls: train (then evaluate and report), evaluate, predict, summary."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.config import RunConfig, load_config
from cnnlab.evaluation import (
    Evaluation,
    Prediction,
    evaluate_model,
    predict_files,
    write_evaluation,
)
from cnnlab.models import format_summary, preset_layers, summarize
from cnnlab.models.summary import ModelSummary
from cnnlab.training.checkpoint import load_model
from cnnlab.training.loop import Callback
from cnnlab.training.run import TrainResult, train_run

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A finished run: its folder, training history and test evaluation (if the data has a test set)."""

    run_dir: Path
    training: TrainResult
    evaluation: Evaluation | None

    @property
    def test_accuracy(self) -> float | None:
        return self.evaluation.accuracy if self.evaluation else None


def make_config(config: RunConfig | str | Path | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from a config object or YAML path, with dotted overrides like `train__lr=0.01`."""
    if config is None:
        base = RunConfig()
    elif isinstance(config, RunConfig):
        base = config
    else:
        base = load_config(config)
    if not overrides:
        return base
    return base.with_overrides({key.replace("__", "."): value for key, value in overrides.items()})


def train(
    config: RunConfig | str | Path | None = None,
    *,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    evaluate: bool = True,
    report: bool = True,
    **overrides: Any,
) -> Run:
    """Train a model, evaluate its best weights on the test set and write the run report.

    >>> run = train(data__dataset="digits", model__preset="fast", train__epochs=5)
    >>> run.test_accuracy
    """
    result = train_run(
        make_config(config, **overrides) if resume is None else RunConfig(),
        callbacks=callbacks,
        resume=resume,
    )
    evaluation = None
    if evaluate and result.data.test is not None and len(result.data.test) > 0:
        # The saved best weights, as `cnnlab evaluate` reads them, so both give equal numbers.
        model, info = load_model(result.run_dir)
        evaluation = evaluate_model(
            model,
            result.data.test,
            info.preprocessing,
            info.classes,
            batch_size=result.config.train.eval_batch_size,
            tta_flip=result.config.train.tta_flip,
            amp=result.config.train.amp,
        )
        write_evaluation(result.run_dir, evaluation)
    if report:
        from cnnlab.reporting.report import write_report

        write_report(result.run_dir, evaluation, result.data)
    return Run(result.run_dir, result, evaluation)


def evaluate(
    run: str | Path, split: str = "test", tta_flip: bool | None = None, amp: bool | None = None
) -> Evaluation:
    """Evaluate a run folder's best weights; writes evaluation files into the folder.
    `tta_flip` and `amp` default to the run's config."""
    from cnnlab.evaluation import evaluate_run

    return evaluate_run(run, split=split, tta_flip=tta_flip, amp=amp)


def predict(
    run: str | Path, images: Sequence[str | Path] | str | Path, top_k: int = 3
) -> list[Prediction]:
    """Top-k class probabilities for image files or folders of images."""
    paths = [images] if isinstance(images, str | Path) else list(images)
    predictions, skipped = predict_files(run, paths, top_k)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return predictions


def summary(
    model: str | list[Any],
    input_shape: tuple[int, int, int],
    num_classes: int = 10,
) -> ModelSummary:
    """Keras-style summary of a preset name or layer list; input_shape is (H, W, C) as in Keras."""
    height, width, channels = input_shape
    shape = (channels, height, width)
    layers = preset_layers(model, num_classes, shape) if isinstance(model, str) else model
    return summarize(layers, shape, num_classes)


__all__ = ["Run", "evaluate", "format_summary", "make_config", "predict", "summary", "train"]
