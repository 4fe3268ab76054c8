"""A/B of the activation layout, channels_last (NHWC) against contiguous (NCHW), for a recipe's CPU training step.

Builds the recipe's model, optimizer and loss as ``unetseg train`` does (``runtime.prepare_model_for_training``,
``train.make_optimizer``, ``losses.make_loss``), once per layout from the same initial weights, and times
``train.train_step`` on the same random batch (the recipe's batch size and crop, or its frame size)
round-robin (``bench.interleaved_times``, after one warm-up round), so that a noisy machine slows both alike.
Prints the median ms per step, img/s and GFLOP/s (the step's convolution and matmul FLOPs, counted by
``torch.utils.flop_counter``) of each, the ratio, and the layout ``unetseg train`` picks here
(``runtime.memory_format``). ``--compile`` adds a third subject, the channels_last model under ``torch.compile``
(``runtime.compile_for_training``, as ``unetseg benchmark``'s ``*_compile`` modes train), and prints what its first
step cost: whether compiling the training step would pay here (``runtime.COMPILE_SAVING``).

Usage: python benchmarks/layout_ab.py [--recipe default|lab] [--precision auto|fp32|bf16] [--threads 2]
       [--rounds 7] [--steps 2] [--compile] [--profile] [--json FILE]
(``--profile``: afterwards, the CPU time per step of the main ops in each subject, from ``torch.profiler``)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from unetseg.bench import interleaved_times
from unetseg.config import resolve_config
from unetseg.losses import make_loss
from unetseg.model import build_model
from unetseg.runtime import (
    compile_available,
    compile_for_training,
    cpu_has_native_bf16,
    flush_denormals,
    memory_format,
    prepare_model_for_training,
    resolve_precision,
    retain_freed_memory,
    set_threads,
)
from unetseg.train import make_optimizer, train_step

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _profile(subjects: dict, y: torch.Tensor, precision: str, loss_fn, grad_clip: float, steps: int = 2) -> None:
    from torch.profiler import ProfilerActivity, profile

    per_subject = {}
    for name, (model, opt, xb) in subjects.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(model, opt, xb, y, precision, torch.device("cpu"), loss_fn, grad_clip)
        per_subject[name] = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    ops = sorted(set().union(*per_subject.values()), key=lambda k: -max(v.get(k, 0) for v in per_subject.values()))
    print(f"\nself CPU ms per step ({steps} profiled steps each)")
    print(f"{'op':<44}" + "".join(f"{name:>24}" for name in per_subject))
    for op in ops[:12]:
        print(f"{op[:43]:<44}" + "".join(f"{v.get(op, 0):>24.1f}" for v in per_subject.values()))
    print(f"{'all ops':<44}" + "".join(f"{sum(v.values()):>24.1f}" for v in per_subject.values()))


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The options every recipe-step benchmark here takes."""
    p.add_argument("--recipe", default="default")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="training steps per subject per timed round")
    p.add_argument("--json", help="also write the figures to this file")


def cpu_as_train_sets_it(threads: int) -> torch.device:
    """The CPU with ``threads`` threads, freed memory kept and subnormals flushed, as ``unetseg train`` runs."""
    set_threads(threads)
    retain_freed_memory()
    flush_denormals()
    return torch.device("cpu")


def recipe_parts(recipe: str) -> tuple:
    """The recipe's settings, its model (seeded) and its loss (random class weights where it weights)."""
    cfg = resolve_config(recipe=recipe)
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(23, generator=gen) + 0.5 if cfg.class_weighting != "none" else None
    torch.manual_seed(0)
    model = build_model(cfg.arch, n_classes=23, base_filters=cfg.base_filters, depth=cfg.depth,
                        dropout=cfg.dropout, batch_norm=cfg.batch_norm)
    return cfg, model, make_loss(cfg.loss, 23, weight)


def random_batch(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, h, w)`` in [0, 1) and labels ``(n, h, w)`` over the 23 classes."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, h, w, generator=gen), torch.randint(0, 23, (n, h, w), generator=gen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p)
    p.add_argument("--compile", action="store_true", help="also time channels_last under torch.compile")
    p.add_argument("--profile", action="store_true", help="then profile 2 steps of each subject, per op")
    args = p.parse_args()
    cpu = cpu_as_train_sets_it(args.threads)
    compile_ok, why_not = compile_available(cpu)
    if args.compile and not compile_ok:
        p.error(f"--compile is not possible here: {why_not}")
    cfg, base, loss_fn = recipe_parts(args.recipe)
    precision = resolve_precision(args.precision, cpu)
    h, w = cfg.crop or cfg.size
    n = cfg.batch_size
    x, y = random_batch(n, h, w)

    def subject(fmt: torch.memory_format, compiled: bool = False) -> tuple:
        """(model, optimizer, batch) from the same initial weights, in layout ``fmt``."""
        model = prepare_model_for_training(copy.deepcopy(base), precision, cpu).to(memory_format=fmt).train()
        opt = make_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, cfg.momentum)
        return compile_for_training(model) if compiled else model, opt, x.contiguous(memory_format=fmt)

    subjects = {name: subject(fmt) for name, fmt in LAYOUTS.items()}
    compile_seconds = None
    if args.compile:
        runner, opt, xb = subjects["channels_last_compiled"] = subject(torch.channels_last, compiled=True)
        start = time.perf_counter()  # the first step compiles its forward and backward graphs
        train_step(runner, opt, xb, y, precision, cpu, loss_fn, cfg.grad_clip)
        compile_seconds = time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:  # the forward and backward of one step
        model, _, xb = subjects["channels_last"]
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), xb, y, "fp32", cpu, loss_fn)
    gflop = counter.get_total_flops() / 1e9

    def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor) -> None:
        for _ in range(args.steps):
            train_step(model, opt, xb, y, precision, cpu, loss_fn, cfg.grad_clip)

    fns = {name: partial(steps, *subject) for name, subject in subjects.items()}
    rounds = interleaved_times(fns, args.rounds, warmup=1)
    times = {name: [t / args.steps for t in ts] for name, ts in rounds.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    picked = "channels_last" if memory_format(cpu) == torch.channels_last else "contiguous"
    print(f"recipe {args.recipe}: batch {n}, {h}x{w}, batch norm {cfg.batch_norm}, {cfg.optimizer}, loss {cfg.loss}; "
          f"{precision}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps (medians); "
          f"unetseg train picks {picked} here")
    print(f"{gflop:.1f} GFLOP a step")
    if compile_seconds is not None:
        print(f"the compiled subject's first step (compiling) took {compile_seconds:.1f} s")
    print(f"{'subject':<24}{'ms/step':>10}{'img/s':>9}{'GFLOP/s':>9}{'vs channels_last':>18}")
    for name, m in med.items():
        print(f"{name:<24}{m * 1000:>10.1f}{n / m:>9.2f}{gflop / m:>9.1f}{med['channels_last'] / m:>17.3f}x")
    if args.profile:
        _profile(subjects, y, precision, loss_fn, cfg.grad_clip)
    if args.json:
        result = {
            "recipe": args.recipe, "precision": precision, "threads": args.threads, "batch_size": n, "size": [h, w],
            "rounds": args.rounds, "steps": args.steps, "gflop_per_step": gflop,
            "cpu": platform.processor() or platform.machine(),
            "cpu_bf16": cpu_has_native_bf16(), "picked": picked, "compile_seconds": compile_seconds,
            "ms_per_step": {k: 1000 * v for k, v in med.items()},
            "all_ms_per_step": {k: [1000 * t for t in ts] for k, ts in times.items()},
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
