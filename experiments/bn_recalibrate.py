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

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.checkpoint import load_checkpoint, save_checkpoint
from unetseg.data import find_pairs, read_image, resize_image
from unetseg.evaluate import evaluate
from unetseg.model import model_from_config


def recalibrate(model: nn.Module, frames: torch.Tensor, scales: list[float], batch: int = 8) -> None:
    """Replace each batch norm's running mean/var by its exact average over ``frames (N, 3, H, W)`` (0-1)
    predicted at each of ``scales``, the weights unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        for scale in scales:
            for i in range(0, len(frames), batch):
                x = frames[i : i + batch]
                if scale != 1.0:
                    h, w = x.shape[-2:]
                    # the sizes the predictor uses: multiples of 16 nearest to the scaled frame
                    size = (max(16, round(h * scale / 16) * 16), max(16, round(w * scale / 16) * 16))
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                model(x)
    model.eval()


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
        frames = torch.stack([torch.from_numpy(resize_image(read_image(pair.image), size, mode)).permute(2, 0, 1)
                              for pair in sample]).float() / 255
        scales = list(state["preprocess"].get("predict_scales") or [1.0])
        model = model_from_config(state["model_config"])
        model.load_state_dict(state["model"])
        scores = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, estimate_scales in (("stored", None), ("frames@1", [1.0]), ("frames@scales", scales)):
                trial = copy.deepcopy(state)
                if estimate_scales is not None:
                    net = copy.deepcopy(model)
                    recalibrate(net, frames, estimate_scales)
                    trial["model"] = net.state_dict()
                path = Path(tmp) / f"{label}.pt"
                save_checkpoint(trial, path)
                result = evaluate(path, args.data, split="val", progress=False)
                scores[label] = result["mean_iou"]
        print(f"{run.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
