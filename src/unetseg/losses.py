"""Losses as small functions on logits ``(N, C, H, W)`` and class-index targets ``(N, H, W)``.

Example:
    >>> import torch
    >>> from unetseg.losses import make_loss
    >>> loss = make_loss("ce+dice", n_classes=3)
    >>> value, correct = loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    >>> value.item() > 0, correct.item()
    (True, 16)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import UnetsegError

# A loss maps (logits, target) to the loss, or to (loss, correct_pixels) when it counts argmax hits itself.
LossFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def _class_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, H, W)`` logits and ``(N, H, W)`` targets as tensors whose dim 1 is the class: ``(N*H*W, C)``
    rows and ``(N*H*W,)`` targets for channels_last logits (a view: the reductions run along contiguous
    memory), both unchanged otherwise."""
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), target.reshape(-1)
    return logits, target


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse categorical cross-entropy on logits (the lab's loss), optionally class-weighted."""
    rows, target = _class_rows(logits, target)
    return F.cross_entropy(rows.float(), target, weight=weight)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean soft Dice over the classes present in ``target`` (absent classes would only add noise)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum((0, 2, 3)) > 0
    return 1 - dice[present].mean()


class _FusedSoftmaxLoss(torch.autograd.Function):
    """Weighted cross-entropy (+ soft Dice) and the count of argmax hits from one fp32 softmax.

    The same values and gradients as ``cross_entropy`` (+ ``dice_loss``) through autograd, in far fewer
    passes over the ``(pixels, classes)`` array: one softmax is shared by both terms and the accuracy,
    and the backward writes ``p * coef`` plus a correction at each pixel's target instead of building
    the NLL's zero-filled gradient, the log-softmax backward and Dice's one-hot masks. Measured on
    bf16 channels_last logits (2 threads): CE + Dice + accuracy on the default recipe's batch (8 x 23 x
    128 x 160) 12 ms instead of 35; CE + accuracy on the lab's (32 x 23 x 96 x 128) 20 ms instead of 26.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, with_dice: bool, eps: float, hard_pixels: float,  # type: ignore[override]
                smoothing: float):
        # logits: (P, C) or (N, C, H, W); target: the same without dim 1. Work in fp32 on a private copy.
        p = logits.to(torch.float32, copy=True)
        t = target.unsqueeze(1)
        p.sub_(p.amax(1, keepdim=True))
        shifted_t = p.gather(1, t)  # target logit minus the max: 0 exactly where argmax hits the target
        correct = (shifted_t == 0).sum()
        if smoothing:
            sum_shifted = p.sum(1, keepdim=True)  # sum_j (z_ij - max_i), for the smoothed target's log-likelihood
        p.exp_()
        z = p.sum(1, keepdim=True)
        log_z = z.log()
        log_pt = shifted_t - log_z
        w_t = torch.ones_like(log_pt) if weight is None else weight.to(p.dtype)[t]
        if hard_pixels < 1:
            # Bootstrapped CE: only the hardest pixels by (weighted) CE count; the choice is not differentiated.
            per_pixel = -log_pt * w_t
            n_keep = max(1, int(hard_pixels * per_pixel.numel()))
            threshold = per_pixel.reshape(-1).topk(n_keep, sorted=False).values.min()
            w_t = w_t * (per_pixel >= threshold)
        coef = w_t / w_t.sum()
        loss = -(coef * log_pt).sum()
        if smoothing:
            # each pixel's target: 1 - smoothing on its class, smoothing / C on every class, under its weight
            mean_log_p = sum_shifted / p.shape[1] - log_z
            loss = (1 - smoothing) * loss - smoothing * (coef * mean_log_p).sum()
        p.div_(z)
        a = b = None
        if with_dice:
            c = p.shape[1]
            flat_t = t.reshape(-1)
            p_t = log_pt.exp().reshape(-1)
            inter = torch.zeros(c, dtype=p.dtype, device=p.device).index_add_(0, flat_t, p_t)
            count = torch.bincount(flat_t, minlength=c)[:c].to(p.dtype)
            p_sum = p.sum([d for d in range(p.dim()) if d != 1])
            denom = p_sum + count + eps
            dice = (2 * inter + eps) / denom
            present = (count > 0).to(p.dtype)
            n_present = present.sum()
            loss = loss + 1 - (dice * present).sum() / n_present
            # d(1 - mean dice)/dp[i, j] = a_j + b_j [j == t_i]
            a = present * dice / denom / n_present
            b = -2 * present / denom / n_present
        ctx.save_for_backward(p, t, coef, a, b)
        ctx.smoothing = smoothing
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # type: ignore[override]
        p, t, coef, a, b = ctx.saved_tensors
        smoothing = ctx.smoothing
        c_i = grad_loss * coef  # CE: c_i * (p_ij - [j == t_i]); smoothed: c_i * (p_ij - (1 - s)[j == t_i] - s / C)
        if a is None:
            grad = p * c_i
            target_term = -(1 - smoothing) * c_i
        else:
            # Dice through the softmax: p_ij * (g a_j - g dot_i) + [j == t_i] g b_j p_ij,
            # with dot_i = sum_k p_ik (a_k + b_k [k == t_i]).
            shape = [1] * p.dim()
            shape[1] = -1
            ga, gb = grad_loss * a.view(shape), grad_loss * b
            p_t = p.gather(1, t)
            dot = (p * ga).sum(1, keepdim=True) + gb[t] * p_t
            grad = p * (ga + (c_i - dot))
            target_term = -(1 - smoothing) * c_i + gb[t] * p_t
        if smoothing:
            grad.sub_(c_i * (smoothing / p.shape[1]))
        grad.scatter_add_(1, t, target_term)
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


def softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    dice: bool = False,
    eps: float = 1.0,
    hard_pixels: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy`` (+ ``dice_loss`` when ``dice``) of ``logits (N, C, H, W)`` and the argmax hits.

    ``hard_pixels`` < 1 makes the cross-entropy a bootstrapped one: the mean over only that share of the
    pixels, the hardest by (weighted) cross-entropy (online hard example mining; ties at the threshold
    are all kept). Dice and the hit count still see every pixel. ``label_smoothing`` (0-1) moves that share of each
    pixel's target to a uniform spread over all classes, under the pixel's own class weight: without
    ``weight`` it is ``F.cross_entropy``'s smoothing; with it, not (torch weights each smoothed class by its
    own weight and normalises by the target pixels' weights, which with weights far below 1 on the common
    classes makes the spread outweigh the true class: at 0.1 on CARLA's road pixels, 1.7 against 0.9).

    Returns ``(loss, correct)``: the scalar loss (fp32, differentiable) and the number of pixels whose
    top logit is the target's (an int64 scalar; a pixel whose target ties for the top counts as a hit).
    Any logits dtype or memory format; the arithmetic is fp32.
    """
    rows, target = _class_rows(logits, target)
    return _FusedSoftmaxLoss.apply(rows, target, weight, dice, eps, hard_pixels, label_smoothing)


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018) of ``logits (N, C, H, W)``: a convex surrogate of
    1 − IoU per class, averaged over the classes present in ``target (N, H, W)``.

    Computed over the whole batch (not per image), so it follows the dataset-level mIoU that evaluation
    reports. For each present class the pixels' errors ``|[t == c] − p_c|`` are sorted in decreasing order
    and weighted by the steps of the Jaccard index along that order (the Lovász extension's gradient); the
    sort is the cost: 29 % more time per epoch of the default recipe (BENCHMARKS.md). fp32 throughout.
    """
    n_classes = logits.shape[1]
    # (pixels, classes); a view for channels_last logits, a copy otherwise.
    probs = logits.float().movedim(1, -1).reshape(-1, n_classes).softmax(1)
    target = target.reshape(-1)
    present = torch.bincount(target, minlength=n_classes)[:n_classes].nonzero().squeeze(1)
    if present.numel() == 0:
        return probs.sum() * 0
    # (K, P): one row per present class, pixels along the row.
    fg = (target.unsqueeze(0) == present.unsqueeze(1)).to(probs.dtype)
    errors = (fg - probs.index_select(1, present).t()).abs()
    errors_sorted, order = errors.sort(dim=1, descending=True)
    fg_sorted = fg.gather(1, order)
    gts = fg_sorted.sum(1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(1)
    union = gts + (1 - fg_sorted).cumsum(1)
    jaccard = 1 - intersection / union
    # Steps of the Jaccard index along the sorted order: the weight of each sorted error.
    jaccard = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (errors_sorted * jaccard).sum(1).mean()


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


LOSSES = ("ce", "ce+dice", "ce+lovasz", "ce+dice+lovasz")


def make_loss(
    name: str,
    n_classes: int,
    weight: torch.Tensor | None = None,
    hard_pixels: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossFn:
    """``ce`` (the lab), ``ce+dice``, ``ce+lovasz`` or ``ce+dice+lovasz`` (terms summed with weight 1);
    ``weight``, ``hard_pixels`` and ``label_smoothing`` (``softmax_loss``) apply to the cross-entropy term.

    The function returns ``(loss, correct_pixels)`` (``softmax_loss``), so training gets its pixel
    accuracy from the loss's own softmax.
    """
    if name not in LOSSES:
        raise UnetsegError(f"loss {name!r} is unknown; use one of {', '.join(LOSSES)}")
    if not 0 < hard_pixels <= 1:
        raise UnetsegError(f"hard_pixels {hard_pixels} must be in (0, 1] (a share of the pixels; 1: all)")
    if not 0 <= label_smoothing < 1:
        raise UnetsegError(f"label_smoothing {label_smoothing} must be in [0, 1) (0: off)")
    if weight is not None and weight.numel() != n_classes:
        raise UnetsegError(f"{weight.numel()} class weights for {n_classes} classes")
    with_dice = "dice" in name
    if "lovasz" not in name:
        return lambda logits, target: softmax_loss(
            logits, target, weight, dice=with_dice, hard_pixels=hard_pixels, label_smoothing=label_smoothing)

    def loss_with_lovasz(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct = softmax_loss(
            logits, target, weight, dice=with_dice, hard_pixels=hard_pixels, label_smoothing=label_smoothing)
        return loss + lovasz_softmax(logits, target), correct

    return loss_with_lovasz
