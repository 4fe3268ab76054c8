"""int8 on a CPU with AMX: ONNX Runtime's weight layouts against the bf16 path, and oneDNN's own int8 conv.

On an AMX CPU oneDNN runs bf16 convs on the tile units, and ONNX Runtime's int8 model (what ``unetseg
export --int8`` writes) ran at 0.59x the toolkit's bf16 path (BENCHMARKS.md, session 15). This times,
round-robin in one process (medians, 2 threads):

* the lab model (random weights, batch 32, 96x128) through ONNX Runtime in fp32 and int8 with three
  weight layouts: signed symmetric (the export's; ONNX Runtime's symmetric-conv kernels), signed
  asymmetric and unsigned (both take its im2col + integer GEMM path instead), against
  ``runtime.InferenceModel`` in bf16;
* one 3x3 conv layer (64 -> 64 channels at 48x64, batch 32) in bf16 (oneDNN, fused ReLU) against
  PyTorch's quantized conv on the ``onednn`` engine (uint8 activations, per-channel int8 weights), which
  oneDNN may run on the int8 tile units: whether an int8 path through PyTorch would pay here.

Session 16 built that int8 path without PyTorch's quantized tensors: ``unetseg.int8`` calls oneDNN's int8
conv ops on plain uint8 tensors (the benchmark's ``onednn_int8`` mode; 567 img/s here, BENCHMARKS.md).

Example:
    python experiments/int8_amx.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def onnx_variants(rounds: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from unetseg.bench import SETTLE_S, interleaved_medians
    from unetseg.export import OnnxPredictor, export_onnx
    from unetseg.model import unet_model
    from unetseg.runtime import InferenceModel, flush_denormals, retain_freed_memory

    retain_freed_memory()  # as prepare_model_for_inference does for predict/evaluate
    flush_denormals()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = unet_model().eval()
    work = Path(tempfile.mkdtemp())
    fp32 = export_onnx(model, work / "m.onnx", input_size=(96, 128), batch=None, rewrite_transposed=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": rng.random((8, 3, 96, 128), dtype=np.float32)} for _ in range(2)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    paths = {"onnx fp32": fp32}
    for name, weights, symmetric in [("int8 signed sym", QuantType.QInt8, True),
                                     ("int8 signed asym", QuantType.QInt8, False),
                                     ("int8 unsigned", QuantType.QUInt8, False)]:
        paths[name] = work / f"{name.replace(' ', '_')}.onnx"
        quantize_static(str(fp32), str(paths[name]), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=weights, per_channel=True,
                        extra_options={"WeightSymmetric": symmetric, "ActivationSymmetric": False})
    x = rng.random((32, 3, 96, 128), dtype=np.float32)
    predictors = {name: OnnxPredictor(path, threads=2) for name, path in paths.items()}
    fns = {name: (lambda p=p: p.run_numpy(x)) for name, p in predictors.items()}
    bf16 = InferenceModel(model, "bf16", torch.device("cpu"))
    xt = torch.from_numpy(x)
    fns["torch bf16 (auto)"] = lambda: bf16(xt)
    # the pause lets ONNX Runtime's spinning threads go idle before the next subject (bench.SETTLE_S)
    medians = interleaved_medians(fns, rounds=rounds, warmup=2, settle_s=SETTLE_S)
    print("lab model, batch 32, 96x128, 2 threads, medians:")
    for name, sec in medians.items():
        print(f"  {name:20s} {32 / sec:7.1f} img/s")


def onednn_int8_layer(rounds: int) -> None:
    import torch.ao.nn.quantized as nnq

    from unetseg.bench import interleaved_medians

    torch.backends.quantized.engine = "onednn"
    torch.manual_seed(0)
    n, c, h, w = 32, 64, 48, 64
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    qconv = nnq.Conv2d(c, c, 3, padding=1)
    qw = torch.quantize_per_channel(conv.weight.detach(), conv.weight.detach().abs().amax((1, 2, 3)) / 127,
                                    torch.zeros(c, dtype=torch.long), 0, torch.qint8)
    qconv.set_weight_bias(qw, conv.bias.detach())
    qconv.scale, qconv.zero_point = 0.05, 0
    x = torch.rand(n, c, h, w)
    qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8).contiguous(memory_format=torch.channels_last)
    cl, bf = torch.channels_last, torch.bfloat16
    xb, wb, bb = x.to(bf).contiguous(memory_format=cl), conv.weight.detach().to(bf).contiguous(memory_format=cl), \
        conv.bias.detach().to(bf)
    with torch.inference_mode():
        medians = interleaved_medians({
            "bf16 conv+relu": lambda: torch.ops.mkldnn._convolution_pointwise(
                xb, wb, bb, [1, 1], [1, 1], [1, 1], 1, "relu", [], ""),
            "int8 conv (onednn)": lambda: qconv(qx),
        }, rounds=rounds, warmup=2)
    flop = 2 * n * h * w * c * c * 9
    print(f"one 3x3 conv {c}->{c} at {h}x{w}, batch {n}, medians:")
    for name, sec in medians.items():
        print(f"  {name:20s} {sec * 1e3:7.2f} ms  {flop / sec / 1e9:6.0f} GOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(2)
    onnx_variants(args.rounds)
    onednn_int8_layer(args.rounds)


if __name__ == "__main__":
    main()
