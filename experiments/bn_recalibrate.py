"""Held-out mIoU of batch-norm checkpoints before and after re-estimating their batch-norm statistics.

A checkpoint's batch-norm running statistics are an exponential average taken while the weights moved,
and its weights are themselves a moving average (``ema``), so the statistics belong to no single set of
weights; they were also measured on augmented 128x160 crops, while prediction runs whole frames at 0.6x
and 1x. This re-estimates them for the checkpoint's own weights on the run's training frames (never the
validation frames), as whole frames at each prediction scale, and scores the validation split with
``unetseg.evaluate`` as it is and re-estimated.

Usage: python experiments/bn_recalibrate.py --data ../shared/data/carla runs/bn_s4 runs/bn_s5 [--frames 434]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unetseg.checkpoint import load_checkpoint, save_checkpoint
from unetseg.data import find_pairs, read_image, resize_image
from unetseg.evaluate import evaluate
from unetseg.model import model_from_config
from unetseg.predict import scaled_size


def recalibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace each batch norm's running mean/var by its exact average over ``batches`` (each ``(N, 3, H, W)``,
    0-1), the weights unchanged."""
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def frame_batches(images: list[np.ndarray], size: tuple[int, int], mode: str, scale: float,
                  batch: int = 8) -> list[torch.Tensor]:
    """``images`` (HWC uint8) resized as the predictor runs them at ``scale`` (``predict.scaled_size``), in batches."""
    target = scaled_size(size, scale)
    x = torch.stack([torch.tensor(resize_image(im, target, mode)).permute(2, 0, 1) for im in images]).float() / 255
    return list(x.split(batch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--frames", type=int, default=434, help="training frames to estimate on (spread evenly)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs, _ = find_pairs(args.data, "auto")
    for run in args.runs:
        state = load_checkpoint(run / "best.pt")
        val = set(state["val_names"])
        train_pairs = [pair for pair in pairs if pair.name not in val]
        sample = train_pairs[:: max(1, len(train_pairs) // args.frames)][: args.frames]
        size = tuple(state["preprocess"]["size"])
        mode = state["preprocess"].get("resize_mode", "default")
        images = [read_image(pair.image) for pair in sample]
        scales = list(state["preprocess"].get("predict_scales") or [1.0])
        model = model_from_config(state["model_config"])
        model.load_state_dict(state["model"])
        scores = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, estimate_scales in (("stored", None), ("frames@1", [1.0]), ("frames@scales", scales)):
                trial = copy.deepcopy(state)
                if estimate_scales is not None:
                    net = copy.deepcopy(model)
                    recalibrate(net, [b for sc in estimate_scales for b in frame_batches(images, size, mode, sc)])
                    trial["model"] = net.state_dict()
                path = Path(tmp) / f"{label}.pt"
                save_checkpoint(trial, path)
                result = evaluate(path, args.data, split="val", progress=False)
                scores[label] = result["mean_iou"]
        print(f"{run.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
