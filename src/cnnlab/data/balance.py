"""Help for skewed classes: 'balanced' loss weights and a class-balanced sampling order."""

from __future__ import annotations

import numpy as np
import torch

from cnnlab.errors import DataError


def _counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes - 1}], got {int(labels.min())}..{int(labels.max())}."
        )
    return torch.bincount(labels, minlength=num_classes)


def class_weights(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-class loss weights n / (k * count_c), scikit-learn's 'balanced' rule; float32 (k,).

    k counts only the classes present, so the weights average to 1 over the samples, as in
    sklearn.utils.class_weight.compute_class_weight('balanced', ...). A class with no samples
    gets weight 0 (it never appears as a target, so its weight is never used).
    """
    counts = _counts(labels, num_classes).double()
    present = counts > 0
    if not bool(present.any()):
        raise DataError("Cannot compute class weights without any labels.")
    weights = torch.zeros(num_classes, dtype=torch.float64)
    n, k = counts.sum(), present.sum()
    weights[present] = n / (k * counts[present])
    return weights.float()


def balanced_sampler_indices(
    labels: torch.Tensor | np.ndarray, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num_samples` indices drawn with replacement, each sample with probability ∝ 1/count(class).

    Every present class is drawn equally often on average, and uniformly within itself. Drawn as
    class, then member, so it costs O(num_samples) and has no 2**24 limit (torch.multinomial's).
    Returns an int64 tensor (num_samples,).
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() == 0:
        raise DataError("Cannot sample from an empty label set.")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    order = torch.argsort(labels, stable=True)  # indices grouped by class
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pick = torch.randint(len(classes), (num_samples,), generator=generator)
    offset = torch.rand(num_samples, generator=generator, dtype=torch.float64) * counts[pick]
    offset = offset.long().clamp_max(counts[pick] - 1)
    return order[starts[pick] + offset]
