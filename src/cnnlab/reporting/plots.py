"""Matplotlib figures of a run: learning curves, confusion matrices, calibration, comparisons and
explanations, saved as PNG atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnlab import fileio


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Save and close `fig` as PNG; the file is replaced atomically."""
    try:
        fileio.write_with(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def learning_curves_figure(
    history: Sequence[dict[str, float]], best_epoch: int = 0, label_smoothing: float = 0.0
) -> Figure:
    """Loss, accuracy and learning rate per epoch, train vs validation, best epoch marked.

    With label smoothing the training loss is the smoothed loss the optimiser saw, which sits
    above the plain validation cross-entropy; the legend says so.
    """
    epochs = [row["epoch"] for row in history]
    smoothed = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
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
                    label=smoothed if (prefix, key) == ("train", "loss") else prefix,
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        ax.legend()
    axes[2].plot(epochs, [row.get("lr", np.nan) for row in history], "-o", markersize=3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_title("Learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].grid(alpha=0.3)
    return fig


def save_learning_curves(
    history: Sequence[dict[str, float]],
    path: Path,
    best_epoch: int = 0,
    label_smoothing: float = 0.0,
) -> None:
    save_figure(learning_curves_figure(history, best_epoch, label_smoothing), path)


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


def reliability_figure(
    edges: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray, counts: np.ndarray, ece: float
) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(5.2, 5.4),
        sharex=True,
        gridspec_kw={"height_ratios": (3, 1)},
        constrained_layout=True,
    )
    width = np.diff(edges)
    left = edges[:-1]
    used = counts > 0
    top.bar(
        left[used],
        accuracy[used],
        width=width[used],
        align="edge",
        color="#4c78a8",
        edgecolor="white",
        label="accuracy",
    )
    gap_bottom = np.minimum(accuracy, confidence)[used]
    gap_height = np.abs(confidence - accuracy)[used]
    top.bar(
        left[used],
        gap_height,
        bottom=gap_bottom,
        width=width[used],
        align="edge",
        color="#e45756",
        alpha=0.35,
        edgecolor="#e45756",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(left, counts, width=width, align="edge", color="#9d9d9d", edgecolor="white")
    bottom.set_yscale("symlog")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    return fig


def compare_curves_figure(histories: dict[str, Sequence[dict[str, float]]]) -> Figure:
    """Learning curves of several runs overlaid: loss and accuracy, train and validation."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    panels = (
        ("val_loss", "Validation loss"),
        ("val_accuracy", "Validation accuracy"),
        ("train_loss", "Training loss"),
        ("train_accuracy", "Training accuracy"),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, (name, history) in enumerate(histories.items()):
            rows = [row for row in history if key in row]
            if rows:
                ax.plot(
                    [row["epoch"] for row in rows],
                    [row[key] for row in rows],
                    "-o",
                    markersize=3,
                    color=colors[i % len(colors)],
                    label=name,
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)))
    return fig


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB (H, W, 3): `image` (H, W, C uint8) under the 'jet' colours of `heat` (H, W in [0, 1])."""
    base = np.asarray(image, dtype=np.float32)
    if base.ndim == 2:
        base = base[..., None]
    if base.shape[2] == 1:
        base = np.repeat(base, 3, axis=2)
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    mixed = (1.0 - alpha) * base + alpha * colours
    return np.clip(mixed, 0, 255).astype(np.uint8)


def _show(ax: plt.Axes, image: np.ndarray, title: str) -> None:
    pixels = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def explanation_figure(
    image: np.ndarray,
    cam: np.ndarray,
    saliency: np.ndarray,
    top: Sequence[tuple[str, float]],
    target: str,
    layer: str,
    method: str = "Grad-CAM",
) -> Figure:
    """Input | class activation map overlay | gradient saliency | top-k probabilities."""
    fig, axes = plt.subplots(
        1, 4, figsize=(14, 3.8), gridspec_kw={"width_ratios": (1, 1, 1, 1.2)}, layout="constrained"
    )
    _show(axes[0], image, "input (as the model sees it)")
    _show(axes[1], heatmap_overlay(image, cam), f"{method} for '{target}'\n(layer {layer})")
    axes[2].imshow(saliency, cmap="hot", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title(f"gradient saliency for '{target}'", fontsize=10)
    axes[2].set_axis_off()
    names = [name for name, _ in top][::-1]
    values = [p for _, p in top][::-1]
    bars = axes[3].barh(range(len(names)), values, color="#4c78a8")
    axes[3].set_yticks(range(len(names)), labels=names)
    axes[3].set_xlim(0, 1)
    axes[3].set_title("top-k probabilities", fontsize=10)
    for bar, value in zip(bars, values, strict=True):
        axes[3].text(
            min(value + 0.02, 0.8),
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1%}",
            va="center",
            fontsize=9,
        )
    return fig


def channel_grid_figure(maps: np.ndarray, title: str, cmap: str = "viridis") -> Figure:
    """One small panel per channel of `maps` (C, H, W), or per RGB filter when (C, H, W, 3)."""
    count = maps.shape[0]
    cols = min(count, 8 if count <= 32 else 16)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False, layout="constrained"
    )
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < count:
            ax.imshow(maps[i], cmap=None if maps.ndim == 4 else cmap, interpolation="nearest")
            ax.set_title(str(i), fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig
