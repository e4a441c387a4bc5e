"""A Keras-like progress callback: a bar per epoch on a terminal, one line per epoch always."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cnnlab.training.loop import Callback, Trainer


class ProgressLogger(Callback):
    """Writes through `write` (the CLI passes print); draws a tqdm bar when `bar` is true."""

    def __init__(self, total_epochs: int, write: Callable[[str], None], bar: bool = False) -> None:
        self.total = total_epochs
        self.write = write
        self.bar_enabled = bar
        self.bar: Any = None

    def on_train_begin(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        val = len(trainer.val_set) if trainer.val_set is not None else 0
        self.write(
            f"Training on {len(trainer.train_set):,} images, validating on {val:,}: "
            f"{trainer.steps_per_epoch} steps per epoch on {trainer.device} "
            f"({trainer.model_num_classes} classes)."
        )

    def on_epoch_begin(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.bar_enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.steps_per_epoch,
                initial=trainer.state.step_in_epoch,
                desc=f"Epoch {logs['epoch']}/{self.total}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
            )

    def on_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if logs["batch"] % 10 == 0 or logs["batch"] == logs["batches"]:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['accuracy']:.4f}")

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._close_bar()
        parts = [
            f"Epoch {int(logs['epoch'])}/{self.total}",
            f"loss {logs['train_loss']:.4f}",
            f"acc {logs['train_accuracy']:.4f}",
        ]
        if "val_loss" in logs:
            parts += [f"val_loss {logs['val_loss']:.4f}", f"val_acc {logs['val_accuracy']:.4f}"]
        parts += [f"lr {logs['lr']:.3g}", f"{logs['seconds']:.1f}s"]
        if trainer.state.best_epoch == int(logs["epoch"]):
            parts.append("best")
        self.write(" - ".join(parts))

    def on_train_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._close_bar()
        if logs.get("stop_reason"):
            self.write(f"Stopped: {logs['stop_reason']}.")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
