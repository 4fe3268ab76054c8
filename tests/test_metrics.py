"""Metrics and losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unetseg.errors import UnetsegError
from unetseg.losses import class_weights, cross_entropy, dice_loss, lovasz_softmax, make_loss, softmax_loss
from unetseg.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_matrix_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, target, 4)
    # rows: true; columns: predicted
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert pixel_accuracy(cm) == pytest.approx(5 / 8)
    ious = iou_per_class(cm)
    # IoU = tp / (true + predicted - tp): class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2 likewise
    assert ious[:3].tolist() == pytest.approx([1 / 3, 0.5, 0.5])
    assert math.isnan(ious[3].item())  # absent from truth and prediction
    assert mean_iou(cm) == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)


def test_mean_iou_counts_only_classes_in_ground_truth() -> None:
    target = torch.zeros(10, dtype=torch.long)
    pred = torch.zeros(10, dtype=torch.long)
    pred[0] = 3  # a class predicted but never true: lowers class 0's IoU, is not averaged itself
    cm = confusion_matrix(pred, target, 4)
    assert mean_iou(cm) == pytest.approx(0.9)
    assert iou_per_class(cm)[3].item() == 0.0


def test_confusion_matrix_ignore_index() -> None:
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([1, 255, 0]), 2, ignore_index=255)
    assert cm.sum() == 2 and pixel_accuracy(cm) == 1.0


def test_cross_entropy_is_the_labs_sparse_categorical_loss() -> None:
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # (1, 3, 1, 1)
    target = torch.tensor([[[0]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_perfect_and_wrong() -> None:
    target = torch.tensor([[[0, 1], [1, 1]]])
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, target, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_class_weights_favour_rare_classes_and_zero_absent_ones() -> None:
    masks = torch.zeros(1, 10, 10, dtype=torch.uint8)
    masks[0, 0, :4] = 1  # 4 % of pixels
    w = class_weights(masks, 3)
    assert w[1] > w[0] > 0 and w[2] == 0
    assert w[:2].mean().item() == pytest.approx(1.0)
    assert torch.equal(class_weights(masks, 3, "none"), torch.ones(3))


def test_class_weight_clip_bounds_the_ratio_to_the_median() -> None:
    masks = torch.zeros(1, 100, 100, dtype=torch.uint8)
    masks[0, 0, :10] = 1  # 0.1 % of pixels
    masks[0, 1:11, :] = 2  # 10 %
    wide, narrow = class_weights(masks, 3, max_ratio=100.0), class_weights(masks, 3, max_ratio=2.0)
    assert (wide[1] / wide[0]).item() > 20  # sqrt(89.9 % / 0.1 %) = 30
    assert (narrow[1] / narrow[0]).item() == pytest.approx(4.0, rel=1e-4)  # 2 above the median, 2 below


def test_make_loss_combines_terms() -> None:
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    both, correct = make_loss("ce+dice", 3)(logits, target)
    assert both.item() == pytest.approx((cross_entropy(logits, target) + dice_loss(logits, target)).item())
    assert correct.item() == (logits.argmax(1) == target).sum().item()
    with pytest.raises(UnetsegError, match="unknown"):
        make_loss("focal", 3)
    with pytest.raises(UnetsegError, match="2 class weights for 3 classes"):
        make_loss("ce", 3, torch.ones(2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_lovasz_softmax_at_hard_predictions_is_one_minus_iou(channels_last: bool) -> None:
    # The Lovász extension agrees with the set function on 0/1 errors: 1 - IoU per present class, averaged.
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 7))  # class 4 never in the target: left out of the mean
    pred = torch.where(torch.rand(2, 6, 7) < 0.3, torch.randint(0, 5, (2, 6, 7)), target)
    logits = torch.nn.functional.one_hot(pred, 5).permute(0, 3, 1, 2).float() * 40  # softmax 0/1 to 1e-17
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    one_minus_iou = [1 - ((pred == c) & (target == c)).sum() / ((pred == c) | (target == c)).sum()
                     for c in target.unique()]
    assert lovasz_softmax(logits, target).item() == pytest.approx(torch.stack(one_minus_iou).mean().item(), abs=1e-6)
    assert 0.1 < lovasz_softmax(logits, target) < 1
    assert lovasz_softmax(target.unsqueeze(1).eq(torch.arange(5).view(1, 5, 1, 1)).float() * 40, target) < 1e-6


def test_lovasz_softmax_descends_to_the_target() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 5))
    logits = torch.zeros(2, 3, 5, 5, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.1)
    start = lovasz_softmax(logits, target).item()
    for _ in range(60):
        loss = lovasz_softmax(logits, target)
        adam.zero_grad()
        loss.backward()
        adam.step()
    assert start > 0.5 and loss.item() < 0.05
    assert torch.equal(logits.argmax(1), target)


def test_make_loss_adds_the_lovasz_term() -> None:
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    w = torch.tensor([0.5, 1.0, 2.0])
    total, correct = make_loss("ce+dice+lovasz", 3, w)(logits, target)
    expected = cross_entropy(logits, target, w) + dice_loss(logits, target) + lovasz_softmax(logits, target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert correct.item() == (logits.argmax(1) == target).sum().item()
    ce_lovasz, _ = make_loss("ce+lovasz", 3)(logits, target)
    assert ce_lovasz.item() == pytest.approx((cross_entropy(logits, target) + lovasz_softmax(logits, target)).item())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dice", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_softmax_loss_equals_the_plain_terms(channels_last: bool, dice: bool, weighted: bool) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 5, 6, 7) * 3
    target = torch.randint(0, 4, (2, 6, 7))  # class 4 absent: Dice must skip it
    weight = torch.rand(5) + 0.5 if weighted else None
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    plain, fused = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    expected = cross_entropy(plain, target, weight) + (dice_loss(plain, target) if dice else 0)
    expected.backward()
    loss, correct = softmax_loss(fused, target, weight, dice=dice)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused.grad, plain.grad)
    assert correct.item() == (base.argmax(1) == target).sum().item()


@pytest.mark.parametrize("weighted", [False, True])
def test_hard_pixels_averages_the_cross_entropy_over_the_hardest_share_only(weighted: bool) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 5, 6, 7) * 3
    target = torch.randint(0, 5, (2, 6, 7))
    weight = torch.rand(5) + 0.5 if weighted else None
    plain, fused = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    w_t = torch.ones(target.shape) if weight is None else weight[target]
    per_pixel = F.cross_entropy(plain, target, reduction="none") * w_t
    hardest = per_pixel.detach().reshape(-1).argsort(descending=True)[: int(0.25 * per_pixel.numel())]
    keep = torch.zeros(per_pixel.numel(), dtype=torch.bool)
    keep[hardest] = True
    keep = keep.view_as(per_pixel)
    expected = per_pixel[keep].sum() / w_t[keep].sum() + dice_loss(plain, target)
    expected.backward()
    loss, correct = softmax_loss(fused, target, weight, dice=True, hard_pixels=0.25)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused.grad, plain.grad)
    assert correct.item() == (base.argmax(1) == target).sum().item()  # the accuracy still counts every pixel
    # the easy pixels' CE gradient is gone: only Dice reaches them
    dice_only = base.clone().requires_grad_(True)
    dice_loss(dice_only, target).backward()
    easy = ~keep
    torch.testing.assert_close(fused.grad.permute(0, 2, 3, 1)[easy], dice_only.grad.permute(0, 2, 3, 1)[easy])
    assert softmax_loss(base, target, weight, hard_pixels=1.0)[0].item() == pytest.approx(
        cross_entropy(base, target, weight).item())
    with pytest.raises(UnetsegError, match="hard_pixels 0"):
        make_loss("ce", 5, hard_pixels=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dice", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_spreads_each_pixels_target_under_its_weight(
        weighted: bool, dice: bool, channels_last: bool) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 5, 6, 7) * 3
    target = torch.randint(0, 5, (2, 6, 7))
    weight = torch.rand(5) * 0.2 + 0.05 if weighted else None  # well below 1, as the common classes' are
    plain = base.clone().requires_grad_(True)
    fused = (base.contiguous(memory_format=torch.channels_last) if channels_last else base.clone()).requires_grad_(True)
    log_p = plain.log_softmax(1)
    smoothed_target = F.one_hot(target, 5).permute(0, 3, 1, 2) * 0.9 + 0.1 / 5
    w_t = torch.ones(target.shape) if weight is None else weight[target]
    expected = (w_t * -(smoothed_target * log_p).sum(1)).sum() / w_t.sum()
    if not weighted:  # torch's own smoothing is the same without weights
        torch.testing.assert_close(expected, F.cross_entropy(plain, target, label_smoothing=0.1))
    expected = expected + (dice_loss(plain, target) if dice else 0)
    expected.backward()
    loss, correct = softmax_loss(fused, target, weight, dice=dice, label_smoothing=0.1)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused.grad, plain.grad)
    assert correct.item() == (base.argmax(1) == target).sum().item()
    assert abs(loss.item() - softmax_loss(base, target, weight, dice=dice)[0].item()) > 1e-3


def test_label_smoothing_is_checked() -> None:
    with pytest.raises(UnetsegError, match="label_smoothing 1"):
        make_loss("ce", 5, label_smoothing=1.0)
    smoothed = make_loss("ce+dice", 5, label_smoothing=0.2)
    logits, target = torch.randn(1, 5, 4, 4), torch.randint(0, 5, (1, 4, 4))
    torch.testing.assert_close(
        smoothed(logits, target)[0], F.cross_entropy(logits, target, label_smoothing=0.2) + dice_loss(logits, target))


def test_fused_softmax_loss_on_bf16_logits_returns_a_bf16_gradient() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 8, 8) * 4).bfloat16().contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 5, (2, 8, 8))
    fused = logits.clone().requires_grad_(True)
    loss, correct = softmax_loss(fused, target, dice=True)
    loss.backward()
    plain = logits.clone().requires_grad_(True)
    (cross_entropy(plain.float(), target) + dice_loss(plain.float(), target)).backward()
    assert loss.dtype == torch.float32 and fused.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused.grad, plain.grad)
    # ties are common in bf16: a pixel whose target shares the top logit counts as right
    top = logits.float().amax(1)
    assert correct.item() == (logits.float().gather(1, target.unsqueeze(1)).squeeze(1) == top).sum().item()


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_is_the_same_on_channels_last_logits(weighted: bool) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    weight = torch.rand(5) + 0.5 if weighted else None
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        logits = base.clone().contiguous(memory_format=fmt).requires_grad_(True)
        loss = cross_entropy(logits, target, weight)
        loss.backward()
        results.append((loss.detach(), logits.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
