"""A training run from config to run folder: data, model, loop, checkpoints, metrics and curves."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cnnlab.config import DEFAULT_PRESET, ModelConfig, RunConfig
from cnnlab.data.balance import class_weights
from cnnlab.data.prepare import PreparedData, prepare_data
from cnnlab.errors import CheckpointError, CnnlabError, ConfigError, DataError
from cnnlab.inference import Preprocessing, select_device
from cnnlab.models import build_model, preset_layers
from cnnlab.reporting.images import save_augmentation_preview, save_sample_grid
from cnnlab.reporting.plots import save_learning_curves
from cnnlab.training import runs
from cnnlab.training.checkpoint import (
    LAST_CHECKPOINT,
    ModelInfo,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from cnnlab.training.cores import ThreadGovernor, configure_threads, usable_cores
from cnnlab.training.loop import Callback, Trainer

log = logging.getLogger(__name__)


class TrainingInterrupted(CnnlabError):
    """Ctrl-C stopped training cleanly; the last checkpoint was written."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            f"Training interrupted; the last checkpoint was saved in {run_dir / LAST_CHECKPOINT}. "
            f"Resume with: cnnlab train --resume {run_dir}"
        )
        self.run_dir = run_dir


@dataclass
class TrainResult:
    """What a finished training run leaves behind."""

    run_dir: Path
    config: RunConfig
    history: list[dict[str, float]]
    best_epoch: int
    stop_reason: str
    seconds: float
    data: PreparedData = field(repr=False)
    model: torch.nn.Module = field(repr=False)
    info: ModelInfo = field(repr=False)


def resolve_layers(
    model: ModelConfig, num_classes: int, input_shape: tuple[int, int, int]
) -> list[Any]:
    """The explicit layer list of the model config (a preset expands to its layers)."""
    if model.layers:
        return list(model.layers)
    return preset_layers(model.preset or DEFAULT_PRESET, num_classes, input_shape=input_shape)


class RunFolderWriter(Callback):
    """Keeps the run folder current: metrics.csv each epoch, best weights, last.ckpt."""

    def __init__(self, run_dir: Path, info: ModelInfo) -> None:
        self.run_dir = run_dir
        self.info = info

    def on_best(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.info = replace(
            self.info,
            epoch=int(logs["epoch"]),
            monitor=trainer.monitor,
            monitor_value=float(logs[trainer.monitor]),
        )
        save_weights(self.run_dir, trainer.model, self.info)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        runs.write_metrics(self.run_dir, trainer.state.history)

    def on_checkpoint(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / LAST_CHECKPOINT, trainer.state_dict())


@contextmanager
def stop_on_sigint(trainer: Trainer) -> Iterator[None]:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts at once."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. a background job
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        log.warning("Stopping after the current step (press Ctrl-C again to abort at once)...")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def build_trainer(
    config: RunConfig, data: PreparedData, callbacks: Sequence[Callback]
) -> tuple[Trainer, ModelInfo]:
    layers = resolve_layers(config.model, data.num_classes, data.input_shape)
    torch.manual_seed(config.seed)  # weight initialisation depends on the seed alone
    model = build_model(layers, data.input_shape, data.num_classes)
    prep = Preprocessing(
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        color_mode=data.color_mode,
        resize=data.resize,
    )
    info = ModelInfo(
        layers=layers,
        classes=data.classes,
        preprocessing=prep,
        model_name=config.model.preset or "custom",  # a preset's name, or custom layers
        final_activation=model.final_activation,
    )
    t = config.train
    weights = sample_weights = None
    if t.balance == "weights":
        weights = class_weights(data.train.labels, data.num_classes)
    elif t.balance == "sampler":
        per_class = class_weights(data.train.labels, data.num_classes)
        sample_weights = per_class[data.train.labels]
    trainer = Trainer(
        model,
        t,
        data.train,
        data.val,
        prep,
        augment=data.augment,
        seed=config.seed,
        device=select_device(t.device),
        callbacks=callbacks,
        class_weights=weights,
        sample_weights=sample_weights,
    )
    return trainer, info


def train_run(
    config: RunConfig,
    *,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | None = None,
    run_dir: Path | None = None,
) -> TrainResult:
    """Train per `config` into a new run folder (or continue the run folder `resume`)."""
    started = time.perf_counter()
    checkpoint = None
    if resume is not None:
        run_dir, config, checkpoint = _open_for_resume(resume)
    configure_threads(config.train.threads)
    data = _prepare(config, run_dir if resume is not None else None)
    if config.train.batch_size > len(data.train):
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is larger than the "
            f"{len(data.train):,} training images, so no full batch can be formed. Use "
            f"--batch-size {len(data.train)} or less (32 to 128 are usual)."
        )
    layers = resolve_layers(config.model, data.num_classes, data.input_shape)
    if not config.model.layers:  # record the preset's layers, so the config file stands alone
        preset = config.model.preset or DEFAULT_PRESET
        config = replace(config, model=replace(config.model, preset=preset, layers=layers))
    if run_dir is None:
        run_dir = runs.new_run_dir(config.project, config.name)
    if resume is None:
        runs.write_config(run_dir, config)
    if checkpoint is None:
        runs.write_splits(run_dir, data.split_rows, data.split_header)
        _write_data_previews(run_dir, data, config.seed)
    log.info(
        "Run folder %s (if training stops, resume with: cnnlab train --resume %s)", *[run_dir] * 2
    )
    writer = RunFolderWriter(run_dir, ModelInfo([], (), Preprocessing((1, 1, 1))))
    if not config.train.threads:
        callbacks = [ThreadGovernor(usable_cores()), *callbacks]
    trainer, info = build_trainer(config, data, [writer, *callbacks])
    writer.info = info
    if checkpoint is not None:
        _restore(trainer, checkpoint, run_dir)
        log.info(
            "Resuming %s at epoch %d, step %d",
            run_dir,
            trainer.state.epoch + 1,
            trainer.state.step_in_epoch,
        )
    try:
        with stop_on_sigint(trainer):
            trainer.fit()
    finally:  # an error mid-epoch skips on_train_end: the governor's cores come back here
        configure_threads(config.train.threads)
    finished = bool(trainer.state.stop_reason) or trainer.state.epoch >= config.train.epochs
    if trainer.stop_requested and not finished:
        save_checkpoint(run_dir / LAST_CHECKPOINT, trainer.state_dict())
        raise TrainingInterrupted(run_dir)
    restore = config.train.early_stopping.restore_best and trainer.best_weights is not None
    if trainer.stop_requested and restore:  # fit() skips the restore when asked to stop
        trainer.model.load_state_dict(trainer.best_weights)
    if trainer.state.history:
        save_learning_curves(
            trainer.state.history,
            run_dir / "curves.png",
            best_epoch=trainer.state.best_epoch,
            label_smoothing=config.train.label_smoothing,
        )
    return TrainResult(
        run_dir=run_dir,
        config=config,
        history=trainer.state.history,
        best_epoch=trainer.state.best_epoch,
        stop_reason=trainer.state.stop_reason,
        seconds=time.perf_counter() - started,
        data=data,
        model=trainer.model,
        info=writer.info,
    )


def _open_for_resume(resume: str | Path) -> tuple[Path, RunConfig, dict[str, Any] | None]:
    """The run folder, its config and last checkpoint (None: killed before the first one)."""
    run_dir = runs.resolve_run_dir(resume)
    config = runs.read_config(run_dir)
    runs.remove_temp_files(run_dir)
    if not (run_dir / LAST_CHECKPOINT).exists():
        log.warning(
            "%s has no %s yet (stopped before its first checkpoint); training it from the start.",
            run_dir,
            LAST_CHECKPOINT,
        )
        return run_dir, config, None
    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    loop = checkpoint.get("loop")
    done = isinstance(loop, dict) and (
        loop.get("stop_reason") or int(loop.get("epoch", 0)) >= config.train.epochs
    )
    if done:
        raise CheckpointError(
            f"Run {run_dir} already finished ({loop.get('stop_reason') or 'all epochs done'}); "
            "there is nothing to resume. Its results are in that folder (`cnnlab evaluate "
            f"{run_dir}` recomputes the test metrics). To train longer, start a new run: "
            f"cnnlab train --config {run_dir / runs.CONFIG_FILE} --epochs N"
        )
    return run_dir, config, checkpoint


def _prepare(config: RunConfig, resuming: Path | None) -> PreparedData:
    """prepare_data, saying which run needs the data when a resumed run's data is gone."""
    try:
        return prepare_data(config.data, config.seed)
    except CnnlabError as exc:
        if resuming is None:
            raise
        raise DataError(
            f"Cannot resume {resuming}: its data is not available any more. {exc} Put the data "
            f"back where {resuming / runs.CONFIG_FILE} says (data.dataset / data.path / "
            "data.data_dir), then resume again."
        ) from exc


def _restore(trainer: Trainer, checkpoint: dict[str, Any], run_dir: Path) -> None:
    """Load the checkpoint into the trainer; a mismatch is a CheckpointError, not a traceback."""
    try:
        trainer.load_state_dict(checkpoint)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{run_dir / LAST_CHECKPOINT} does not fit the run's model and data "
            f"({type(exc).__name__}: {str(exc)[:300]}). Was the data or config.yaml changed? "
            "Restore them, or start a new run."
        ) from exc


def _write_data_previews(run_dir: Path, data: PreparedData, seed: int) -> None:
    images, labels = data.train.images, data.train.labels
    save_sample_grid(images, labels, data.classes, run_dir / "samples.png")
    if data.augment.enabled:
        generator = torch.Generator().manual_seed(seed)
        save_augmentation_preview(images[:8], data.augment, generator, run_dir / "augmentation.png")
