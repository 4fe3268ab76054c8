"""Does training converge the same with the transposed convs' own CPU backward as with oneDNN's?

For each seed, trains the default recipe on generated scenes twice — once with ``ConvTranspose2dSame``'s
CPU backward (what ``unetseg train`` uses), once with the op through autograd's own backward — and prints
the final training loss and validation mIoU of both and their paired differences. The two arms of a seed
share the data, the split and the initialisation; bf16 training is not bit-reproducible, so the
differences show the seed-to-seed noise as well as any effect.

Usage: python experiments/deconv_convergence.py --seeds 10 11 12 13 14 15 [--epochs 10] [--synth-count 300]
       [--out /tmp/conv]      (``--synth-count 200``: the scenes of the README's ``unetseg quickstart``)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from unetseg.model import ConvTranspose2dSame
from unetseg.train import train


def _plain_forward(self: ConvTranspose2dSame, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, output_padding=1)[..., : 2 * h, : 2 * w]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--synth-count", type=int, default=300, help="generated scenes per run (300: train's default)")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="deconv_convergence_"))
    own_forward = ConvTranspose2dSame.forward
    rows = []
    for seed in args.seeds:
        result = {}
        for arm, forward in (("plain", _plain_forward), ("own", own_forward)):
            ConvTranspose2dSame.forward = forward
            try:
                summary = train(recipe="default", epochs=args.epochs, seed=seed, out=str(root / f"{arm}{seed}"),
                                synth_count=args.synth_count, no_progress=True)
            finally:
                ConvTranspose2dSame.forward = own_forward
            last = summary["history"][-1]
            result[arm] = (last["train_loss"], last["val_miou"], summary["seconds"])
        rows.append(result)
        (lp, mp, sp), (lo, mo, so) = result["plain"], result["own"]
        print(f"seed {seed}: train loss {lp:.4f} -> {lo:.4f} ({lo - lp:+.4f}), val mIoU {mp:.4f} -> {mo:.4f} "
              f"({mo - mp:+.4f}), {sp:.0f} s -> {so:.0f} s", flush=True)
    d_loss = [r["own"][0] - r["plain"][0] for r in rows]
    d_miou = [r["own"][1] - r["plain"][1] for r in rows]
    print(f"mean over {len(rows)} seeds (own - plain): train loss {statistics.mean(d_loss):+.4f}, "
          f"val mIoU {statistics.mean(d_miou):+.4f}; own lower loss in {sum(d < 0 for d in d_loss)} of {len(rows)}")


if __name__ == "__main__":
    main()
