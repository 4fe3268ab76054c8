"""The training loop: one readable function from a config to a run directory.

A run directory holds ``config.yaml`` (resolved settings, versions, threads, device), ``split.json``,
``history.csv`` (one row per epoch), ``curves.png``, ``last.pt`` (every epoch) and ``best.pt`` (best
validation mIoU). Every file is replaced atomically. ``resume(RUN_DIR)`` continues after the last
completed epoch with model, optimizer, scheduler and RNG restored; the data order and augmentation of
epoch ``e`` come from generators seeded by ``(seed, e)``, so with ``deterministic=True`` an interrupted and
resumed run ends with the same weights as one never interrupted.

Example:
    >>> from unetseg import train
    >>> summary = train(recipe="lab", data="scenes", out="runs/lab", epochs=2)  # doctest: +SKIP
    >>> summary["best_miou"]                                                      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import __version__ as unetseg_version
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .classes import ClassTable
from .config import TrainConfig, load_run_config, read_yaml, resolve_config, save_yaml
from .deep_supervision import DeepSupervision
from .errors import UnetsegError
from .losses import LossFn, class_weights, make_loss, prior_correction_bias, softmax_loss
from .metrics import confusion_matrix, mean_iou, pixel_accuracy
from .model import build_model, check_lab_size, count_parameters, crop_like, forward_full, paper_output_size
from .runtime import (
    autocast,
    count_fused_conv_relu,
    describe,
    flush_denormals,
    memory_format,
    pick_device,
    prepare_model_for_training,
    resolve_precision,
    retain_freed_memory,
    set_threads,
)

HISTORY_COLUMNS = [
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_miou", "seconds",
    "lr", "data_wait_seconds", "images_per_s",
]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    masks: torch.Tensor,
    precision: str,
    device: torch.device,
    loss_fn: LossFn = softmax_loss,
    grad_clip: float = 0.0,
    aux: DeepSupervision | None = None,
    aux_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimisation step on ``images (N, 3, H, W)`` float in [0, 1] and ``masks (N, H, W)`` int64.

    ``loss_fn`` gets the logits as the model returns them (bf16 under bf16 autocast) and returns the loss,
    or ``(loss, correct_pixels)`` as ``losses.make_loss``'s functions do (their softmax also gives the
    accuracy; for a plain loss it is counted with an argmax). ``grad_clip`` > 0 rescales the gradients so
    that their global L2 norm is at most that value (over every weight ``optimizer`` trains). ``aux``, the
    deep-supervision heads hooked into ``model``, adds ``aux_weight`` times the mean of ``loss_fn`` over
    their logits to the loss that is minimised.
    Returns ``(loss, correct_pixels, pixels)``: the detached mean loss of the network's own output (without
    the auxiliary terms, so it compares with runs without them), the count of pixels predicted
    right (a scalar tensor) and of pixels scored. Labels are centre-cropped to the output for the
    unpadded (paper) U-Net, whose output is smaller than its input.
    """
    with autocast(precision, device):
        logits = model(images)
        aux_logits = aux.pop_logits(tuple(logits.shape[-2:])) if aux is not None else []
    if logits.shape[-2:] != masks.shape[-2:]:
        masks = crop_like(masks, tuple(logits.shape[-2:]))
    result = loss_fn(logits, masks)
    loss, correct = result if isinstance(result, tuple) else (result, None)
    objective = loss
    if aux_logits:
        aux_losses = [loss_fn(a, masks) for a in aux_logits]
        aux_mean = sum(r[0] if isinstance(r, tuple) else r for r in aux_losses) / len(aux_losses)
        objective = loss + aux_weight * aux_mean
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip > 0:
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(trained, grad_clip, foreach=True)
    optimizer.step()
    if correct is None:
        with torch.no_grad():
            correct = (logits.argmax(1) == masks).sum()
    return loss.detach(), correct, masks.numel()


@torch.inference_mode()
def validate(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    n_classes: int,
    precision: str,
    device: torch.device,
    batch_size: int = 16,
    logit_bias: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Plain CE loss, pixel accuracy and mIoU of ``model`` on uint8 ``images (N, 3, H, W)``, ``masks (N, H, W)``.

    ``logit_bias`` ``(C,)`` is added to the logits first, as the checkpoint's inference model does.
    """
    was_training = model.training
    model.eval()
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
    loss_sum = 0.0
    fmt = memory_format(device)
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(device).float().div_(255).contiguous(memory_format=fmt)
        y = masks[s : s + batch_size].to(device).long()
        with autocast(precision, device):
            logits = forward_full(model, x)
        logits = logits.float()
        if logit_bias is not None:
            logits = logits + logit_bias.to(logits.device).view(1, -1, 1, 1)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        cm += confusion_matrix(logits.argmax(1), y, n_classes).cpu()
    model.train(was_training)
    pixels = masks.numel()
    return {"loss": loss_sum / pixels, "accuracy": pixel_accuracy(cm), "miou": mean_iou(cm), "confusion": cm}


# ------------------------------------------------------------------------------------------------ run setup


@dataclass
class _Run:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    precision: str
    classes: ClassTable
    train_images: torch.Tensor  # (N, 3, H, W) uint8
    train_masks: torch.Tensor  # (N, H, W) uint8
    val_images: torch.Tensor
    val_masks: torch.Tensor
    split: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loss_fn: LossFn
    loss_fn_before_lovasz: LossFn  # the loss without its Lovász term, for the epochs before cfg.lovasz_from
    steps_per_epoch: int
    preprocess: dict[str, Any]
    class_pixels: torch.Tensor  # (C,) training-set pixel count per class
    logit_bias: torch.Tensor | None  # (C,) added to the logits at prediction (prior correction)
    ema: torch.optim.swa_utils.AveragedModel | None  # moving average of the weights (cfg.ema > 0)
    aux: DeepSupervision | None  # training-only class heads on the decoder's inner stages (cfg.deep_supervision > 0)
    frame_weights: torch.Tensor | None  # (N,) sampling weight per training frame (cfg.run_balance > 0)
    data_thread: bool  # batches made in a background thread (True) or between the steps (data_thread_pays)

    @property
    def predicting_model(self) -> nn.Module:
        """The weights that validation scores and checkpoints hand to evaluate/predict."""
        return self.ema.module if self.ema is not None else self.model


def _check_sizes(cfg: TrainConfig, frame_size: tuple[int, int]) -> None:
    train_sizes = [tuple(c) for c in (cfg.crop, cfg.early_crop) if c] or [frame_size]
    for train_size in train_sizes:
        if cfg.arch == "lab":
            check_lab_size(*train_size, depth=cfg.depth)
        else:
            for side in train_size:
                paper_output_size(side, cfg.depth)
    for name in ("crop", "early_crop"):
        c = getattr(cfg, name)
        if c and (c[0] > frame_size[0] or c[1] > frame_size[1]):
            raise UnetsegError(f"{name} {c} is larger than the frames {list(frame_size)}; lower {name} or raise --size")


def in_first_share(epoch: int, total: int, share: float) -> bool:
    """Whether 1-based ``epoch`` is one of the first ``share`` of ``total`` epochs (``epoch <= share * total``):
    the one rule for settings that switch part-way (``early_crop_fraction``, ``lovasz_from``)."""
    return epoch <= share * total


def crop_for_epoch(cfg: TrainConfig, epoch: int) -> tuple[int, int] | None:
    """The (H, W) training crop of ``epoch`` (1-based): ``early_crop`` for the first ``early_crop_fraction``
    of ``cfg.epochs``, ``crop`` after that (None: whole frames).

        >>> cfg = TrainConfig(crop=[128, 160], early_crop=[96, 128], early_crop_fraction=0.6, epochs=40)
        >>> crop_for_epoch(cfg, 24), crop_for_epoch(cfg, 25)
        ((96, 128), (128, 160))
    """
    if cfg.early_crop and in_first_share(epoch, cfg.epochs, cfg.early_crop_fraction):
        return tuple(cfg.early_crop)
    return tuple(cfg.crop) if cfg.crop else None


def _dataset_root(cfg: TrainConfig, run_dir: Path) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from .data.synth import synth_dataset

    root = run_dir / "scenes"
    if not (root / "CameraRGB").is_dir():
        print(f"no --data given: generating {cfg.synth_count} driving scenes in {root} "
              "(point --data at the lab's CARLA folder, e.g. data/ with CameraRGB/ and CameraMask/, to use it)")
        synth_dataset(root, count=cfg.synth_count, seed=cfg.seed)
    return root


def make_optimizer(
    name: str, model: nn.Module | Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``adam`` with Keras' epsilon 1e-7 (the lab's ``optimizer='adam'``; torch's default is 1e-8), ``adamw``,
    or ``sgd`` (Nesterov momentum ``momentum``, L2 ``weight_decay``; the one-cycle schedule cycles the
    momentum between 0.85 and 0.95 instead).

    All use torch's fused implementation where the weights are on a CPU or CUDA device: one kernel per
    tensor instead of ~8 passes over it (on a CPU: 8 ms instead of 32-40 ms per step for the lab model's
    8.6 M weights, BENCHMARKS.md); the same update up to float rounding. ``model`` is a module or the
    parameters to train.
    """
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-7, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        # torch refuses Nesterov without momentum; momentum 0 is then plain SGD
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                               weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def ema_decay_at(decay: float, updates: int, warmup: str = "tf") -> float:
    """The decay of the weight average at an update after ``updates`` earlier ones.

    ``warmup="tf"``: ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's ``num_updates`` rule), so that a short
    run does not keep its first, random weights in the average (at 0.997 plain, a 300-step run would still
    hold 41 % of them). It reaches ``decay`` only after ``(10 decay - 1) / (1 - decay)`` updates (2,990 for
    0.997): in a shorter run every setting above the decay of its last step trains the same average, which
    weights late steps about as ``(m / N) ** 8``.

    ``warmup="debiased"``: ``decay (1 - decay**n) / (1 - decay**(n + 1))``, which makes the average after
    ``n + 1`` updates exactly ``sum_m decay**(n - m) w_m / sum_m decay**(n - m)`` (Adam's bias correction):
    the first weights get no excess share, and the window is ``1 / (1 - decay)`` updates from the start
    (1,000 for 0.999), so ``ema`` sets the width of the average even in a short run.
    """
    if warmup == "debiased":
        return decay * (1.0 - decay**updates) / (1.0 - decay ** (updates + 1))
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _ema_update(decay: float, warmup: str = "tf"):
    """``AveragedModel`` update: an exponential moving average with ``ema_decay_at``'s warm-up."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay_at(decay, int(n_averaged), warmup)
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:  # batch norm's step counter: averaging a count means nothing
                avg.copy_(cur)

    return update


def projected_seconds(
    total: int, val_every: int, done: int, elapsed_s: float, epoch_s: float, val_s: float,
    early_fraction: float = 0.0, late_epoch_s: float | None = None,
) -> float:
    """Wall seconds of a run of ``total`` epochs, ``done`` of which took ``elapsed_s``: each further epoch
    costs ``epoch_s`` seconds of training, plus ``val_s`` when it validates (every ``val_every``-th, and the last).
    With ``late_epoch_s``, the epochs after the first ``early_fraction`` of ``total`` cost that instead (the
    full crops after ``early_crop``)."""
    late = epoch_s if late_epoch_s is None else late_epoch_s
    training = sum(epoch_s if in_first_share(e, total, early_fraction) else late for e in range(done + 1, total + 1))
    validations = sum(1 for e in range(done + 1, total + 1) if e % val_every == 0 or e == total)
    return elapsed_s + training + validations * val_s


def plan_epochs(
    epochs: int, val_every: int, done: int, elapsed_s: float, epoch_s: float, val_s: float, budget_s: float,
    early_fraction: float = 0.0, late_epoch_s: float | None = None,
) -> int:
    """The most epochs, from ``done`` up to ``epochs``, whose ``projected_seconds`` fit ``budget_s``
    (``done`` when not even one more epoch fits).

        >>> plan_epochs(40, 4, done=1, elapsed_s=120, epoch_s=100, val_s=25, budget_s=56 * 60)
        31
        >>> plan_epochs(40, 4, done=1, elapsed_s=86, epoch_s=60, val_s=25, budget_s=56 * 60,
        ...             early_fraction=0.6, late_epoch_s=100)
        40
    """
    return max((total for total in range(done + 1, epochs + 1)
                if projected_seconds(total, val_every, done, elapsed_s, epoch_s, val_s, early_fraction,
                                     late_epoch_s) <= budget_s), default=done)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction
        )
    if cfg.schedule == "cosine":
        warm = max(1, int(cfg.warmup_fraction * total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def _setup(cfg: TrainConfig, run_dir: Path, split_dict: dict | None = None) -> _Run:
    from .data import Split, load_dataset, split_by_sequence

    set_threads(cfg.threads)
    retain_freed_memory()  # reuse activation memory between steps instead of page-faulting it in again
    device = pick_device(cfg.device)
    if device.type == "cpu":
        flush_denormals()  # Adam's tiny second moments are subnormal: slow on x86 (runtime.flush_denormals)
    precision = resolve_precision(cfg.precision, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    root = _dataset_root(cfg, run_dir)
    data = load_dataset(
        root, size=tuple(cfg.size) if cfg.size else None, resize_mode=cfg.resize_mode, n_classes=cfg.n_classes,
        layout=cfg.layout, palette=cfg.palette, class_names=cfg.class_names, cache_dir=cfg.cache_dir,
        progress=not cfg.no_progress,
    )
    n_classes = len(data.classes)
    if len(data) < 2:
        raise UnetsegError(f"{root}: {len(data)} frame(s); training needs at least 2 (one to validate on)")
    _check_sizes(cfg, data.size)
    if split_dict:
        split = Split.from_names(data.names, split_dict)
    else:
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        split = split_by_sequence(data.names, cfg.val_fraction, split_seed)
    if not split.train or not split.val:
        raise UnetsegError(f"{root}: the split left {len(split.train)} training and {len(split.val)} validation "
                           "frames; use more data or change --val-fraction")
    tr, va = torch.tensor(split.train), torch.tensor(split.val)

    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.arch, in_channels=3, n_classes=n_classes, base_filters=cfg.base_filters, depth=cfg.depth,
        dropout=cfg.dropout, batch_norm=cfg.batch_norm,
    )
    prepare_model_for_training(model, precision, device)
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=_ema_update(cfg.ema, cfg.ema_warmup), use_buffers=True)
    aux = None
    if cfg.deep_supervision > 0:  # after the average's copy of the model, which must not carry the hooks
        aux = DeepSupervision(model, n_classes).to(device, memory_format=memory_format(device))
    params = [*model.parameters(), *(aux.parameters() if aux is not None else ())]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
    steps = math.ceil(len(split.train) / cfg.batch_size)
    scheduler = _make_scheduler(cfg, optimizer, steps * cfg.epochs)
    train_masks = data.masks.index_select(0, tr)
    class_pixels = torch.bincount(train_masks.reshape(-1).long(), minlength=n_classes)[:n_classes]
    weights = class_weights(train_masks, n_classes, cfg.class_weighting, cfg.class_weight_clip).to(device)
    loss_weights = None if cfg.class_weighting == "none" else weights
    loss_fn = make_loss(cfg.loss, n_classes, loss_weights, cfg.hard_pixels, cfg.label_smoothing)
    loss_fn_before_lovasz = make_loss(
        cfg.loss.replace("+lovasz", ""), n_classes, loss_weights, cfg.hard_pixels, cfg.label_smoothing)
    logit_bias = None
    if cfg.class_weighting != "none" and cfg.prior_correction > 0:
        logit_bias = prior_correction_bias(weights, cfg.prior_correction).cpu()
    frame_weights = None
    if cfg.run_balance > 0:
        frame_weights = run_balanced_weights(split.train_names, cfg.run_balance, split.max_gap)
    preprocess = {
        "size": list(data.size), "resize_mode": cfg.resize_mode, "scale": 1 / 255, "layout": data.layout,
        "predict_scales": [float(v) for v in cfg.predict_scales],
    }
    return _Run(
        cfg=cfg, run_dir=run_dir, device=device, precision=precision, classes=data.classes,
        train_images=data.images.index_select(0, tr), train_masks=train_masks,
        val_images=data.images.index_select(0, va), val_masks=data.masks.index_select(0, va), split=split,
        model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
        loss_fn_before_lovasz=loss_fn_before_lovasz, steps_per_epoch=steps, preprocess=preprocess,
        class_pixels=class_pixels, logit_bias=logit_bias, ema=ema, aux=aux, frame_weights=frame_weights,
        data_thread=data_thread_pays(device),
    )


def data_thread_pays(device: torch.device) -> bool:
    """Whether making the next batches in a background thread overlaps with the steps (True), or only takes
    CPU from them (False: the batches are then made between the steps, in the training thread).

    A CUDA step leaves the CPU free. On a CPU whose cores all run the step's threads, the data thread
    preempts one of them inside a parallel region and the others wait for it at the region's end: on 2
    cores with 2 threads the default recipe's steps took 32.9 s per epoch beside the thread and 31.2 s
    with the batches made in between, which took 0.3 s (``benchmarks/epoch_overhead.py --data-thread
    both``; BENCHMARKS.md, session 13).
    """
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def run_balanced_weights(names: list[str], power: float, max_gap: int) -> torch.Tensor:
    """Sampling weight per frame, ``(frames in its sequence) ** -power``, shape ``(len(names),)``.

    Driving runs hold 1-58 frames of near-duplicate ticks in the lab's CARLA subset, so uniform sampling
    spends a third of the steps on three runs; ``power`` 1 gives every run the same share, 0.5 a share that
    grows with the square root of its length. Example: ``run_balanced_weights(["000001", "000100",
    "000101", "000102", "000103"], 1.0, 20)`` -> ``[1, 0.25, 0.25, 0.25, 0.25]``.
    """
    from .data import sequence_groups

    groups = torch.tensor(sequence_groups(names, max_gap))
    return torch.bincount(groups)[groups].double().pow(-power)


def epoch_order(n: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The ``n`` frame indices of one epoch: a permutation, or ``n`` draws with replacement by ``weights``."""
    if weights is None:
        return torch.randperm(n, generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): a resumed run draws the same order and augmentation.
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _batches(run: _Run, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from .data import augment_batch, class_mix, rare_class_centers, rare_paste

    cfg = run.cfg
    g = _epoch_generator(cfg.seed, epoch)
    order = epoch_order(len(run.train_images), run.frame_weights, g)
    fmt = memory_format(run.device)
    share = run.class_pixels.double() / run.class_pixels.sum()
    rare = (share > 0) & (share < cfg.rare_paste_below)  # the classes rare_paste copies
    crop = crop_for_epoch(cfg, epoch)
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        x = run.train_images[idx].float().div_(255)
        y = run.train_masks[idx].long()
        if cfg.augment or cfg.crop:
            centers = None
            if cfg.crop and cfg.rare_crops > 0:
                centers = rare_class_centers(y, run.class_pixels, cfg.rare_crops, generator=g)
            x, y = augment_batch(
                x, y, crop_size=crop,
                scale_range=tuple(cfg.scale_range) if cfg.augment else None, hflip=cfg.augment,
                color_jitter=cfg.color_jitter if cfg.augment else 0.0, generator=g, centers=centers,
                hue=cfg.hue_jitter if cfg.augment else 0.0,
            )
        if cfg.class_mix > 0:
            x, y = class_mix(x, y, cfg.class_mix, generator=g)
        if cfg.rare_paste > 0:
            x, y = rare_paste(x, y, cfg.rare_paste, rare, generator=g)
        yield x.to(run.device).contiguous(memory_format=fmt), y.to(run.device)


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead (torch ops release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # hand errors to the consumer instead of dying silently
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# ---------------------------------------------------------------------------------------------- run files


def _environment(run: _Run) -> dict[str, Any]:
    import numpy
    import PIL

    env = describe(run.device, run.precision)
    env["data_thread"] = run.data_thread
    env["fused_conv_relu"] = count_fused_conv_relu(run.model)  # conv + ReLU pairs run as one oneDNN primitive
    env.update(unetseg=unetseg_version, numpy=numpy.__version__, pillow=PIL.__version__,
               python=platform.python_version(), platform=platform.platform())
    return env


def _write_history(run_dir: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """``history.csv`` from ``history``, and ``curves.png`` too when ``curves``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())
    if curves:
        _plot(run_dir, history)


def _save_settings(run_dir: Path, cfg: TrainConfig, **extra: Any) -> None:
    """Rewrite the settings in ``run_dir/config.yaml`` (and add ``extra`` keys), keeping its other records."""
    path = run_dir / "config.yaml"
    save_yaml({**read_yaml(path), "settings": cfg.to_dict(), **extra}, path)


def _checkpoint_state(run: _Run, epoch: int, best: float, history: list, for_resume: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": "unetseg-checkpoint-1",
        "model": run.predicting_model.state_dict(),
        "model_config": dict(run.model.config),
        "classes": run.classes.to_dict(),
        "preprocess": dict(run.preprocess),
        "epoch": epoch,
        "best_miou": best,
        "history": history,
        "config": run.cfg.to_dict(),
        "val_names": list(run.split.val_names),
        "unetseg_version": unetseg_version,
    }
    if run.logit_bias is not None:
        state["logit_bias"] = run.logit_bias.tolist()
    if for_resume:
        if run.ema is not None:  # "model" holds the average; resuming also needs the weights being trained
            state["train_model"] = run.model.state_dict()
            state["ema_updates"] = int(run.ema.n_averaged)
        if run.aux is not None:
            state["aux_heads"] = run.aux.state_dict()
        state["optimizer"] = run.optimizer.state_dict()
        state["scheduler"] = run.scheduler.state_dict() if run.scheduler is not None else None
        state["rng"] = torch.get_rng_state()
    return state


# --------------------------------------------------------------------------------------------- the loop


# curves.png is redrawn at most this often (wall seconds), and after the last epoch of a run, however it
# stops: with history.csv it took 0.18 s, 2.4 % of a lab-recipe epoch on an AMX host (BENCHMARKS.md, session 15).
# history.csv, a few hundred bytes, is still written every epoch.
CURVES_EVERY_S = 30.0


def _fit(run: _Run, start_epoch: int, history: list[dict[str, Any]], best: float) -> dict[str, Any]:
    cfg, model = run.cfg, run.model
    n_classes = len(run.classes)
    tb = _tensorboard(run.run_dir)
    started = plotted_at = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = pixels = seen = 0
        data_wait = 0.0
        bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=cfg.no_progress,
                   leave=False, dynamic_ncols=True)
        batches = _prefetch(_batches(run, epoch)) if run.data_thread else _batches(run, epoch)
        # Lovász-softmax refines a model that already segments (Berman et al. fine-tune with it), so a
        # "+lovasz" term can join after a share of the epochs; it also costs a sort per step.
        loss_fn = run.loss_fn_before_lovasz if in_first_share(epoch, cfg.epochs, cfg.lovasz_from) else run.loss_fn
        for step in range(run.steps_per_epoch):
            tw = time.perf_counter()
            x, y = next(batches)
            data_wait += time.perf_counter() - tw
            loss, ok, n_px = train_step(model, run.optimizer, x, y, run.precision, run.device, loss_fn,
                                        cfg.grad_clip, run.aux, cfg.deep_supervision)
            if not torch.isfinite(loss):
                bar.close()
                if history:
                    _plot(run.run_dir, history)  # the curves of every completed epoch
                raise UnetsegError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step + 1}: training stopped. "
                    f"{run.run_dir / 'last.pt'} still holds epoch {epoch - 1}; try a lower --lr or --precision fp32"
                )
            if run.scheduler is not None:
                run.scheduler.step()
            if run.ema is not None:
                run.ema.update_parameters(model)
            loss_sum += loss.double() * x.shape[0]
            correct += int(ok)
            pixels += n_px
            seen += x.shape[0]
            bar.update()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct / pixels:.4f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        nan = float("nan")
        val = {"loss": nan, "accuracy": nan, "miou": nan}
        # With a time budget, epoch 1 also validates: its cost is half of what the re-plan needs to know.
        replan = cfg.time_budget is not None and epoch == 1 and cfg.epochs > 1
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs or replan:
            tv = time.perf_counter()
            val = validate(run.predicting_model, run.val_images, run.val_masks, n_classes, run.precision, run.device,
                           logit_bias=run.logit_bias)
            if replan:
                _fit_to_time_budget(run, train_seconds, time.perf_counter() - tv, time.perf_counter() - started)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch, "train_loss": loss_sum.item() / seen, "train_accuracy": correct / pixels,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_miou": val["miou"],
            "seconds": seconds, "lr": run.optimizer.param_groups[0]["lr"], "data_wait_seconds": data_wait,
            "images_per_s": seen / train_seconds,
        }
        history.append(row)
        improved = val["miou"] > best or (best != best and val["miou"] == val["miou"])  # NaN-aware
        if improved:
            best = val["miou"]
        # last.pt first: if killed between the two writes, resume still finds this epoch.
        save_checkpoint(_checkpoint_state(run, epoch, best, history, for_resume=True), run.run_dir / "last.pt")
        if improved:
            save_checkpoint(_checkpoint_state(run, epoch, best, history, for_resume=False), run.run_dir / "best.pt")
        over_budget = cfg.time_budget is not None and time.perf_counter() - started > 60 * cfg.time_budget
        stopped_early = over_budget and epoch < cfg.epochs
        curves = (epoch in (start_epoch, cfg.epochs) or stopped_early
                  or time.perf_counter() - plotted_at >= CURVES_EVERY_S)
        _write_history(run.run_dir, history, curves)
        if curves:
            plotted_at = time.perf_counter()
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch)
        print(
            f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  val_mIoU {row['val_miou']:.4f}"
            f"  {seconds:.1f}s ({row['images_per_s']:.1f} img/s, data wait {data_wait:.2f}s)",
            flush=True,
        )
        if stopped_early:
            print(f"time budget of {cfg.time_budget:g} min reached after epoch {epoch} of {cfg.epochs}; stopping",
                  flush=True)
            break
        if epoch >= cfg.epochs:  # the budget's re-plan may have shortened the run
            break
    if tb is not None:
        tb.close()
    return {
        "run_dir": str(run.run_dir), "epochs": history[-1]["epoch"] if history else 0, "best_miou": best,
        "history": history, "seconds": sum(r["seconds"] for r in history), "stopped_early": stopped_early,
    }


def _fit_to_time_budget(run: _Run, epoch_s: float, val_s: float, elapsed_s: float) -> None:
    """After epoch 1: plan the epochs that fit ``cfg.time_budget`` and refit the schedule to them.

    Stopping a one-cycle or cosine run when its time is up would end it at a high learning rate, before
    the annealing that most of its accuracy comes from; planning fewer epochs instead anneals them all.
    The plan goes into ``config.yaml`` (and the checkpoints), so ``--resume`` continues it.
    """
    cfg = run.cfg
    planned = cfg.epochs
    budget_s = 60 * cfg.time_budget
    # Epoch 1 ran on early_crop: a step's cost goes with its pixels (BENCHMARKS.md, session 26), so the
    # epochs on the full crop are priced by the ratio of the two.
    first, full = crop_for_epoch(cfg, 1), crop_for_epoch(cfg, cfg.epochs)
    late_epoch_s = epoch_s * (full[0] * full[1]) / (first[0] * first[1]) if first != full else None
    pricing = (cfg.val_every, 1, elapsed_s, epoch_s, val_s)
    fits = plan_epochs(planned, *pricing, budget_s, cfg.early_crop_fraction, late_epoch_s)

    def minutes(total: int) -> float:
        return projected_seconds(total, *pricing, cfg.early_crop_fraction, late_epoch_s) / 60

    costs = f"epoch 1 trained in {epoch_s:.0f} s and validated in {val_s:.0f} s"
    if late_epoch_s is not None:
        costs += f" (on {first[0]}x{first[1]} crops; about {late_epoch_s:.0f} s an epoch on {full[0]}x{full[1]})"
    if fits == planned:
        print(f"time budget {cfg.time_budget:g} min: {costs}; the {planned} epochs fit (about "
              f"{minutes(planned):.0f} min)", flush=True)
        return
    cfg.epochs = fits
    if run.scheduler is not None:
        # The schedule as if planned for `fits` epochs from the start, at the step this run has reached.
        run.scheduler = _make_scheduler(cfg, run.optimizer, run.steps_per_epoch * fits)
        for _ in range(run.steps_per_epoch):
            run.scheduler.step()
    _save_settings(run.run_dir, cfg, time_budget_plan={
        "budget_minutes": cfg.time_budget, "planned_epochs": planned, "epochs": fits,
        "epoch_seconds": round(epoch_s, 2), "validation_seconds": round(val_s, 2),
        **({"late_epoch_seconds": round(late_epoch_s, 2)} if late_epoch_s is not None else {}),
    })
    schedule = "" if run.scheduler is None else f", its {cfg.schedule} schedule fitted to them"
    print(f"time budget {cfg.time_budget:g} min: {costs}, so {planned} epochs would take about "
          f"{minutes(planned):.0f} min; planning {fits} epoch{'s' if fits > 1 else ''} (about {minutes(fits):.0f} min)"
          f"{schedule}", flush=True)


def _plot(run_dir: Path, history: list[dict[str, Any]]) -> None:
    from .visualize import plot_curves

    plot_curves(history, run_dir / "curves.png")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ------------------------------------------------------------------------------------------------ public


def train(config: TrainConfig | None = None, **settings: Any) -> dict[str, Any]:
    """Train from a ``TrainConfig`` or keyword settings (``recipe=``, ``data=``, ``out=``, ``epochs=`` …).

    Returns ``{"run_dir", "epochs", "best_miou", "history", "seconds", "stopped_early"}``.
    Refuses an ``out`` folder that already holds a run (resume it, or pick a new folder).
    """
    cfg = config if config is not None else resolve_config(overrides=settings)
    run_dir = Path(cfg.out)
    if (run_dir / "last.pt").exists():
        raise UnetsegError(f"{run_dir} already holds a training run; continue it with "
                           f"`unetseg train --resume {run_dir}` or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = _setup(cfg, run_dir)
    atomic_write_text(run_dir / "split.json", json.dumps(run.split.to_dict(), indent=1) + "\n")
    save_yaml({"settings": cfg.to_dict(), "environment": _environment(run), "data": _data_facts(run)},
              run_dir / "config.yaml")
    n_params = f"{count_parameters(run.model):,} parameters"
    if cfg.batch_norm:
        # Folding trades each batch norm's scale and shift (2 per channel) for its conv's bias (1 per channel).
        bn_channels = sum(m.num_features for m in run.model.modules() if isinstance(m, nn.BatchNorm2d))
        served = count_parameters(run.model) - bn_channels
        n_params += f" with batch norm; checkpoints serve {served:,}, each batch norm folded into its conv"
    print(f"training {cfg.arch} U-Net ({n_params}) on "
          f"{len(run.train_images)} frames, validating on {len(run.val_images)} from held-out sequences; "
          f"{run.precision} on {run.device} with {torch.get_num_threads()} threads", flush=True)
    early_epochs = sum(1 for e in range(1, cfg.epochs + 1) if crop_for_epoch(cfg, e) != crop_for_epoch(cfg, cfg.epochs))
    if early_epochs:
        (h, w), (fh, fw) = crop_for_epoch(cfg, 1), crop_for_epoch(cfg, cfg.epochs)
        print(f"training crops: {h}x{w} for epochs 1-{early_epochs}, then {fh}x{fw}", flush=True)
    if run.aux is not None:
        n = len(run.aux.heads)
        print(f"deep supervision: {n} training-only head{'s' if n > 1 else ''} ({count_parameters(run.aux):,} "
              f"parameters) on the decoder's inner stages, their mean loss weighted {cfg.deep_supervision}", flush=True)
    total_steps = run.steps_per_epoch * cfg.epochs
    last_decay = ema_decay_at(cfg.ema, total_steps - 1)
    if cfg.ema > 0 and cfg.ema_warmup == "tf" and last_decay < cfg.ema:
        print(f"note: ema {cfg.ema} is not reached in {total_steps:,} steps: the average's warm-up "
              f"min(ema, (1+n)/(10+n)) ends at {last_decay:.4f}, so any ema above that trains this same average "
              "(ema_warmup: debiased gives a window of 1/(1-ema) steps from the start)",
              flush=True)
    return _fit(run, 1, [], float("nan"))


def resume(run_dir: str | Path, epochs: int | None = None) -> dict[str, Any]:
    """Continue ``run_dir`` after its last completed epoch (optionally to a new total ``epochs``)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir / "last.pt", require=("model", "optimizer", "epoch", "rng"))
    if epochs is not None and epochs != cfg.epochs:
        if cfg.schedule != "constant":
            raise UnetsegError(f"{run_dir} uses a {cfg.schedule} schedule planned for {cfg.epochs} epochs; "
                               "it cannot be stretched on resume (start a new run with --epochs)")
        cfg.epochs = epochs
        _save_settings(run_dir, cfg)
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    run = _setup(cfg, run_dir, split)
    run.model.load_state_dict(state.get("train_model", state["model"]))
    if run.ema is not None:
        run.ema.module.load_state_dict(state["model"])
        run.ema.n_averaged.fill_(state.get("ema_updates", 0))
    if run.aux is not None:
        if "aux_heads" not in state:
            raise UnetsegError(f"{run_dir / 'last.pt'} has no deep-supervision heads (aux_heads) although the run's "
                               "config sets deep_supervision; it cannot be resumed as the same run")
        run.aux.load_state_dict(state["aux_heads"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    done = state["epoch"]
    if done >= cfg.epochs:
        print(f"{run_dir} already finished its {cfg.epochs} epochs")
    else:
        print(f"resuming {run_dir} after epoch {done} of {cfg.epochs}", flush=True)
    return _fit(run, done + 1, list(state["history"]), state["best_miou"])


def _data_facts(run: _Run) -> dict[str, Any]:
    return {
        "root": str(Path(run.cfg.data).resolve()) if run.cfg.data else str(run.run_dir / "scenes"),
        "layout": run.preprocess["layout"], "frame_size": run.preprocess["size"],
        "n_classes": len(run.classes), "classes": list(run.classes.names),
        "train_frames": len(run.train_images), "val_frames": len(run.val_images), "groups": run.split.groups,
    }
