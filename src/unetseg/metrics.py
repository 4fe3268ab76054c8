"""Segmentation metrics from one confusion matrix.

Accumulate ``confusion_matrix`` over a whole set, then derive the scores, so every pixel counts once
(averaging per-batch IoUs would weight small batches and rare classes wrongly).

Example:
    >>> import torch
    >>> from unetseg.metrics import confusion_matrix, pixel_accuracy, iou_per_class, mean_iou
    >>> cm = confusion_matrix(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 1]]), 3)
    >>> cm.tolist()   # rows: true class, columns: predicted class
    [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    >>> pixel_accuracy(cm), round(mean_iou(cm), 4)
    (0.75, 0.5833)
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = true class, columns = predicted; ``pred``/``target`` any equal shape."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    return torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = cm.sum().item()
    return cm.diag().sum().item() / total if total else float("nan")


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """``(C,)`` float64 IoU per class; NaN for classes absent from both ground truth and prediction."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes present in the ground truth (a class only predicted counts in others' IoU)."""
    present = cm.sum(1) > 0
    if not present.any():
        return float("nan")
    return iou_per_class(cm)[present].mean().item()

