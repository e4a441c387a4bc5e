"""Matplotlib figures of a run: learning curves and confusion matrices, saved as PNG atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cnnlab import fileio


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Save and close `fig` as PNG; the file is replaced atomically."""
    try:
        fileio.write_with(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def learning_curves_figure(history: Sequence[dict[str, float]], best_epoch: int = 0) -> Figure:
    """Loss, accuracy and learning rate per epoch, train vs validation, best epoch marked."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    panels = (("loss", "Loss"), ("accuracy", "Accuracy"))
    for ax, (key, title) in zip(axes[:2], panels, strict=True):
        for prefix, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{prefix}_{key}") for row in history]
            if any(v is not None for v in values):
                ax.plot(
                    epochs,
                    [np.nan if v is None else v for v in values],
                    style,
                    markersize=3,
                    label=prefix,
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        ax.legend()
    axes[2].plot(epochs, [row.get("lr", np.nan) for row in history], "-o", markersize=3)
    axes[2].set_title("Learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].grid(alpha=0.3)
    return fig


def save_learning_curves(
    history: Sequence[dict[str, float]], path: Path, best_epoch: int = 0
) -> None:
    save_figure(learning_curves_figure(history, best_epoch), path)


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], normalize: bool) -> Figure:
    """Heatmap of a confusion matrix (rows: true class); row-normalised when `normalize`."""
    counts = np.asarray(matrix, dtype=np.float64)
    values = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
    k = len(classes)
    size = min(max(4.0, 0.55 * k + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), constrained_layout=True)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)")
    if k <= 30:
        threshold = values.max() / 2 if values.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if values[i, j] > threshold else "black",
                )
    return fig


def save_confusion_matrix(
    matrix: np.ndarray, classes: Sequence[str], path: Path, normalize: bool = False
) -> None:
    save_figure(confusion_figure(matrix, classes, normalize), path)
