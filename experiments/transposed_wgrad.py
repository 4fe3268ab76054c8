"""Two ways to compute the weight gradient of the lab model's four stride-2 transposed convs on a CPU.

``model._TransposedConvSameCPU`` (``model.transposed_conv_weight_grad``) copies the nine taps of the
(padded) output gradient into GEMM rows and multiplies once; the same sum is the weight gradient of the
stride-2 conv that gives the input gradient, with the layer's input as that conv's output gradient
(``torch.ops.aten.convolution_backward``, oneDNN's backward-weights kernel, which reads the padded gradient
in place). This times both per layer, interleaved, medians of 11, at one batch size and frame size.

Example (the lab recipe's step, then the default recipe's)::

    python experiments/transposed_wgrad.py --batch-size 32 --size 96 128
    python experiments/transposed_wgrad.py --batch-size 8 --size 128 160
    python experiments/transposed_wgrad.py --batch-size 32 --size 96 128 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from unetseg.model import transposed_conv_weight_grad as taps_gemm
from unetseg.runtime import flush_denormals, set_threads


def onednn(x: torch.Tensor, padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        x, padded, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    flush_denormals()
    dt, cl = getattr(torch, args.dtype), torch.channels_last
    h0, w0 = args.size
    total = {"taps GEMM": 0.0, "oneDNN": 0.0}
    for c_in, c_out, down in [(512, 256, 16), (256, 128, 8), (128, 64, 4), (64, 32, 2)]:
        h, w = h0 // down, w0 // down
        x = torch.randn(args.batch_size, c_in, h, w).to(dt).contiguous(memory_format=cl)
        grad = torch.randn(args.batch_size, c_out, 2 * h, 2 * w).to(dt).contiguous(memory_format=cl)
        weight = torch.randn(c_in, c_out, 3, 3).to(dt)
        padded = F.pad(grad, (0, 1, 0, 1))
        ref, other = taps_gemm(x, padded).float(), onednn(x, padded, weight).float()
        rel = ((ref - other).abs().max() / ref.abs().max()).item()
        fns = {"taps GEMM": (taps_gemm, (x, padded)), "oneDNN": (onednn, (x, padded, weight))}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(13):
            for k, (fn, fn_args) in fns.items():
                t = time.perf_counter()
                fn(*fn_args)
                if r >= 2:
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for k in total:
            total[k] += med[k]
        taps_mib = args.batch_size * h * w * 9 * c_out * padded.element_size() / 2**20
        print(f"{c_in:>3}->{c_out:<3} at {h}x{w}: taps GEMM {med['taps GEMM']:6.2f} ms, oneDNN {med['oneDNN']:6.2f} ms"
              f"  (taps {taps_mib:5.1f} MiB, max rel. difference {rel:.1e})")
    print("sum: " + ", ".join(f"{k} {v:.1f} ms" for k, v in total.items()))


if __name__ == "__main__":
    main()
