"""From a DataConfig to train/validation/test image sets, the class names and the preprocessing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.config import DataConfig
from cnnlab.data.registry import load_dataset
from cnnlab.data.splits import split_validation
from cnnlab.data.transforms import Augment, channel_stats
from cnnlab.data.types import ImageSet
from cnnlab.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the trainer and the evaluator need from the data side."""

    name: str
    classes: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augment: Augment
    color_mode: str
    resize: str
    split_rows: list[tuple[str, str, object]] = field(default_factory=list)  # (id, split, label)
    split_header: tuple[str, str, str] = ("id", "split", "label")
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test) if self.test is not None else 0,
        }


def prepare_data(config: DataConfig, seed: int, *, download: bool = True) -> PreparedData:
    """Load the dataset named by `config`, carve validation, and compute normalisation statistics."""
    if config.path is not None:
        prepared = _prepare_folder(config, seed)
    else:
        prepared = _prepare_registry(config, seed, download)
    if len(prepared.train) < 1:
        raise DataError("The training split is empty. Lower --val-split or add images.")
    if config.standardize:
        mean, std = channel_stats(prepared.train.images)
        prepared.mean = tuple(mean)
        prepared.std = tuple(max(s, 1e-6) for s in std)
    return prepared


def augment_of(config: DataConfig) -> Augment:
    """The batch augmentation a data config asks for."""
    a = config.augment
    return Augment(shift=a.shift, flip=a.flip, erase=a.erase)


def _limit(images: ImageSet, limit: int | None, seed: int) -> tuple[ImageSet, np.ndarray]:
    """A seeded random subset of `limit` images (all of them when limit is None)."""
    n = len(images)
    if limit is None or limit >= n:
        return images, np.arange(n)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    return images.subset(torch.from_numpy(keep)), keep


def _prepare_registry(config: DataConfig, seed: int, download: bool) -> PreparedData:
    dataset = load_dataset(
        config.dataset, Path(config.data_dir) if config.data_dir else None, download=download
    )
    train, kept = _limit(dataset.train, config.limit, seed)
    if dataset.val is not None:
        val, train_idx, val_idx = dataset.val, np.arange(len(train)), np.array([], dtype=np.int64)
    else:
        fraction = None if config.val_size is not None else config.val_split
        train, val, train_idx, val_idx = split_validation(
            train, fraction=fraction or None, size=config.val_size, seed=seed
        )
    labels = dataset.train.labels.numpy()
    rows = [(f"train:{kept[i]}", "train", int(labels[kept[i]])) for i in train_idx]
    rows += [(f"train:{kept[i]}", "val", int(labels[kept[i]])) for i in val_idx]
    channels = dataset.input_shape[0]
    return PreparedData(
        name=dataset.name,
        classes=dataset.classes,
        train=train,
        val=val,
        test=dataset.test,
        mean=None,
        std=None,
        augment=augment_of(config),
        color_mode="grayscale" if channels == 1 else "rgb",
        resize="stretch",
        split_rows=rows,
        notes=dict(dataset.notes),
    )


def _prepare_folder(config: DataConfig, seed: int) -> PreparedData:
    from cnnlab.data.check import load_warnings
    from cnnlab.data.folder import load_folder

    dataset, info = load_folder(
        Path(config.path),  # type: ignore[arg-type]
        image_size=tuple(config.image_size) if config.image_size else None,  # type: ignore[arg-type]
        color_mode=config.color_mode,
        resize=config.resize,
        val_split=config.val_split or 0.0,
        test_split=config.test_split,
        seed=seed,
        splits_file=Path(config.splits_file) if config.splits_file else None,
    )
    for line in info.summary_lines():
        log.info(line)
    warnings = load_warnings(dataset)
    if warnings:
        log.warning("Dataset check found:\n  - %s", "\n  - ".join(warnings))
    train, _ = _limit(dataset.train, config.limit, seed)
    empty = ImageSet(
        torch.empty((0, *train.shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    )
    rows = [
        (rel, split, dataset.classes[label])
        for split, items in info.splits.items()
        for rel, label in items
    ]
    return PreparedData(
        name=str(config.path),
        classes=dataset.classes,
        train=train,
        val=dataset.val if dataset.val is not None else empty,
        test=dataset.test,
        mean=None,
        std=None,
        augment=augment_of(config),
        color_mode=info.color_mode,
        resize=info.resize,
        split_rows=rows,
        split_header=("path", "split", "label"),
        notes={"folder": info.summary_lines(), "warnings": warnings, **dataset.notes},
    )
