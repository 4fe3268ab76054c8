"""Score a checkpoint's validation frames predicted at each of several scales, alone and in every combination.

Each frame is predicted once per scale (``Predictor(scales=[s])``: the frame resized to ``s`` times the
checkpoint's input size, logits resized back to the mask's size); a combination averages those class
probabilities, as ``--scales`` does. Prints the mean IoU (over the classes present) per combination.

Usage::

    python experiments/scale_scan.py runs/f1def/best.pt ../shared/data/carla --scales 0.6 0.8 1 1.2 [--tta] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from unetseg.data import find_pairs, read_image, read_mask
from unetseg.metrics import confusion_matrix, mean_iou
from unetseg.predict import Predictor, load_model_file


def val_frames(state: dict, data: str) -> tuple[list[np.ndarray], torch.Tensor]:
    """The checkpoint's validation frames in ``data``: HWC uint8 images and ``(N, H, W)`` int64 masks."""
    pairs, layout = find_pairs(data, "auto")
    keep = set(state["val_names"])
    pairs = [pair for pair in pairs if pair.name in keep]
    images = [read_image(pair.image) for pair in pairs]
    return images, torch.from_numpy(np.stack([read_mask(pair.mask, layout) for pair in pairs])).long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2])
    p.add_argument("--threads", type=int)
    p.add_argument("--tta", action="store_true", help="at each scale also predict the mirror image (as evaluate --tta)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    state = load_model_file(args.checkpoint)
    images, masks = val_frames(state, args.data)
    out_size = tuple(masks.shape[-2:])
    probs = {}
    for s in args.scales:
        predictor = Predictor(state, threads=args.threads, scales=[s], tta=args.tta)
        # fp16 keeps one scale of 108 CARLA frames at ~0.4 GB
        probs[s] = torch.cat([predictor.logits(images[i : i + 8], out_size).softmax(1).half()
                              for i in range(0, len(images), 8)])
    n = probs[args.scales[0]].shape[1]
    scores = {}
    for r in range(1, len(args.scales) + 1):
        for combo in itertools.combinations(args.scales, r):
            mean_prob = sum(probs[s].float() for s in combo)
            scores[" + ".join(f"{s:g}x" for s in combo)] = mean_iou(confusion_matrix(mean_prob.argmax(1), masks, n))
    for name, v in scores.items():
        print(f"{name:<28} {v:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "frames": len(images), "tta": args.tta,
                                         "mean_iou": scores}, indent=1) + "\n")


if __name__ == "__main__":
    main()
