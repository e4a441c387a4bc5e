"""Fast classification metrics from a confusion matrix, for per-epoch validation."""

from __future__ import annotations

import torch


def confusion_matrix(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(K, K) int64 counts; rows are true classes, columns predicted (scikit-learn's layout)."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy (mean recall over classes present)."""
    if labels.numel() == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "balanced_accuracy": 0.0}
    cm = confusion_matrix(logits.argmax(1), labels, num_classes).double()
    true_pos = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    present = support > 0
    return {
        "accuracy": float(true_pos.sum() / cm.sum()),
        "macro_f1": float(f1.mean()),  # scikit-learn's macro average over all labels
        "balanced_accuracy": float(recall[present].mean()),
    }
