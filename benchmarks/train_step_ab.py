"""A/B of CPU settings on the lab model's bf16 training step, interleaved in one process.

Times ``unetseg.train.train_step`` (by default batch 32, 96x128, bf16 autocast, channels_last, the lab's
Adam, the lab's cross-entropy) under several settings, round-robin so that machine noise hits all alike, and
prints the median step time and images/s of each and the speed-up over the first. Each setting switches
on a subset of these (what ``unetseg train`` and the benchmark's bf16/auto modes use is all of them):

  ftz        subnormal floats flushed to zero (``runtime.flush_denormals``, as TensorFlow does)
  fused      torch's fused Adam (``train.make_optimizer``) instead of its loop of element-wise ops
  loss       ``losses.softmax_loss``: cross-entropy and the step's pixel accuracy from one fused softmax,
             instead of ``F.cross_entropy`` + ``argmax``
  deconv     ``ConvTranspose2dSame``'s own backward on CPU (``model._TransposedConvSameCPU``) instead of
             oneDNN's strided deconvolution backward + the crop's backward
  dropout    ``model.Dropout`` (mask from ``torch.rand``) instead of ``nn.Dropout`` (``bernoulli_``)
  wgrad8     (wgrad24) the transposed convs' weight gradient from oneDNN where their taps exceed 8 (24) MiB,
             as ``model.wgrad_onednn_min_taps_bytes`` has it on AMX CPUs; without it, the taps GEMM everywhere
  convrelu   each conv + ReLU as one oneDNN primitive with autograd's own gradients (``runtime.fuse_conv_relu``,
             session 15) instead of a conv and a separate in-place ReLU
  batchnorm  batch norm after each 3x3 conv (``batch_norm=True``, as the default recipe trains since session
             17; conv and ReLU then stay apart, as ``unetseg train`` runs it)
  lovasz     the loss plus ``losses.lovasz_softmax`` (``--set lovasz``: what a "+lovasz" loss costs; the
             random targets hold all 23 classes, real batches ~15-18)
  deepsup    deep supervision (``deep_supervision: 0.4``): ``deep_supervision.DeepSupervision``'s heads on the
             inner decoder stages, their logits upsampled to the output and scored with the same loss

Usage: python benchmarks/train_step_ab.py
       [--set wgrad|convrelu|deconv|session4|session4-total|session3|lovasz|batchnorm|deepsup]
       [--rounds 7] [--steps 4] [--threads 2] [--batch-size 32] [--size 96 128] [--loss ce|ce+dice]
       [--precision bf16|fp32]
(the default recipe's step: ``--batch-size 8 --size 128 160 --loss ce+dice``; ``--precision fp32`` where
the CPU has no bf16)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import unetseg.model
from unetseg.deep_supervision import DeepSupervision
from unetseg.losses import cross_entropy, dice_loss, make_loss
from unetseg.model import ConvTranspose2dSame, Dropout, build_model
from unetseg.runtime import fuse_conv_relu, retain_freed_memory, set_threads
from unetseg.train import train_step

SETS = {
    # session 3: the two optimizer-side settings, on the step as it was before session 4's changes
    "session3": {
        "plain": set(),
        "ftz": {"ftz"},
        "fused": {"fused"},
        "ftz+fused": {"ftz", "fused"},
    },
    # session 4: the session-3 step (ftz + fused Adam), then each new item alone, then both
    "session4": {
        "session3 step": {"ftz", "fused"},
        "+loss": {"ftz", "fused", "loss"},
        "+dropout": {"ftz", "fused", "dropout"},
        "all": {"ftz", "fused", "loss", "dropout"},
    },
    # the same two ends only: more rounds in the same time, for the total on a noisy machine
    "session4-total": {
        "session3 step": {"ftz", "fused"},
        "all": {"ftz", "fused", "loss", "dropout"},
    },
    # session 5: the step without the transposed convs' own backward, then with it (session 5's step)
    "deconv": {
        "plain deconv": {"ftz", "fused", "loss", "dropout"},
        "session5 step": {"ftz", "fused", "loss", "dropout", "deconv"},
    },
    # session 15: the step before it, then with each conv + ReLU fused (the shipped step)
    "convrelu": {
        "session5 step": {"ftz", "fused", "loss", "dropout", "deconv"},
        "+convrelu": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu"},
    },
    # session 15: the transposed convs' weight gradient from the taps GEMM everywhere, then from oneDNN where
    # the taps exceed 8 or 24 MiB (model.wgrad_onednn_min_taps_bytes; 8 MiB is the shipped choice on AMX CPUs)
    "wgrad": {
        "taps": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu"},
        "onednn>8MiB": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8"},
        "onednn>24MiB": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad24"},
    },
    # the shipped step, then the same with the Lovász-softmax term added to its loss
    "lovasz": {
        "shipped step": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8"},
        "+lovasz": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8", "lovasz"},
    },
    # session 17: the shipped step without batch norm, then with it (what the default recipe's step costs)
    "batchnorm": {
        "no batch norm": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8"},
        "+batchnorm": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8", "batchnorm"},
    },
    # session 29: the default recipe's step (batch norm), then with deep-supervision heads at weight 0.4
    "deepsup": {
        "recipe step": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8", "batchnorm"},
        "+deepsup": {"ftz", "fused", "loss", "dropout", "deconv", "convrelu", "wgrad8", "batchnorm", "deepsup"},
    },
}


def _plain_transposed_conv(self: ConvTranspose2dSame, x: torch.Tensor, output_size=None) -> torch.Tensor:
    """The op through autograd's own backward: oneDNN's deconvolution backward and the crop's."""
    h, w = x.shape[-2:]
    out = F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, output_padding=1)
    return out[..., : 2 * h, : 2 * w]


def _model(items: set[str]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lab", n_classes=23, batch_norm="batchnorm" in items)
    model = model.to(memory_format=torch.channels_last).train()
    for mod in model.modules():
        if isinstance(mod, ConvTranspose2dSame) and "deconv" not in items:
            mod.forward = types.MethodType(_plain_transposed_conv, mod)
        for name, child in mod.named_children():
            if isinstance(child, Dropout) and "dropout" not in items:
                setattr(mod, name, nn.Dropout(child.p))
    if "convrelu" in items:
        fuse_conv_relu(model, (torch.bfloat16,))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=sorted(SETS), default="session4")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="training steps per timed round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--loss", choices=["ce", "ce+dice"], default="ce",
                   help="ce: the lab's; ce+dice: the default recipe's (here unweighted)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args()
    settings = SETS[args.set]
    set_threads(args.threads)
    retain_freed_memory()
    cpu = torch.device("cpu")
    h, w = args.size
    x = torch.rand(args.batch_size, 3, h, w).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 23, (args.batch_size, h, w))

    def plain_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # as train_step did before session 4
        loss = cross_entropy(logits, target)
        return loss + dice_loss(logits, target) if args.loss == "ce+dice" else loss

    runs = {}
    for name, items in settings.items():
        model = _model(items)
        aux = DeepSupervision(model, 23).to(memory_format=torch.channels_last) if "deepsup" in items else None
        params = [*model.parameters(), *(aux.parameters() if aux is not None else ())]
        opt = torch.optim.Adam(params, lr=1e-3, eps=1e-7, fused="fused" in items)
        loss_name = args.loss + "+lovasz" if "lovasz" in items else args.loss
        runs[name] = (model, opt, make_loss(loss_name, 23) if "loss" in items else plain_loss, aux)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(args.rounds + 2):  # two warm-up rounds: Adam's moments fill with real (tiny) values
        for name, items in settings.items():
            torch.set_flush_denormal("ftz" in items)
            limit = 8 * 2**20 if "wgrad8" in items else 24 * 2**20 if "wgrad24" in items else math.inf
            unetseg.model.wgrad_onednn_min_taps_bytes = lambda limit=limit: limit
            model, opt, loss_fn, aux = runs[name]
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, x, y, args.precision, cpu, loss_fn, aux=aux, aux_weight=0.4)
            if r >= 2:
                times[name].append((time.perf_counter() - t) / args.steps)
    torch.set_flush_denormal(False)
    base = statistics.median(next(iter(times.values())))
    print(f"lab model, batch {args.batch_size}, {h}x{w}, loss {args.loss}, {args.precision}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (medians)")
    print(f"{'setting':<16}{'ms/step':>10}{'img/s':>9}{'speed-up':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16}{med * 1000:>10.1f}{args.batch_size / med:>9.1f}{base / med:>9.2f}x")


if __name__ == "__main__":
    main()
