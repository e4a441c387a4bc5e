"""Seeded, stratified validation splits and their argument checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import sklearn.model_selection  # noqa: F401  imported here so its import is not charged to a test
import torch

from cnnlab.data.splits import split_validation
from cnnlab.data.types import ImageSet
from cnnlab.errors import ConfigError


def labelled_set(counts: list[int]) -> ImageSet:
    """Images whose single pixel holds the image's index, with `counts[c]` images of class c."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
    return ImageSet(images, labels)


def test_fraction_split_is_stratified_per_class() -> None:
    data = labelled_set([50, 30, 20])
    train, val, train_idx, val_idx = split_validation(data, fraction=0.2, seed=0)
    assert np.bincount(val.labels.numpy()).tolist() == [10, 6, 4]
    assert np.bincount(train.labels.numpy()).tolist() == [40, 24, 16]
    # indices are sorted, disjoint, cover everything, and point at the right rows
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(100))
    assert np.all(np.diff(val_idx) > 0) and np.all(np.diff(train_idx) > 0)
    assert val.images.view(-1).tolist() == val_idx.tolist()
    assert bool((train.labels == data.labels[torch.from_numpy(train_idx)]).all())


def test_size_split_and_determinism() -> None:
    data = labelled_set([40, 40])
    first = split_validation(data, size=10, seed=5)
    again = split_validation(data, size=10, seed=5)
    other = split_validation(data, size=10, seed=6)
    assert len(first[1]) == 10 and len(first[0]) == 70
    assert np.bincount(first[1].labels.numpy()).tolist() == [5, 5]
    assert np.array_equal(first[3], again[3])
    assert not np.array_equal(first[3], other[3])


def test_fraction_rounds_up_like_scikit_learn() -> None:
    _, val, _, _ = split_validation(labelled_set([7, 6]), fraction=0.1)
    assert len(val) == 2  # ceil(0.1 * 13)


@pytest.mark.parametrize("fraction", [None, 0, 0.0])
def test_no_split_returns_everything_and_an_empty_val(fraction) -> None:
    data = labelled_set([5, 5])
    train, val, train_idx, val_idx = split_validation(data, fraction=fraction)
    assert train is data
    assert len(val) == 0 and tuple(val.images.shape) == (0, 1, 1, 1)
    assert val.labels.dtype == torch.int64
    assert train_idx.tolist() == list(range(10)) and val_idx.size == 0


def test_single_image_class_falls_back_to_random_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = labelled_set([20, 20, 1])
    with caplog.at_level(logging.WARNING, logger="cnnlab.data.splits"):
        train, val, _, _ = split_validation(data, fraction=0.25, seed=0)
    assert len(val) == 11 and len(train) == 30
    assert "not stratified" in caplog.text and "single image" in caplog.text


def test_too_small_validation_for_all_classes_is_not_stratified(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnlab.data.splits"):
        _, val, _, _ = split_validation(labelled_set([10, 10, 10]), size=2)
    assert len(val) == 2 and "cannot cover 3 classes" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"fraction": 0.2, "size": 5}, "--val-split and --val-size"),
        ({"fraction": 1.0}, "--val-split"),
        ({"fraction": -0.1}, "--val-split"),
        ({"fraction": float("nan")}, "--val-split"),
        ({"fraction": "0.2"}, "--val-split"),
        ({"fraction": 0.99}, "--val-split"),  # ceil(0.99 * 10) leaves no training image
        ({"size": 0}, "--val-size"),
        ({"size": 10}, "--val-size"),
        ({"size": 2.5}, "--val-size"),
        ({"size": True}, "--val-size"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        split_validation(labelled_set([5, 5]), **kwargs)
