"""Why int8 inference loses accuracy on a checkpoint, and what keeping parts of it in float recovers.

For a trained checkpoint and its dataset, this prints (1) the range of every ReLU / concatenation / pool
output on a few training frames: its max against its 99th and 99.99th percentiles (ONNX Runtime's static
int8 uses one uint8 scale per tensor, max / 255 with MinMax calibration, so a tensor whose max is 100x its
99th percentile keeps only a few levels for almost all of its values), and (2) the validation mIoU of
int8 variants, each against fp32 eager on the run's validation frames:

  qdq            what ``export.quantize_int8`` makes (QDQ on every quantizable op; logits conv in float)
  qdq, every conv in float   the same with no conv quantized: what the QDQ pairs around pools,
                 concatenations and reshapes cost alone
  conv-only      only the convs quantized (no QDQ around pools, concatenations, reshapes)
  conv-only, decoder levels 1-2 in float   ... and the six convs of the two deepest decoder levels
                 (the 1/8 and 1/4 resolution ones) kept in float
  qdq, decoder levels 1-2 in float
  qdq, channels equalized    each conv -> ReLU -> single consumer link rescaled per channel (the ReLU
                 output's channel c divided by s_c, the consumer's input weights for c multiplied by it,
                 exact in float) so that every channel's max on the calibration frames becomes the
                 tensor's max (cross-layer equalization driven by activation ranges): helps only if the
                 tails sit in a few channels rather than at a few pixels

For the lab architecture at depth 4 (the graph order of its 24 convs is assumed).

Example:
    python experiments/int8_sensitivity.py --checkpoint runs/def40/best.pt --data ../shared/data/carla
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_quality  # noqa: E402  (benchmarks/int8_quality.py: the split and the scores)

from unetseg.export import OnnxPredictor, export_onnx, quantize_int8  # noqa: E402
from unetseg.model import Concatenate  # noqa: E402
from unetseg.runtime import set_threads  # noqa: E402


@contextlib.contextmanager
def quantize_static_options(exclude: list[str], op_types: list[str] | None) -> Iterator[None]:
    """Pass extra options to ONNX Runtime's ``quantize_static`` as ``export.quantize_int8`` calls it."""
    import onnxruntime.quantization as oq

    original = oq.quantize_static

    def patched(*args: Any, **kwargs: Any) -> Any:
        kwargs["nodes_to_exclude"] = list(kwargs.get("nodes_to_exclude") or []) + exclude
        if op_types:
            kwargs["op_types_to_quantize"] = op_types
        return original(*args, **kwargs)

    oq.quantize_static = patched
    try:
        yield
    finally:
        oq.quantize_static = original


def activation_ranges(model: torch.nn.Module, frames: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """(name, max, 99th, 99.99th percentile) of each ReLU, concatenation and pool output on ``frames``."""
    rows: list[tuple[str, float, float, float]] = []
    gen = torch.Generator().manual_seed(0)

    def hook(name: str) -> Any:
        def record(_m: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
            v = out.detach().float().flatten()
            sample = v[torch.randperm(v.numel(), generator=gen)[:1_000_000]]
            q = torch.quantile(sample, torch.tensor([0.99, 0.9999]))
            rows.append((name, v.max().item(), q[0].item(), q[1].item()))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.ReLU | torch.nn.MaxPool2d | Concatenate)]
    with torch.inference_mode():
        model(frames)
    for h in handles:
        h.remove()
    return rows


def _single_consumer_links(model: torch.nn.Module) -> list[tuple[Any, Any, Any, str]]:
    """(producer conv, its ReLU, consumer, consumer kind) of the lab U-Net where one layer alone reads the
    ReLU's output: inside each double conv, the bottleneck into the first up-conv, each decoder level
    into the next up-conv, and the last level into conv9."""
    links = [(b.convs[0], b.convs[1], b.convs[2], "conv") for b in [*model.encoder, *model.decoder]]
    links.append((model.encoder[-1].convs[2], model.encoder[-1].convs[3], model.decoder[0].up, "deconv"))
    for a, b in zip(model.decoder, model.decoder[1:], strict=False):
        links.append((a.convs[2], a.convs[3], b.up, "deconv"))
    links.append((model.decoder[-1].convs[2], model.decoder[-1].convs[3], model.conv9, "conv"))
    return links


def equalize_channels(model: torch.nn.Module, frames: torch.Tensor) -> torch.nn.Module:
    """A copy of the lab U-Net with each single-consumer ReLU output's channels scaled to one max."""
    model = copy.deepcopy(model)
    links = _single_consumer_links(model)
    maxima: dict[int, torch.Tensor] = {}
    handles = [
        relu.register_forward_hook(lambda _m, _i, o, k=k: maxima.__setitem__(k, o.detach().float().amax((0, 2, 3))))
        for k, (_, relu, _, _) in enumerate(links)
    ]
    with torch.inference_mode():
        model(frames)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for k, (producer, _, consumer, kind) in enumerate(links):
            cmax = maxima[k]
            s = torch.where(cmax > 0, cmax / cmax.max(), torch.ones_like(cmax)).clamp_min(1e-4)
            producer.weight.div_(s.view(-1, 1, 1, 1))
            producer.bias.div_(s)
            # Conv2d weights are (out, in, k, k); ConvTranspose2d weights (in, out, k, k).
            consumer.weight.mul_(s.view(1, -1, 1, 1) if kind == "conv" else s.view(-1, 1, 1, 1))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--calibration", type=int, default=64, help="training frames to calibrate int8 on")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    ckpt = Path(args.checkpoint)
    r = int8_quality.load_run(ckpt, args.data)
    model, size, n_classes, images, masks = r.model, r.size, r.n_classes, r.images, r.masks
    calib = r.train_images[: args.calibration]

    print(f"activation ranges on 16 training frames of {ckpt}:")
    for name, mx, p99, p9999 in activation_ranges(model, calib[:16].float() / 255):
        print(f"  {name:24s} max {mx:8.2f}  p99 {p99:8.3f}  p99.99 {p9999:8.2f}  max/p99 {mx / max(p99, 1e-6):7.1f}")

    def predict(fn: Any) -> torch.Tensor:
        return torch.cat([torch.as_tensor(fn(images[i : i + 16])).argmax(1) for i in range(0, len(images), 16)])

    with torch.inference_mode():
        ref = predict(model)
    print(f"\nvalidation ({len(images)} frames), int8 calibrated on {len(calib)} training frames (MinMax):")
    print(f"  {'fp32 eager':44s} mIoU {int8_quality._score(ref, masks, ref, n_classes)['miou']:6.2f} %")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "m.onnx", input_size=size, rewrite_transposed=True)
        import onnx

        convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
        # graph order: 10 encoder convs, then per decoder level its up-conv and two convs, conv9, head
        deep_decoder = convs[10:16]
        variants = {
            "qdq": ([], None),
            "qdq, every conv in float": (convs, None),
            "conv-only": ([], ["Conv"]),
            "conv-only, decoder levels 1-2 in float": (deep_decoder, ["Conv"]),
            "qdq, decoder levels 1-2 in float": (deep_decoder, None),
        }
        for name, (exclude, op_types) in variants.items():
            with quantize_static_options(exclude, op_types):
                q = quantize_int8(fp32, calib, Path(tmp) / "q.onnx", check_frames=0)
            s = int8_quality._score(predict(OnnxPredictor(q, threads=args.threads)), masks, ref, n_classes)
            print(f"  {name:44s} mIoU {s['miou']:6.2f} %  agreement with fp32 {s['agreement_with_fp32']:6.2f} %")
        equalized = equalize_channels(model, calib[:16].float() / 255)
        with torch.inference_mode():
            same = (predict(equalized) == ref).float().mean().item()
        fp32_eq = export_onnx(equalized, Path(tmp) / "eq.onnx", input_size=size, rewrite_transposed=True)
        q = quantize_int8(fp32_eq, calib, Path(tmp) / "q.onnx", check_frames=0)
        s = int8_quality._score(predict(OnnxPredictor(q, threads=args.threads)), masks, ref, n_classes)
        print(f"  {'qdq, channels equalized':44s} mIoU {s['miou']:6.2f} %  agreement with fp32 "
              f"{s['agreement_with_fp32']:6.2f} %  (float model after equalizing: {100 * same:.2f} % agreement)")


if __name__ == "__main__":
    main()
