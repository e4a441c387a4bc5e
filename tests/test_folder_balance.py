"""Class weights and class-balanced sampling for skewed folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from cnnlab.data.balance import balanced_sampler_indices, class_weights
from cnnlab.errors import DataError


def test_class_weights_match_sklearn_balanced() -> None:
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 5 + [3] * 35)
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels.numpy())
    weights = class_weights(labels, 4)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    assert float((weights[labels]).mean()) == pytest.approx(1.0)  # averages to 1 over samples


def test_class_weights_absent_class_and_bad_labels() -> None:
    weights = class_weights(np.array([0, 0, 2]), 3)
    present = compute_class_weight("balanced", classes=np.array([0, 2]), y=np.array([0, 0, 2]))
    assert weights.tolist() == pytest.approx([present[0], 0.0, present[1]])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        class_weights(torch.tensor([0, 2]), 2)


def test_balanced_sampler_draws_classes_equally_and_reproducibly() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)[torch.randperm(1000)]
    draw = balanced_sampler_indices(labels, 30_000, torch.Generator().manual_seed(0))
    assert draw.dtype == torch.int64 and draw.shape == (30_000,)
    assert int(draw.min()) >= 0 and int(draw.max()) < 1000
    per_class = torch.bincount(labels[draw], minlength=3).double() / 30_000
    assert torch.allclose(per_class, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    minority = torch.nonzero(labels == 2).flatten()
    picked = torch.bincount(draw[labels[draw] == 2], minlength=1000)[minority]
    assert bool((picked > 0).all())  # every member of the small class is used
    again = balanced_sampler_indices(labels, 30_000, torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
