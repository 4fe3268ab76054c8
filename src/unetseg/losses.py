"""Losses as small functions on logits ``(N, C, H, W)`` and class-index targets ``(N, H, W)``.

Example:
    >>> import torch
    >>> from unetseg.losses import make_loss
    >>> loss = make_loss("ce+dice", n_classes=3)
    >>> loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)).item() > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import UnetsegError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse categorical cross-entropy on logits (the lab's loss), optionally class-weighted."""
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        # channels_last logits are (N, H, W, C) in memory: scored as N*H*W rows of C classes, the softmax
        # runs along contiguous memory and neither pass converts the layout (same value, same gradient).
        flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        return F.cross_entropy(flat.float(), target.reshape(-1), weight=weight)
    return F.cross_entropy(logits.float(), target, weight=weight)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean soft Dice over the classes present in ``target`` (absent classes would only add noise)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum((0, 2, 3)) > 0
    return 1 - dice[present].mean()


def class_weights(
    masks: torch.Tensor, n_classes: int, mode: str = "sqrt_inverse", max_ratio: float = 10.0
) -> torch.Tensor:
    """Per-class loss weights ``(C,)`` from label masks ``(N, H, W)``.

    ``sqrt_inverse``: ``(median share / share) ** 0.5`` over present classes, clipped to
    ``[1/max_ratio, max_ratio]`` and normalised to mean 1 over them; classes never seen get weight 0.
    """
    counts = torch.bincount(masks.reshape(-1).long(), minlength=n_classes)[:n_classes].double()
    present = counts > 0
    weights = torch.zeros(n_classes, dtype=torch.float64)
    if mode == "none" or not present.any():
        return torch.ones(n_classes)
    if mode != "sqrt_inverse":
        raise UnetsegError(f"class weighting {mode!r} is unknown; use none or sqrt_inverse")
    share = counts[present] / counts.sum()
    w = (share.median() / share).sqrt().clamp(1 / max_ratio, max_ratio)
    weights[present] = w / w.mean()
    return weights.float()


def prior_correction_bias(weights: torch.Tensor, strength: float) -> torch.Tensor:
    """Logit bias ``(C,)`` that takes back ``strength`` (0-1) of a class weighting's shift at prediction.

    Cross-entropy weighted by ``w`` learns log-odds shifted by ``log(w_c)``, so the model predicts rare
    classes too often; adding ``-strength * log(w_c)`` to the logits trades some of their recall for far
    fewer false positives (RESULTS.md). Classes with weight 0 (never seen in training) get 0.
    """
    return torch.where(weights > 0, -strength * weights.clamp(min=1e-12).log(), torch.zeros_like(weights))


def make_loss(name: str, n_classes: int, weight: torch.Tensor | None = None) -> LossFn:
    """``ce`` (the lab) or ``ce+dice``; ``weight`` applies to the cross-entropy term."""
    if name == "ce":
        return lambda logits, target: cross_entropy(logits, target, weight)
    if name == "ce+dice":
        return lambda logits, target: cross_entropy(logits, target, weight) + dice_loss(logits, target)
    raise UnetsegError(f"loss {name!r} is unknown; use ce or ce+dice")
