"""The in-memory dataset types every data source returns: uint8 image tensors with integer labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageSet:
    """Images and labels of one split, kept as compact uint8 tensors."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be (N, C, H, W) uint8, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be int64 with one label per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: the training images, the test set as shipped, and the class names.

    `val` is set only when the source itself defines a validation split (a folder with
    train/val/test sub-folders); otherwise validation is carved from `train` by `data.splits`.
    """

    name: str
    classes: tuple[str, ...]
    train: ImageSet
    test: ImageSet | None
    val: ImageSet | None = None
    notes: dict[str, object] = field(default_factory=dict)  # e.g. skipped files, source paths

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self.train.shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)
