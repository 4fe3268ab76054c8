"""Can the 3x3 convs' weight gradients run faster than oneDNN's own kernel on this CPU? (No, so far.)

oneDNN 3.12 computes a bf16 3x3 conv's weight gradient with its older ``jit_bf16`` kernel on CPUs with
AVX512-BF16 but no AMX, ~1.5x the time of the same conv's forward (brgemm) — the largest item of the lab
model's training step that is left (BENCHMARKS.md). This times, per lab layer (batch 32, bf16,
channels_last), that kernel against three reformulations built from other fast kernels:

  shift9   nine GEMMs, one per tap: rows of the zero-padded input, flattened (pixels, C_in), shifted by
           the tap's offset, against the output gradient padded to the same grid (zeros where no output
           pixel is): no copies, each GEMM reduces over all pixels
  im2col   one GEMM against the nine shifted copies of the input side by side (pixels, 9*C_in)
  fwdconv  the weight gradient as a forward conv (batch and channels swapped: the input (C_in, N, H+2,
           W+2) convolved with the output gradient (C_out, N, H, W) as a HxW kernel), oneDNN's brgemm
           forward kernel
           (--fwdconv: slow, off by default)

and checks each against oneDNN's result. Prints medians in ms and the totals.

Usage: python experiments/conv_weight_grad.py [--rounds 7] [--threads 2] [--fwdconv]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from unetseg.bench import interleaved_medians
from unetseg.runtime import flush_denormals, retain_freed_memory, set_threads

# (C_in, C_out, H, W) of the lab model's 3x3 convs at batch 32 (decoder convs after the concatenation)
LAB_LAYERS = [
    (3, 32, 96, 128), (32, 32, 96, 128), (32, 64, 48, 64), (64, 64, 48, 64), (64, 128, 24, 32),
    (128, 128, 24, 32), (128, 256, 12, 16), (256, 256, 12, 16), (256, 512, 6, 8), (512, 512, 6, 8),
    (512, 256, 12, 16), (256, 128, 24, 32), (128, 64, 48, 64), (64, 32, 96, 128),
]


def onednn(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def shift9(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, cin, h, wd = x.shape
    cout = g.shape[1]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # (N, H+2, W+2, C_in)
    gp = F.pad(g.permute(0, 2, 3, 1), (0, 0, 0, 2, 0, 2)).contiguous()  # gradient on the same grid
    m = n * (h + 2) * (wd + 2)
    xr, gr = xp.view(m, cin), gp.view(m, cout)
    out = torch.empty(cout, 3, 3, cin, dtype=x.dtype)
    for kh in range(3):
        for kw in range(3):
            off = kh * (wd + 2) + kw
            out[:, kh, kw, :] = gr[: m - off].t() @ xr[off:]
    return out.permute(0, 3, 1, 2)


def im2col(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, cin, h, wd = x.shape
    cout = g.shape[1]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    cols = torch.cat([xp[:, kh : kh + h, kw : kw + wd, :] for kh in range(3) for kw in range(3)], dim=3)
    gr = g.permute(0, 2, 3, 1).reshape(n * h * wd, cout)
    return (gr.t() @ cols.reshape(n * h * wd, 9 * cin)).view(cout, 3, 3, cin).permute(0, 3, 1, 2)


def fwdconv(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    cl = torch.channels_last
    xt = F.pad(x, (1, 1, 1, 1)).transpose(0, 1).contiguous(memory_format=cl)  # (C_in, N, H+2, W+2)
    gt = g.transpose(0, 1).contiguous(memory_format=cl)  # (C_out, N, H, W)
    return F.conv2d(xt, gt).transpose(0, 1)  # (C_out, C_in, 3, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fwdconv", action="store_true", help="also time the forward-conv formulation (slow)")
    args = ap.parse_args()
    set_threads(args.threads)
    retain_freed_memory()
    flush_denormals()
    ways = {"onednn": onednn, "shift9": shift9, "im2col": im2col}
    if args.fwdconv:
        ways["fwdconv"] = fwdconv
    totals = dict.fromkeys(ways, 0.0)
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for cin, cout, h, wd in LAB_LAYERS:
        x = torch.randn(32, cin, h, wd, generator=gen).to(torch.bfloat16).contiguous(memory_format=cl)
        g = torch.randn(32, cout, h, wd, generator=gen).to(torch.bfloat16).contiguous(memory_format=cl)
        w = torch.randn(cout, cin, 3, 3, generator=gen).to(torch.bfloat16).contiguous(memory_format=cl)
        ref = onednn(x, g, w).float()
        errs = {k: ((f(x, g, w).float() - ref).abs().max() / ref.abs().max()).item() for k, f in ways.items()}
        fns = {k: partial(f, x, g, w) for k, f in ways.items()}
        med = {k: 1e3 * v for k, v in interleaved_medians(fns, args.rounds).items()}
        for k, v in med.items():
            totals[k] += v
        gflop = 2 * 9 * cin * cout * h * wd * 32 / 1e9
        cells = ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
        worst = max(v for k, v in errs.items() if k != "onednn")
        print(f"{cin:3d}->{cout:3d} at {h}x{wd} ({gflop:.1f} GFLOP): {cells}  (max rel. diff {worst:.1e})")
    print("total: " + ", ".join(f"{k} {v:.1f} ms" for k, v in totals.items()))


if __name__ == "__main__":
    main()
