"""Where the lab model's bf16 training step spends its time inside oneDNN: each primitive's time per step,
summed over the layers of one shape (batch 32, 96x128, channels_last, bf16 autocast, 2 threads; oneDNN's
verbose log of the timed steps, read in a child process so that the log does not mix with this output).

With ``--torch`` it prints torch's profiler table of the same steps instead (every aten op, the ones
outside oneDNN included).

Example:
    python experiments/train_step_primitives.py --steps 3
    python experiments/train_step_primitives.py --steps 3 --torch [--prepared]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys


def child(steps: int, torch_profile: bool, prepared: bool = False) -> None:
    import torch

    from unetseg.model import unet_model
    from unetseg.runtime import flush_denormals, prepare_model_for_training, retain_freed_memory
    from unetseg.train import make_optimizer, train_step

    torch.set_num_threads(2)
    flush_denormals()
    retain_freed_memory()
    torch.manual_seed(0)
    model = unet_model().to(memory_format=torch.channels_last).train()
    if prepared:  # as `unetseg train` prepares it (each conv + ReLU one oneDNN primitive)
        prepare_model_for_training(model, "bf16", torch.device("cpu"))
    optimizer = make_optimizer("adam", model, 1e-3)
    x = torch.rand(32, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 23, (32, 96, 128))
    cpu = torch.device("cpu")
    for _ in range(3):  # warm-up: oneDNN creates and caches its primitives
        train_step(model, optimizer, x, y, "bf16", cpu)
    if torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(model, optimizer, x, y, "bf16", cpu)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
        return
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        for _ in range(steps):
            train_step(model, optimizer, x, y, "bf16", cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--torch", action="store_true", help="torch's profiler table instead of oneDNN's log")
    ap.add_argument("--prepared", action="store_true",
                    help="the model as `unetseg train` prepares it (runtime.prepare_model_for_training)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or args.torch:
        child(args.steps, args.torch, args.prepared)
        return
    out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)]
                         + (["--prepared"] if args.prepared else []), env=dict(os.environ),
                         capture_output=True, text=True, check=True).stdout
    per_step: dict[tuple[str, str, str, str], float] = collections.defaultdict(float)
    for line in out.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line:
            f = line.split(",")  # onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,PROP,...,SHAPE,MS
            per_step[(f[5], f[7], f[6], f[-2])] += float(f[-1]) / args.steps
    print(f"oneDNN per training step: {sum(per_step.values()):.1f} ms")
    by_kind: dict[str, float] = collections.defaultdict(float)
    for (kind, prop, _impl, _shape), ms in per_step.items():
        by_kind[f"{kind} {prop}"] += ms
    for name, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.1f} ms  {name}")
    print(f"top {args.top} primitives (summed over layers of the same shape):")
    for (kind, prop, impl, shape), ms in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {ms:8.2f} ms  {kind:13s} {prop:18s} {impl:34s} {shape}")


if __name__ == "__main__":
    main()
