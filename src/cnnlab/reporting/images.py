"""Image grids of a dataset: sample images per class and an augmentation preview, saved as PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlab import fileio
from cnnlab.data.transforms import Augment, augment_batch

DPI = 100
MIN_TILE_PX = 96  # small images (8x8 digits, 28x28 MNIST) are enlarged by whole pixels to this
TITLE_PX = 18  # band above each row of tiles for the titles
GAP_PX = 6  # white space between tiles
HEADER_PX = 26  # band above the whole grid for a heading


def save_sample_grid(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    classes: Sequence[str],
    path: Path,
    per_class: int = 6,
    max_classes: int = 20,
) -> Path:
    """A PNG with one row per class (the first `max_classes` that occur) of `per_class` images.

    images: uint8 (N, C, H, W) with C of 1 or 3; each tile is titled with its class name.
    The first images of each class are shown, so the grid is the same on every run.
    """
    _check_images(images)
    if per_class < 1 or max_classes < 1:
        raise ValueError("per_class and max_classes must be at least 1")
    label_array = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if label_array.shape != (images.shape[0],):
        raise ValueError(f"need one label per image, got {label_array.shape} for {images.shape[0]}")
    present = [c for c in range(len(classes)) if (label_array == c).any()][:max_classes]
    if not present:
        raise ValueError("no image has a label within the class list")
    picks = [np.flatnonzero(label_array == c)[:per_class] for c in present]
    pixels = _to_hwc(images)
    rows = [[pixels[i] for i in row] for row in picks]
    titles = [[str(classes[c])] * len(row) for c, row in zip(present, picks, strict=True)]
    return _save(_grid_figure(rows, titles, heading=None), path)


def save_augmentation_preview(
    images: torch.Tensor,
    aug: Augment,
    generator: torch.Generator,
    path: Path,
    n: int = 8,
) -> Path:
    """A PNG with `n` original images on top and the same images augmented below."""
    _check_images(images)
    originals = images[:n]
    if originals.shape[0] == 0:
        raise ValueError("no images to preview")
    augmented = augment_batch(originals.to(generator.device), aug, generator).cpu()
    rows = [list(_to_hwc(originals)), list(_to_hwc(augmented))]
    titles = [["original"] * len(rows[0]), ["augmented"] * len(rows[1])]
    heading = f"augmentation: shift={aug.shift:g}, flip={aug.flip}, erase={aug.erase:g}"
    return _save(_grid_figure(rows, titles, heading=heading), path)


def _grid_figure(
    rows: list[list[np.ndarray]], titles: list[list[str]], heading: str | None
) -> Figure:
    """Paste the tiles into one mosaic drawn at one screen pixel per mosaic pixel.

    One image and a few texts render far faster than an axes per tile.
    """
    h, w, c = rows[0][0].shape
    scale = max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    tile_h, tile_w = h * scale, w * scale
    cols = max(len(row) for row in rows)
    top = HEADER_PX if heading else 0
    cell_h, cell_w = TITLE_PX + tile_h + GAP_PX, tile_w + GAP_PX
    height, width = top + len(rows) * cell_h, GAP_PX + cols * cell_w
    mosaic = np.full((height, width, c), 255, dtype=np.uint8)  # (H, W, C) white background
    for r, row in enumerate(rows):
        y = top + r * cell_h + TITLE_PX
        for k, tile in enumerate(row):
            x = GAP_PX + k * cell_w
            mosaic[y : y + tile_h, x : x + tile_w] = tile.repeat(scale, 0).repeat(scale, 1)

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    if c == 1:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    for r, row_titles in enumerate(titles):
        y = top + r * cell_h + TITLE_PX / 2
        for k, title in enumerate(row_titles):
            x = GAP_PX + k * cell_w + tile_w / 2
            ax.text(x, y, title, ha="center", va="center", fontsize=8, clip_on=True)
    if heading:
        ax.text(width / 2, HEADER_PX / 2, heading, ha="center", va="center", fontsize=10)
    return fig


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with 1 or 3 channels, got {images.dtype} "
            f"{tuple(images.shape)}"
        )


def _to_hwc(images: torch.Tensor) -> np.ndarray:
    return images.detach().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically (temp file, fsync, os.replace) and release the figure.

    A bare Figure is never registered with pyplot, so there is no global figure to close;
    clearing it drops the image data at once.
    """
    path = Path(path)
    try:
        fileio.write_with(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))
    finally:
        fig.clear()
    return path
