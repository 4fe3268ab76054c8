"""A/B of two CPU settings on the lab model's bf16 training step, interleaved in one process.

Times ``unetseg.train.train_step`` (batch 32, 96x128, bf16 autocast, channels_last, the lab's Adam)
under four settings, round-robin so that machine noise hits all alike, and prints the median step time
and images/s of each, and the speed-up over the first:

  plain       torch's default Adam (a loop of ~8 element-wise ops per tensor), subnormals kept
  ftz         + subnormal floats flushed to zero (``runtime.flush_denormals``, as TensorFlow does)
  fused       + torch's fused Adam (``train.make_optimizer``), subnormals kept
  ftz+fused   both: what ``unetseg train`` and the benchmark's bf16/auto modes now use

Usage: python benchmarks/train_step_ab.py [--rounds 7] [--steps 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unetseg.model import build_model
from unetseg.runtime import retain_freed_memory, set_threads
from unetseg.train import train_step

SETTINGS = {"plain": (False, False), "ftz": (True, False), "fused": (False, True), "ftz+fused": (True, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="training steps per timed round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    set_threads(args.threads)
    retain_freed_memory()
    cpu = torch.device("cpu")
    x = torch.rand(args.batch_size, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 23, (args.batch_size, 96, 128))
    runs = {}
    for name, (_, fused) in SETTINGS.items():
        torch.manual_seed(0)
        model = build_model("lab", n_classes=23).to(memory_format=torch.channels_last).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=fused)
        runs[name] = (model, opt)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for r in range(args.rounds + 2):  # two warm-up rounds: Adam's moments fill with real (tiny) values
        for name, (ftz, _) in SETTINGS.items():
            torch.set_flush_denormal(ftz)
            model, opt = runs[name]
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, x, y, "bf16", cpu)
            if r >= 2:
                times[name].append((time.perf_counter() - t) / args.steps)
    torch.set_flush_denormal(False)
    base = statistics.median(times["plain"])
    print(f"lab model, batch {args.batch_size}, 96x128, bf16 autocast, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (medians)")
    print(f"{'setting':<12}{'ms/step':>10}{'img/s':>9}{'speed-up':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12}{med * 1000:>10.1f}{args.batch_size / med:>9.1f}{base / med:>9.2f}x")


if __name__ == "__main__":
    main()
