"""How much an ONNX Runtime run slows the torch run right after it (why the benchmark pauses between subjects).

ONNX Runtime's intra-op threads busy-wait for a while after ``run()`` returns (its default,
``session.intra_op.allow_spinning=1``). This times the lab model's bf16 inference batch (``InferenceModel``,
batch 32) right after an ORT int8 batch, after the same followed by a 0.2 s pause, and right after another
torch batch; then the same with ORT's spinning off. Medians over ``--rounds``.

Usage: python experiments/ort_spin.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unetseg.export import OnnxPredictor, export_onnx, quantize_int8
from unetseg.model import build_model
from unetseg.runtime import InferenceModel, flush_denormals, retain_freed_memory, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    retain_freed_memory()
    flush_denormals()
    torch.manual_seed(0)
    model = build_model("lab").eval()
    x = torch.rand(32, 3, 96, 128)
    torch_path = InferenceModel(model, "bf16", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "m.onnx", input_size=(96, 128), rewrite_transposed=True)
        frames = torch.randint(0, 256, (32, 3, 96, 128), dtype=torch.uint8)
        int8 = quantize_int8(fp32, frames, Path(tmp) / "m.int8.onnx", check_frames=0)
        xn = x.numpy()
        for spin in (True, False):
            ort = OnnxPredictor(int8, threads=args.threads, spin=spin)
            ort.run_numpy(xn)
            torch_path(x)
            times: dict[str, list[float]] = {"ort": [], "after ort": [], "after ort + 0.2 s": [], "after torch": []}
            for _ in range(args.rounds):
                t = time.perf_counter()
                ort.run_numpy(xn)
                times["ort"].append(time.perf_counter() - t)
                t = time.perf_counter()
                torch_path(x)
                times["after ort"].append(time.perf_counter() - t)
                ort.run_numpy(xn)
                time.sleep(0.2)
                t = time.perf_counter()
                torch_path(x)
                times["after ort + 0.2 s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                torch_path(x)
                times["after torch"].append(time.perf_counter() - t)
            cells = ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in times.items())
            print(f"ORT spinning {'on ' if spin else 'off'}: {cells}")


if __name__ == "__main__":
    main()
