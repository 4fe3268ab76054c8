"""Training settings: recipe YAML, then a user YAML, then CLI flags; the resolved result is saved per run.

Settings are one flat dataclass of plain values (nanoGPT-style), so a run's ``config.yaml`` reads like the
command that made it.

Example:
    >>> from unetseg.config import resolve_config
    >>> cfg = resolve_config(recipe="lab", overrides={"data": "scenes", "out": "runs/lab", "epochs": 2})
    >>> cfg.batch_size, cfg.size, cfg.epochs
    (32, [96, 128], 2)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UnetsegError
from .losses import LOSSES

RECIPES = ("lab", "default")
EMA_WARMUPS = ("tf", "debiased")


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are only the fallback under a recipe."""

    data: str | None = None  # dataset folder; None: generate driving scenes into RUN_DIR/scenes
    out: str = "runs/unetseg"
    recipe: str = "default"
    # model
    arch: str = "lab"
    base_filters: int = 32
    depth: int = 4
    dropout: float = 0.3
    batch_norm: bool = False
    n_classes: int | None = None  # None: from the dataset (23 for CARLA)
    # data
    size: list[int] | None = field(default_factory=lambda: [96, 128])  # (H, W) every frame is resized to
    resize_mode: str = "lab"  # lab: nearest for images and masks; default: area/bilinear images, nearest masks
    crop: list[int] | None = None  # (H, W) random training crops; None: whole frames
    # (H, W) smaller crops for the first early_crop_fraction of the epochs (progressive crops: a step's cost
    # goes with its pixels: 96x128 costs 0.62x a 128x160 step, BENCHMARKS.md); None: crop from the start
    early_crop: list[int] | None = None
    early_crop_fraction: float = 0.0
    augment: bool = False  # flip, scale, colour jitter (train only)
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    color_jitter: float = 0.2
    hue_jitter: float = 0.0  # random hue turn of up to this share of a full turn either way (0.1: +-36 degrees)
    rare_crops: float = 0.0  # share of training crops centred on a pixel of a rare class (needs crop)
    class_mix: float = 0.0  # share of training samples given half the classes of another sample (ClassMix)
    # share of training samples given the rare-class pixels of another sample of their batch, where a
    # class is rare with under rare_paste_below of the training pixels (copy-paste for small objects)
    rare_paste: float = 0.0
    rare_paste_below: float = 0.01
    # a training frame is drawn with weight (frames in its sequence) ** -run_balance: 0 shows every frame once
    # per epoch; 1 shows every sequence (driving run) equally often, frames drawn with replacement
    run_balance: float = 0.0
    layout: str = "auto"
    palette: str | None = None  # JSON/CSV name -> RGB, for colour masks
    class_names: str | None = None  # file naming the classes
    cache_dir: str | None = None  # keep decoded frames here so the next run decodes nothing
    val_fraction: float = 0.2
    val_every: int = 1  # validate every k epochs (and always after the last)
    synth_count: int = 300  # frames generated when no --data is given
    # optimisation
    epochs: int = 40
    batch_size: int = 32  # global batch
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only (Nesterov); the one-cycle schedule cycles it over 0.85-0.95 instead
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle | cosine
    warmup_fraction: float = 0.1  # one-cycle: share of steps spent warming up
    loss: str = "ce"  # ce | ce+dice | ce+lovasz | ce+dice+lovasz
    # share of the pixels, the hardest by cross-entropy, that the CE term averages over (bootstrapped CE; 1: all)
    hard_pixels: float = 1.0
    # share of each pixel's target spread uniformly over the classes in the CE term (label smoothing; 0: off)
    label_smoothing: float = 0.0
    lovasz_from: float = 0.0  # share of the epochs trained before a "+lovasz" term joins the loss (0: from the start)
    # weight of the mean loss of training-only class heads on the decoder's inner stages (deep supervision; 0: off)
    deep_supervision: float = 0.0
    class_weighting: str = "none"  # none | sqrt_inverse (from training-set pixel shares)
    class_weight_clip: float = 10.0  # class weights stay within [median/clip, median*clip]
    prior_correction: float = 0.0  # share of log(class weight) taken off the logits at prediction (0: none)
    # multiples of `size` at which evaluate/predict run each frame, averaging the class probabilities
    predict_scales: list[float] = field(default_factory=lambda: [1.0])
    grad_clip: float = 0.0  # clip the global gradient norm to this before each step (0: off)
    ema: float = 0.0  # per-step decay of a moving average of the weights, which validation and best.pt use (0: off)
    # how the average starts: "tf" = decay min(ema, (1+n)/(10+n)) (TensorFlow's rule; reaches 0.997 only after
    # 2,990 updates); "debiased" = every update weighted by ema**age from the first one (Adam's bias correction)
    ema_warmup: str = "tf"
    # execution
    seed: int = 0
    split_seed: int | None = None  # seed of the train/val split (None: seed), to compare seeds on one split
    deterministic: bool = False
    precision: str = "auto"  # auto | fp32 | bf16
    threads: int | None = None
    device: str = "auto"
    time_budget: float | None = None  # minutes: re-plan the epochs to fit after epoch 1; stop after any epoch past it
    no_progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise UnetsegError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    text = resources.files("unetseg.recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ``UnetsegError`` names the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UnetsegError(f"{path}: config file not found")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UnetsegError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(obj, dict):
        raise UnetsegError(f"{path}: expected a mapping of settings, got {type(obj).__name__}")
    return obj


def resolve_config(
    recipe: str | None = None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Recipe defaults, then ``config_file``, then ``overrides`` (None values are ignored)."""
    user = read_yaml(config_file) if config_file else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = overrides.get("recipe") or recipe or user.get("recipe") or "default"
    merged: dict[str, Any] = {**load_recipe(name), **user, **overrides, "recipe": name}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UnetsegError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg


def _valid_scales(scales: Any) -> bool:
    from .predict import check_scales  # the one rule for prediction scales; YAML must give it a list

    if not isinstance(scales, list):
        return False
    try:
        check_scales(scales)
    except UnetsegError:
        return False
    return True


def validate(cfg: TrainConfig) -> None:
    """Reject impossible settings with messages that say which flag to change."""
    checks = [
        (cfg.epochs >= 1, f"--epochs {cfg.epochs} must be at least 1"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be at least 1"),
        (cfg.lr > 0, f"--lr {cfg.lr} must be positive"),
        (0 <= cfg.dropout < 1, f"--dropout {cfg.dropout} must be in [0, 1)"),
        (0 < cfg.val_fraction < 1, f"--val-fraction {cfg.val_fraction} must be between 0 and 1"),
        (cfg.val_every >= 1, f"val_every {cfg.val_every} must be at least 1"),
        (0 <= cfg.rare_crops <= 1, f"rare_crops {cfg.rare_crops} must be in [0, 1]"),
        (0 <= cfg.early_crop_fraction < 1,
         f"early_crop_fraction {cfg.early_crop_fraction} must be in [0, 1) (a share of the epochs)"),
        (cfg.early_crop is None or cfg.crop is not None,
         "early_crop needs crop (the crop it gives way to), e.g. crop: [128, 160] with early_crop: [96, 128]"),
        (0 <= cfg.class_mix <= 1, f"class_mix {cfg.class_mix} must be in [0, 1]"),
        (0 <= cfg.rare_paste <= 1, f"rare_paste {cfg.rare_paste} must be in [0, 1]"),
        (0 < cfg.rare_paste_below < 1, f"rare_paste_below {cfg.rare_paste_below} must be in (0, 1) (a pixel share)"),
        (0 <= cfg.hue_jitter <= 0.5, f"hue_jitter {cfg.hue_jitter} must be in [0, 0.5] (a share of a full turn)"),
        (0 <= cfg.run_balance <= 1, f"run_balance {cfg.run_balance} must be in [0, 1] (0: uniform, 1: per sequence)"),
        (cfg.arch in ("lab", "paper"), f"--arch {cfg.arch!r} must be lab or paper"),
        (cfg.optimizer in ("adam", "adamw", "sgd"), f"optimizer {cfg.optimizer!r} must be adam, adamw or sgd"),
        (0 <= cfg.momentum < 1, f"momentum {cfg.momentum} must be in [0, 1)"),
        (cfg.schedule in ("constant", "onecycle", "cosine"), f"schedule {cfg.schedule!r} is unknown"),
        (cfg.loss in LOSSES, f"loss {cfg.loss!r} must be one of {', '.join(LOSSES)}"),
        (0 < cfg.hard_pixels <= 1, f"hard_pixels {cfg.hard_pixels} must be in (0, 1] (a share of the pixels; 1: all)"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing {cfg.label_smoothing} must be in [0, 1) (0: off)"),
        (0 <= cfg.lovasz_from < 1, f"lovasz_from {cfg.lovasz_from} must be in [0, 1) (a share of the epochs)"),
        (cfg.deep_supervision >= 0, f"deep_supervision {cfg.deep_supervision} must be >= 0 (0: off; e.g. 0.4)"),
        (cfg.deep_supervision == 0 or cfg.depth >= 2,
         f"deep_supervision needs depth >= 2 (a decoder stage besides the last); depth is {cfg.depth}: "
         "use depth >= 2 or set deep_supervision: 0"),
        (cfg.class_weighting in ("none", "sqrt_inverse"), f"class_weighting {cfg.class_weighting!r} is unknown"),
        (0 <= cfg.prior_correction <= 1, f"prior_correction {cfg.prior_correction} must be in [0, 1]"),
        (_valid_scales(cfg.predict_scales),
         f"predict_scales {cfg.predict_scales} must be a list of multiples of size in (0, 4], e.g. [0.6, 1.0]"),
        (cfg.grad_clip >= 0, f"grad_clip {cfg.grad_clip} must be >= 0 (0: off)"),
        (0 <= cfg.ema < 1, f"ema {cfg.ema} must be in [0, 1) (0: off; e.g. 0.995)"),
        (cfg.ema_warmup in EMA_WARMUPS, f"ema_warmup {cfg.ema_warmup!r} must be one of {', '.join(EMA_WARMUPS)}"),
        (cfg.class_weight_clip >= 1, f"class_weight_clip {cfg.class_weight_clip} must be at least 1"),
        (cfg.resize_mode in ("lab", "default"), f"resize_mode {cfg.resize_mode!r} must be lab or default"),
        (cfg.precision in ("auto", "fp32", "bf16"), f"--precision {cfg.precision!r} must be auto, fp32 or bf16"),
    ]
    for ok, message in checks:
        if not ok:
            raise UnetsegError(message)
    for name in ("size", "crop", "early_crop"):
        v = getattr(cfg, name)
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise UnetsegError(f"{name} {v} must be two positive integers H W")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a ``TrainConfig`` from ``unetseg train`` flags (flags override the YAML)."""
    flags = {
        "data": args.data, "out": args.out, "recipe": args.recipe, "arch": args.arch, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "size": list(args.size) if args.size else None,
        "dropout": args.dropout, "batch_norm": args.batch_norm, "val_fraction": args.val_fraction, "seed": args.seed,
        "deterministic": args.deterministic, "precision": args.precision, "threads": args.threads,
        "device": args.device, "n_classes": args.classes, "layout": args.layout, "palette": args.palette,
        "class_names": args.class_names, "cache_dir": args.cache_dir,
        "time_budget": args.time_budget, "no_progress": args.no_progress,
    }
    return resolve_config(config_file=args.config, overrides=flags)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved settings saved in ``RUN_DIR/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    data = read_yaml(path)
    settings = data.get("settings", data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in settings.items() if k in known})
