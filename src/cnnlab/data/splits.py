"""Carving a seeded, stratified validation split off a training set."""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import torch

from cnnlab.data.types import ImageSet
from cnnlab.errors import ConfigError

logger = logging.getLogger(__name__)


def split_validation(
    train: ImageSet,
    *,
    fraction: float | None = None,
    size: int | None = None,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet, np.ndarray, np.ndarray]:
    """Split `train` into (train, val, train_indices, val_indices), stratified by label.

    Give `fraction` (--val-split, in (0, 1); the validation count is ceil(fraction * N) as
    in scikit-learn) or `size` (--val-size, 1..N-1), not both. With neither (or fraction 0)
    the whole set stays for training and `val` has 0 rows. Indices are sorted positions in
    the original `train`; the same seed gives the same split.
    """
    n = len(train)
    n_val = validation_count(n, fraction=fraction, size=size)
    if n_val == 0:
        empty = torch.empty(0, dtype=torch.long)
        return train, train.subset(empty), np.arange(n, dtype=np.int64), np.empty(0, np.int64)

    from sklearn.model_selection import train_test_split  # deferred: sklearn is slow to import

    labels = train.labels.cpu().numpy()
    stratify = labels if _can_stratify(labels, n_val) else None
    train_idx, val_idx = train_test_split(
        np.arange(n, dtype=np.int64), test_size=n_val, random_state=seed, stratify=stratify
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return (
        train.subset(torch.from_numpy(train_idx)),
        train.subset(torch.from_numpy(val_idx)),
        train_idx,
        val_idx,
    )


def validation_count(n: int, *, fraction: float | None = None, size: int | None = None) -> int:
    """Number of validation images for a set of `n`; ConfigError names the offending flag."""
    if fraction is not None and fraction != 0 and size is not None:
        raise ConfigError(
            f"--val-split and --val-size are mutually exclusive (got --val-split {fraction} and "
            f"--val-size {size}); pass only one."
        )
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size < n:
            raise ConfigError(
                f"--val-size must be an integer from 1 to {n - 1} (the training set has {n} "
                f"images), got {size!r}."
            )
        return int(size)
    if fraction is None or (not isinstance(fraction, bool) and fraction == 0):
        return 0
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not 0 < float(fraction) < 1
    ):
        raise ConfigError(f"--val-split must be a fraction between 0 and 1, got {fraction!r}.")
    n_val = math.ceil(float(fraction) * n)
    if n_val >= n:
        raise ConfigError(
            f"--val-split {fraction} would leave no training images out of {n}; use a smaller "
            "fraction."
        )
    return n_val


def _can_stratify(labels: np.ndarray, n_val: int) -> bool:
    """Whether every class can appear on both sides; logs why not when it cannot."""
    counts = np.unique(labels, return_counts=True)[1]
    n_classes, n_train = len(counts), len(labels) - n_val
    if counts.min() < 2:
        reason = f"{int((counts < 2).sum())} class(es) have a single image"
    elif n_val < n_classes or n_train < n_classes:
        reason = f"{n_val} validation / {n_train} training images cannot cover {n_classes} classes"
    else:
        return True
    logger.warning("Validation split is not stratified: %s; splitting at random instead.", reason)
    return False
