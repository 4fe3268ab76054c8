"""Does int8 inference saturate on this CPU? ONNX Runtime's fused kernels against the exact QDQ arithmetic.

On x86 without VNNI, ONNX Runtime multiplies u8 activations by s8 weights with AVX2's ``vpmaddubsw``,
which adds two u8 x s8 products into a saturating int16: full-range (8-bit) signed weights can overflow it;
7-bit weights (``reduce_range``, ONNX Runtime's remedy) cannot, and neither can unsigned 8-bit weights
(u8 x u8, widened to int16 before multiplying). This script quantizes one equalized fp32 export the three
ways, runs each int8 model twice — with ONNX Runtime's graph optimizations (fused QLinearConv kernels,
what predict runs) and with none (every DequantizeLinear -> float Conv, the QDQ graph's exact meaning) —
and reports, per setting, how far the fused result strays from the exact one and how often the top class
agrees with fp32. On a VNNI CPU every setting should show fused == exact up to rounding.

Example:
    python experiments/int8_saturation.py --checkpoint runs/lab/best.pt --data ../shared/data/carla
    python experiments/int8_saturation.py --data ../shared/data/carla      # the lab model, random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from unetseg.checkpoint import load_checkpoint
from unetseg.data import find_pairs
from unetseg.equalize import equalize_activations
from unetseg.export import FullFrame, _frames, export_onnx, quantize_int8
from unetseg.model import model_from_checkpoint, unet_model
from unetseg.runtime import cpu_has_vnni, describe


def run(path: Path, x: np.ndarray, optimize: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"images": x[i : i + 8]})[0] for i in range(0, len(x), 8)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint (default: the lab model with He-normal random weights)")
    p.add_argument("--data", required=True, help="image/mask folder for calibration and test frames")
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--frames", type=int, default=16, help="test frames (others than the calibration ones)")
    p.add_argument("--json")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    if a.checkpoint:
        state = load_checkpoint(a.checkpoint)
        model = model_from_checkpoint(state).eval()
        size = tuple(state["preprocess"]["size"])
        resize_mode = state["preprocess"].get("resize_mode", "default")
    else:
        model, size, resize_mode = unet_model().eval(), (96, 128), "default"
    pairs = find_pairs(a.data)[0][::7]  # frames spread over the runs
    calib = _frames(pairs[: a.calibration], size, resize_mode)
    test = _frames(pairs[a.calibration : a.calibration + a.frames], size, resize_mode).float().div(255).numpy()
    eq = equalize_activations(model, calib)
    out: dict = {"environment": describe(torch.device("cpu"), "fp32"), "cpu_vnni": cpu_has_vnni(),
                 "checkpoint": a.checkpoint, "size": list(size), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(FullFrame(eq), Path(tmp) / "eq.onnx", input_size=size)
        ref = run(fp32, test, True)
        top_ref = ref.argmax(1)
        settings = {"8-bit weights": (False, "int8"), "7-bit weights (reduce_range)": (True, "int8"),
                    "8-bit unsigned weights (u8 x u8)": (False, "uint8")}
        for name, (reduce_range, weight_type) in settings.items():
            q = quantize_int8(fp32, calib, Path(tmp) / f"q{int(reduce_range)}{weight_type}.onnx", check_frames=0,
                              reduce_range=reduce_range, weight_type=weight_type)
            fused, exact = run(q, test, True), run(q, test, False)
            scale = float(np.abs(exact).max())
            row = {
                "fused_vs_exact_max_abs": float(np.abs(fused - exact).max()),
                "fused_vs_exact_mean_abs": float(np.abs(fused - exact).mean()),
                "logit_range": scale,
                "fused_top1_agrees_with_exact": float((fused.argmax(1) == exact.argmax(1)).mean()),
                "fused_top1_agrees_with_fp32": float((fused.argmax(1) == top_ref).mean()),
                "exact_top1_agrees_with_fp32": float((exact.argmax(1) == top_ref).mean()),
            }
            out["settings"][name] = row
    print(f"CPU VNNI: {cpu_has_vnni()}; {len(test)} test frames at {size[0]}x{size[1]}")
    print(f"{'weights':<32}{'|fused-exact| max':>18}{'mean':>10}{'top1 fused=exact':>18}"
          f"{'fused=fp32':>12}{'exact=fp32':>12}")
    for name, r in out["settings"].items():
        print(f"{name:<32}{r['fused_vs_exact_max_abs']:>18.4f}{r['fused_vs_exact_mean_abs']:>10.5f}"
              f"{100 * r['fused_top1_agrees_with_exact']:>17.2f}%{100 * r['fused_top1_agrees_with_fp32']:>11.2f}%"
              f"{100 * r['exact_top1_agrees_with_fp32']:>11.2f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
