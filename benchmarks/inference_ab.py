"""A/B of the lab model's CPU inference paths at batch 32 (or ``--batch-size``), interleaved in one process.

  autocast   eager, fp32 weights under bf16 autocast (the benchmark's ``bf16`` mode)
  unfused    ``runtime.InferenceModel`` eager with ``fuse=False``: bf16 weights, conv and ReLU apart
  unpacked   ``fused`` without its prepacked weights (oneDNN reorders each weight on every call)
  fused      ``runtime.InferenceModel`` eager as predict/evaluate run it: each conv + ReLU one primitive,
             weights prepacked in oneDNN's layout (``runtime.prepack_conv_relu_weights``)
  shuffle    ``fused`` with each transposed conv rewritten as a 2x2 conv + pixel shuffle
             (``export.rewrite_transposed_convs``, exact to float rounding)
  compiled   ``runtime.InferenceModel(compiled=True)``: inductor with frozen weights (``--compiled``)

Each round runs every path once after an untimed pause (so no thread pool is still spinning); prints
the median img/s (and ms per batch) of each, its ratio to the first, and checks that fused, unpacked and
unfused give the same logits.

With ``--profile`` it prints torch's profiler table of the fused path over 5 batches instead.

Usage: python benchmarks/inference_ab.py [--rounds 15] [--threads 2] [--batch-size 32] [--settle S] [--compiled]
       [--profile]
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch

from unetseg.bench import SETTLE_S, interleaved_medians
from unetseg.export import rewrite_transposed_convs
from unetseg.model import build_model
from unetseg.runtime import InferenceModel, autocast, flush_denormals, retain_freed_memory, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--settle", type=float, default=SETTLE_S,
                    help="untimed pause before each call, s (0 for single images: a pause leaves them cold)")
    ap.add_argument("--compiled", action="store_true", help="also time the compiled path")
    ap.add_argument("--profile", action="store_true", help="profile the fused path instead of timing")
    args = ap.parse_args()
    set_threads(args.threads)
    retain_freed_memory()
    flush_denormals()
    cpu, cl = torch.device("cpu"), torch.channels_last
    torch.manual_seed(0)
    model = build_model("lab").eval()
    x = torch.rand(args.batch_size, 3, 96, 128)
    net = copy.deepcopy(model).to(memory_format=cl)

    def autocast_path(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast("bf16", cpu):
            return net(images.contiguous(memory_format=cl)).float()

    paths = {
        "autocast": autocast_path,
        "unfused": InferenceModel(model, "bf16", cpu, fuse=False),
        "unpacked": InferenceModel(model, "bf16", cpu),
        "fused": InferenceModel(model, "bf16", cpu),
        "shuffle": InferenceModel(rewrite_transposed_convs(model), "bf16", cpu),
    }
    for m in paths["unpacked"].net.modules():
        if hasattr(m, "packed_weight"):
            m.packed_weight = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            paths["fused"](x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                paths["fused"](x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    if args.compiled:
        paths["compiled"] = InferenceModel(model, "bf16", cpu, compiled=True, batch_size=args.batch_size)
    assert torch.equal(paths["fused"](x), paths["unfused"](x)), "fused and unfused logits differ"
    assert torch.equal(paths["fused"](x), paths["unpacked"](x)), "prepacked weights changed the logits"
    # one warm-up round (and compiling), then the timed rounds
    medians = interleaved_medians({k: partial(fn, x) for k, fn in paths.items()}, args.rounds, 1, args.settle)
    first = None
    for name, sec in medians.items():
        ips = args.batch_size / sec
        first = first or ips
        print(f"{name:9s} {ips:7.1f} img/s  {sec * 1e3:7.2f} ms  {ips / first:.3f}x")


if __name__ == "__main__":
    main()
