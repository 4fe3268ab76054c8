"""What a recipe's CPU training step costs at several crop sizes: the price of ``early_crop``.

Builds the recipe's model, optimizer and loss as ``unetseg train`` does (``benchmarks/layout_ab.py``'s
``recipe_parts``, then ``runtime.prepare_model_for_training`` in the layout ``unetseg train`` picks), and
times ``train.train_step`` at the recipe's batch size on a random batch of each crop size, round-robin
(``bench.interleaved_times``, after one warm-up round), so that a noisy machine slows every size alike.
One model and optimizer serve all sizes, as in a run whose crops change mid-way. Prints the median ms per
step of each size, its ratio to the last size given (the recipe's crop by default) and that ratio over the
ratio of the pixels: 1.00 means the step's cost goes with its pixels.

Usage: python benchmarks/crop_cost.py [--recipe default] [--sizes 96 128 112 144 128 160] [--precision auto]
       [--threads 2] [--rounds 7] [--steps 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from functools import partial

import torch
from layout_ab import add_step_arguments, cpu_as_train_sets_it, random_batch, recipe_parts

from unetseg.bench import interleaved_times
from unetseg.runtime import memory_format, prepare_model_for_training, resolve_precision
from unetseg.train import make_optimizer, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 112, 144, 128, 160],
                   help="crop sizes as H W pairs; the last is the reference")
    args = p.parse_args()
    if len(args.sizes) % 2:
        p.error("--sizes takes H W pairs")
    sizes = [(args.sizes[i], args.sizes[i + 1]) for i in range(0, len(args.sizes), 2)]
    cpu = cpu_as_train_sets_it(args.threads)
    cfg, model, loss_fn = recipe_parts(args.recipe)
    precision = resolve_precision(args.precision, cpu)
    fmt = memory_format(cpu)
    model = prepare_model_for_training(model, precision, cpu).to(memory_format=fmt).train()
    # lr 0: the weights stay where they started, so no size times a model that others trained further
    opt = make_optimizer(cfg.optimizer, model, 0.0, cfg.weight_decay, cfg.momentum)
    n = cfg.batch_size

    def steps(x: torch.Tensor, y: torch.Tensor) -> None:
        for _ in range(args.steps):
            train_step(model, opt, x, y, precision, cpu, loss_fn, cfg.grad_clip)

    fns = {}
    for h, w in sizes:
        x, y = random_batch(n, h, w)
        fns[f"{h}x{w}"] = partial(steps, x.contiguous(memory_format=fmt), y)
    rounds = interleaved_times(fns, args.rounds, warmup=1)
    med = {name: statistics.median(ts) / args.steps for name, ts in rounds.items()}
    ref_name, (rh, rw) = f"{sizes[-1][0]}x{sizes[-1][1]}", sizes[-1]
    print(f"recipe {args.recipe}: batch {n}, batch norm {cfg.batch_norm}, {cfg.optimizer}, loss {cfg.loss}; "
          f"{precision}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps (medians)")
    print(f"{'crop':<10}{'ms/step':>10}{'img/s':>8}{'vs ' + ref_name:>12}{'/ pixel ratio':>15}")
    rows = {}
    for (h, w), (name, m) in zip(sizes, med.items(), strict=True):
        ratio = m / med[ref_name]
        per_pixel = ratio / (h * w / (rh * rw))
        rows[name] = {"ms_per_step": 1000 * m, "ratio": ratio, "ratio_over_pixel_ratio": per_pixel,
                      "all_ms_per_step": [1000 * t / args.steps for t in rounds[name]]}
        print(f"{name:<10}{1000 * m:>10.1f}{n / m:>8.2f}{ratio:>11.3f}x{per_pixel:>15.3f}")
    if args.json:
        result = {"recipe": args.recipe, "precision": precision, "threads": args.threads, "batch_size": n,
                  "rounds": args.rounds, "steps": args.steps, "cpu": platform.processor() or platform.machine(),
                  "reference": ref_name, "sizes": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
