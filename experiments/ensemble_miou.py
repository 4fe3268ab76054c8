"""Val mIoU of seed ensembles: the mean softmax of several runs' ``best.pt``, scored like ``unetseg evaluate``.

Every run must hold out the same validation frames (same ``split_seed``). Prints each run alone, then
every pair, every triple and all of them together, each with the mean of its members' own scores.

Usage: python experiments/ensemble_miou.py --data ../shared/data/carla runs/def40 runs/g2 runs/s2 ...
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch

from unetseg.checkpoint import load_checkpoint
from unetseg.data import find_pairs, read_image, read_mask
from unetseg.metrics import confusion_matrix, mean_iou
from unetseg.predict import Predictor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    states = {run.name: load_checkpoint(run / "best.pt") for run in args.runs}
    val_names = [set(s["val_names"]) for s in states.values()]
    if any(names != val_names[0] for names in val_names):
        raise SystemExit("the runs hold out different validation frames; use runs with one split_seed")
    pairs, layout = find_pairs(args.data, "auto")
    pairs = [pair for pair in pairs if pair.name in val_names[0]]
    images = [read_image(pair.image) for pair in pairs]
    masks = [torch.from_numpy(read_mask(pair.mask, layout, None)) for pair in pairs]
    n_classes = next(iter(states.values()))["model_config"]["n_classes"]
    probs = {}  # run -> (N, C, H, W) float16 softmax at the labels' resolution
    for name, state in states.items():
        predictor = Predictor(state, batch_size=16, compile="off")
        probs[name] = torch.cat([predictor.logits(images[i : i + 16], masks[0].shape).softmax(1).half()
                                 for i in range(0, len(images), 16)])

    def score(members: tuple[str, ...]) -> float:
        pred = sum(probs[m].float() for m in members).argmax(1)
        return mean_iou(sum(confusion_matrix(pred[i], masks[i], n_classes) for i in range(len(masks))))

    alone = {name: score((name,)) for name in states}
    for name, miou in alone.items():
        print(f"{name:<40}{miou:.4f}")
    for k in sorted(k for k in {2, 3, len(states)} if 1 < k <= len(states)):
        for members in itertools.combinations(states, k):
            print(f"{'+'.join(members):<40}{score(members):.4f}  (members' mean "
                  f"{statistics.mean(alone[m] for m in members):.4f})")


if __name__ == "__main__":
    main()
