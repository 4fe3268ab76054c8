"""Quality of the fast inference paths against fp32 eager, on real frames with trained weights.

For a checkpoint and its dataset it scores, on the run's validation frames (``split.json`` beside the
checkpoint, else the last 20 %): fp32 eager (the reference), the bf16 ``InferenceModel`` that
predict/evaluate use, ONNX Runtime fp32, ONNX Runtime int8 (static QDQ, calibrated on training
frames) and, on x86 CPUs with VNNI, int8 through oneDNN (``int8.quantize_model``, as ``unetseg export
--int8`` writes ``model.int8.pt``). It prints mIoU, pixel accuracy and argmax agreement with fp32 for each,
and the int8 mIoU losses in points.

Example:
    python benchmarks/int8_quality.py --checkpoint runs/lab/best.pt --data ../shared/data/carla \\
        --calibration 256 --json int8_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unetseg.checkpoint import load_checkpoint
from unetseg.data import load_dataset
from unetseg.equalize import equalize_activations
from unetseg.export import OnnxPredictor, export_onnx, quantize_int8
from unetseg.int8 import onednn_int8_available, quantize_model
from unetseg.metrics import confusion_matrix, mean_iou, pixel_accuracy
from unetseg.model import model_from_checkpoint
from unetseg.runtime import InferenceModel, prepare_model_for_inference, set_threads


def _split(ckpt_path: Path, names: list[str]) -> tuple[list[int], list[int]]:
    """Indices of training and validation frames: the run's split.json, else an 80/20 cut by order."""
    split_file = ckpt_path.parent / "split.json"
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        index = {n: i for i, n in enumerate(names)}
        return [index[n] for n in split["train"] if n in index], [index[n] for n in split["val"] if n in index]
    cut = int(0.8 * len(names))
    return list(range(cut)), list(range(cut, len(names)))


@dataclass
class Run:
    """A trained run as the int8 scripts score it: its inference model (``logit_bias`` folded in, as predict
    uses it), validation frames float ``(N, 3, H, W)`` in [0, 1] with masks ``(N, H, W)`` int64, and its
    training frames uint8 ``(M, 3, H, W)`` to calibrate on, all at the checkpoint's input size."""

    state: dict[str, Any]
    model: torch.nn.Module
    size: tuple[int, int]
    n_classes: int
    images: torch.Tensor
    masks: torch.Tensor
    train_images: torch.Tensor


def load_run(checkpoint: str | Path, data_dir: str | Path) -> Run:
    """The checkpoint's run, its frames read from ``data_dir`` and split as the run split them."""
    ckpt = Path(checkpoint)
    state = load_checkpoint(ckpt)
    pre = state.get("preprocess") or {}
    size = tuple(pre.get("size") or (96, 128))
    data = load_dataset(data_dir, size=size, resize_mode=pre.get("resize_mode", "default"), progress=False)
    train_idx, val_idx = _split(ckpt, data.names)
    return Run(state=state, model=model_from_checkpoint(state).eval(), size=size,
               n_classes=int(state["model_config"]["n_classes"]), images=data.images[val_idx].float() / 255,
               masks=data.masks[val_idx].long(), train_images=data.images[train_idx])


def _score(pred: torch.Tensor, target: torch.Tensor, ref: torch.Tensor, n_classes: int) -> dict[str, float]:
    cm = confusion_matrix(pred, target, n_classes)
    return {
        "miou": 100 * mean_iou(cm),
        "pixel_accuracy": 100 * pixel_accuracy(cm),
        "agreement_with_fp32": 100 * (pred == ref).double().mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--calibration", type=int, default=256, help="training frames to calibrate int8 on")
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--threads", type=int)
    p.add_argument("--equalize", type=float, default=None, metavar="STRENGTH",
                   help="rescale activations before int8 export (equalize.equalize_activations; 0-1)")
    p.add_argument("--float-levels", default="", metavar="LEVELS",
                   help="decoder levels to keep in float, e.g. 1 or 0,1 (quantize_int8's float_levels)")
    p.add_argument("--int8-head", action="store_true", help="quantize the final 1x1 logits conv too")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args(argv)
    set_threads(args.threads)
    float_levels = [int(v) for v in args.float_levels.split(",") if v.strip()]

    ckpt_path = Path(args.checkpoint)
    r = load_run(ckpt_path, args.data)
    state, model, size, n_classes, images, masks = r.state, r.model, r.size, r.n_classes, r.images, r.masks
    calib = r.train_images[: args.calibration]

    def run(fn: Any) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        preds = [torch.as_tensor(fn(images[i : i + args.batch_size])).argmax(1)
                 for i in range(0, len(images), args.batch_size)]
        return torch.cat(preds), time.perf_counter() - t

    with torch.inference_mode():
        ref, t_ref = run(model)
    results: dict[str, Any] = {
        "checkpoint": str(ckpt_path), "epoch": state.get("epoch"), "val_frames": len(images),
        "calibration_frames": len(calib), "method": args.method, "equalize": args.equalize,
        "float_levels": float_levels, "int8_head": args.int8_head,
        "fp32_eager": {**_score(ref, masks, ref, n_classes), "seconds": t_ref},
    }
    bf16 = prepare_model_for_inference(model, "auto", "cpu")
    pred, t = run(bf16)
    results[f"inference_model_{bf16.precision}"] = {**_score(pred, masks, ref, n_classes), "seconds": t}
    if bf16.precision == "bf16":
        pred, t = run(InferenceModel(model, "bf16", torch.device("cpu"), fp32_head=True))
        results["inference_model_bf16_fp32_head"] = {**_score(pred, masks, ref, n_classes), "seconds": t}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(model, Path(tmp) / "m.onnx", input_size=size)
        pred, t = run(OnnxPredictor(fp32_path, threads=args.threads))
        results["onnx_fp32"] = {**_score(pred, masks, ref, n_classes), "seconds": t}
        t0 = time.perf_counter()
        if args.equalize is not None:
            fp32_path = export_onnx(equalize_activations(model, calib, strength=args.equalize),
                                    Path(tmp) / "eq.onnx", input_size=size)
        q = quantize_int8(fp32_path, calib, Path(tmp) / "m.int8.onnx", method=args.method,
                          keep_head_fp32=not args.int8_head, float_levels=float_levels)
        results["quantize_seconds"] = time.perf_counter() - t0
        pred, t = run(OnnxPredictor(q, threads=args.threads))
        results["onnx_int8"] = {**_score(pred, masks, ref, n_classes), "seconds": t}
    results["int8_miou_loss_points"] = results["fp32_eager"]["miou"] - results["onnx_int8"]["miou"]
    if onednn_int8_available():
        # int8 through oneDNN, as `unetseg export --int8` writes it (model.int8.pt): equalized, MinMax ranges
        t0 = time.perf_counter()
        q8 = quantize_model(model, calib)
        results["onednn_quantize_seconds"] = time.perf_counter() - t0
        pred, t = run(q8)
        results["onednn_int8"] = {**_score(pred, masks, ref, n_classes), "seconds": t}
        results["onednn_int8_miou_loss_points"] = results["fp32_eager"]["miou"] - results["onednn_int8"]["miou"]

    print(f"checkpoint {ckpt_path} (epoch {results['epoch']}), {len(images)} validation frames, "
          f"int8 calibrated on {len(calib)} training frames ({args.method})")
    print(f"{'path':<24}{'mIoU %':>9}{'pixel acc %':>13}{'agree w/ fp32 %':>17}")
    for key, r in results.items():
        if isinstance(r, dict) and "miou" in r:
            print(f"{key:<24}{r['miou']:>9.2f}{r['pixel_accuracy']:>13.2f}{r['agreement_with_fp32']:>17.3f}")
    print(f"int8 mIoU loss: {results['int8_miou_loss_points']:.2f} points (ONNX Runtime)"
          + (f", {results['onednn_int8_miou_loss_points']:.2f} points (oneDNN)" if "onednn_int8" in results else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
