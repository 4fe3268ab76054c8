"""Share of ReLU channels that never turn positive on a sample of a run's training frames.

Usage: python experiments/dead_channels.py --data ../shared/data/carla runs/def40 runs/lab [--frames 40]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from unetseg.checkpoint import load_checkpoint
from unetseg.data import find_pairs, read_image, resize_image
from unetseg.model import build_model


def relu_peaks(model: nn.Module, x: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """The largest output ``(C,)`` of every ReLU module of ``model`` over the images ``x (N, 3, H, W)``."""
    peak: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            top = out.amax((0, 2, 3))
            peak[name] = torch.maximum(peak[name], top) if name in peak else top
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    for handle in handles:
        handle.remove()
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    pairs, _ = find_pairs(args.data, "auto")
    for run in args.runs:
        state = load_checkpoint(run / "best.pt")
        train_pairs = [pair for pair in pairs if pair.name not in set(state["val_names"])]
        sample = train_pairs[:: max(1, len(train_pairs) // args.frames)][: args.frames]
        size = tuple(state["preprocess"]["size"])
        mode = state["preprocess"].get("resize_mode", "default")
        x = torch.stack([torch.from_numpy(resize_image(read_image(pair.image), size, mode)).permute(2, 0, 1)
                         for pair in sample]).float() / 255
        model = build_model(**state["model_config"])
        model.load_state_dict(state["model"])
        peak = relu_peaks(model.eval(), x)
        dead = {name: int((v <= 0).sum()) for name, v in peak.items()}
        total = sum(v.numel() for v in peak.values())
        print(f"{run.name}: {sum(dead.values())}/{total} channels never positive "
              f"({sum(dead.values()) / total:.0%}) on {len(x)} training frames")
        print("  " + ", ".join(f"{name} {dead[name]}/{peak[name].numel()}" for name in peak if dead[name]))


if __name__ == "__main__":
    main()
