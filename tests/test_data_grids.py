"""Sample-image grids and augmentation previews written as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.transforms import Augment
from cnnlab.reporting.images import save_augmentation_preview, save_sample_grid


def images_and_labels(n: int = 12, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, 8, 8), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 3


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_grid_writes_one_row_per_class(tmp_path: Path, channels: int) -> None:
    images, labels = images_and_labels(c=channels)
    open_before = plt.get_fignums()
    path = save_sample_grid(
        images, labels, ["a", "b", "c", "never"], tmp_path / "s.png", per_class=4
    )
    assert path == tmp_path / "s.png"
    width, height = png_size(path)
    assert width > height  # 3 present classes in rows, 4 images per row
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temp file left
    assert plt.get_fignums() == open_before  # nothing left open in pyplot


def test_sample_grid_grows_with_classes_shown(tmp_path: Path) -> None:
    images, labels = images_and_labels()
    one = save_sample_grid(images, labels, ["a", "b", "c"], tmp_path / "1.png", max_classes=1)
    three = save_sample_grid(images, labels, ["a", "b", "c"], tmp_path / "3.png", max_classes=3)
    assert png_size(three)[1] > 2 * png_size(one)[1]


def test_sample_grid_replaces_an_existing_file(tmp_path: Path) -> None:
    images, labels = images_and_labels()
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    save_sample_grid(images, labels, ["a", "b", "c"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_grid_rejects_bad_input(tmp_path: Path) -> None:
    images, labels = images_and_labels()
    with pytest.raises(ValueError, match="one label per image"):
        save_sample_grid(images, labels[:-1], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        save_sample_grid(images.float(), labels, ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_augmentation_preview_shows_originals_above_augmented(tmp_path: Path) -> None:
    images, _ = images_and_labels(n=10)
    open_before = plt.get_fignums()
    path = save_augmentation_preview(
        images, Augment(shift=0.25, flip=True), torch.Generator().manual_seed(0), tmp_path / "a.png"
    )
    width, height = png_size(path)
    assert width > 2.5 * height  # 8 columns, 2 rows
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # the images were drawn, not a blank canvas
    assert plt.get_fignums() == open_before


def test_sample_grid_tiles_hold_the_images_pixel_for_pixel(tmp_path: Path) -> None:
    images, labels = images_and_labels(n=6)
    path = save_sample_grid(images, labels, ["a", "b", "c"], tmp_path / "g.png", per_class=2)
    with Image.open(path) as image:
        png = np.asarray(image.convert("RGB"))
    scale = 12  # 8x8 images enlarged by whole pixels to 96x96 tiles
    top, left = 18, 6  # title band, then the first tile after a 6 px gap
    for row, index in ((0, 0), (1, 1), (2, 2)):  # class c's first image is image c
        y0 = top + row * (18 + 96 + 6)
        centres = png[y0 + scale // 2 : y0 + 96 : scale, left + scale // 2 : left + 96 : scale]
        expected = images[index].permute(1, 2, 0).numpy()
        assert np.abs(centres.astype(int) - expected).max() <= 1
