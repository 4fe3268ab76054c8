"""Gathering the transposed convs' nine weight-gradient taps: ``torch.stack`` of strided slices against one
``as_strided`` view copied once (what ``model._TransposedConvSameCPU.backward`` does since session 6).

Times both for the lab model's four stride-2 transposed convs (batch 32, 96x128 input, bf16 channels_last
output gradients), interleaved, and prints the medians and the ratio; checks that both give the same rows.

Usage: python benchmarks/deconv_taps.py [--rounds 11] [--threads 2]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from unetseg.bench import interleaved_medians
from unetseg.runtime import retain_freed_memory, set_threads

# (C_in, C_out, H, W) of the lab model's transposed convs: input H x W, output 2H x 2W
LAB_LAYERS = [(512, 256, 6, 8), (256, 128, 12, 16), (128, 64, 24, 32), (64, 32, 48, 64)]


def stacked(padded: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = padded.shape[:2]
    taps = [padded[:, :, kh : kh + 2 * h : 2, kw : kw + 2 * w : 2].permute(0, 2, 3, 1)
            for kh in range(3) for kw in range(3)]
    return torch.stack(taps, 3).reshape(n * h * w, 9 * c)


def strided(padded: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = padded.shape[:2]
    p = padded.permute(0, 2, 3, 1)
    sn, sh, sw, sc = p.stride()
    return p.as_strided((n, h, w, 3, 3, c), (sn, 2 * sh, 2 * sw, sh, sw, sc), p.storage_offset()).reshape(
        n * h * w, 9 * c
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    retain_freed_memory()
    totals = {"stack": 0.0, "strided": 0.0}
    for _cin, cout, h, w in LAB_LAYERS:
        g = torch.randn(32, cout, 2 * h, 2 * w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        padded = F.pad(g, (0, 1, 0, 1))
        assert torch.equal(stacked(padded, h, w), strided(padded, h, w))
        fns = {"stack": partial(stacked, padded, h, w), "strided": partial(strided, padded, h, w)}
        med = {k: 1e3 * v for k, v in interleaved_medians(fns, args.rounds).items()}
        for k, v in med.items():
            totals[k] += v
        print(f"C_out {cout:3d} at {2 * h}x{2 * w}: stack {med['stack']:.2f} ms, strided {med['strided']:.2f} ms")
    print(f"all four: stack {totals['stack']:.2f} ms, strided {totals['strided']:.2f} ms, "
          f"{totals['stack'] / totals['strided']:.2f}x")


if __name__ == "__main__":
    main()
