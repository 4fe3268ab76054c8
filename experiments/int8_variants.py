"""int8 on a trained checkpoint: what equalizing activations, the calibration method and keeping decoder
levels in float buy, in quality and in speed, measured side by side.

For a checkpoint and its dataset it builds one int8 model (static QDQ, calibrated on training frames)
per ``--variants`` entry and scores each on the run's validation frames against fp32 eager. An entry is
``SOURCE:METHOD[:LEVELS]``: SOURCE ``plain`` (the export as is) or ``eqS`` (the export of
``equalize.equalize_activations(model, calibration frames, strength=S)``; ``eq`` is strength 1); METHOD
``minmax`` | ``percentile`` | ``entropy``; LEVELS the decoder levels kept in float
(``quantize_int8(float_levels=...)``), e.g. ``1`` or ``0-1``. Then it times each (ONNX Runtime, batch
``--batch``, at the checkpoint's input size) and the bf16 ``InferenceModel`` that predict/evaluate use,
round-robin with medians.

Example:
    python experiments/int8_variants.py --checkpoint runs/def40/best.pt --data ../shared/data/carla \\
        --variants plain:minmax eq:minmax eq:percentile eq0.5:percentile eq:minmax:1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_quality  # noqa: E402  (benchmarks/int8_quality.py: the split and the scores)

from unetseg.bench import interleaved_medians  # noqa: E402
from unetseg.equalize import equalize_activations  # noqa: E402
from unetseg.export import OnnxPredictor, export_onnx, quantize_int8  # noqa: E402
from unetseg.runtime import prepare_model_for_inference, set_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--calibration", type=int, default=64, help="training frames to calibrate on")
    ap.add_argument("--variants", nargs="+", default=["plain:minmax", "eq:minmax", "eq:percentile"])
    ap.add_argument("--percentile", type=float, default=99.999)
    ap.add_argument("--batch", type=int, default=8, help="frames per timed call")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (0: no timing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the scores and speeds here")
    args = ap.parse_args()
    set_threads(args.threads)
    ckpt = Path(args.checkpoint)
    r = int8_quality.load_run(ckpt, args.data)
    state, model, size, n_classes, images, masks = r.state, r.model, r.size, r.n_classes, r.images, r.masks
    # Spread over the training runs, as export.calibration_frames draws them.
    pick = torch.randperm(len(r.train_images), generator=torch.Generator().manual_seed(0))[: args.calibration]
    calib = r.train_images[sorted(pick.tolist())]

    def predict(fn: object) -> torch.Tensor:
        return torch.cat([torch.as_tensor(fn(images[i : i + 16])).argmax(1) for i in range(0, len(images), 16)])

    with torch.inference_mode():
        ref = predict(model)
    fp32 = int8_quality._score(ref, masks, ref, n_classes)
    print(f"{ckpt}: {len(images)} validation frames at {size}, int8 calibrated on {len(calib)} training frames")
    print(f"  {'fp32 eager':32s} mIoU {fp32['miou']:6.2f} %")
    results: dict[str, dict] = {"fp32 eager": fp32}
    predictors: dict[str, OnnxPredictor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"plain": export_onnx(model, Path(tmp) / "plain.onnx", input_size=size)}
        for k, name in enumerate(args.variants):
            source, method, *rest = name.split(":")
            if source not in sources:  # eq (strength 1) or eqS, e.g. eq0.5
                strength = float(source[2:] or 1)
                sources[source] = export_onnx(equalize_activations(model, calib, strength=strength),
                                              Path(tmp) / f"{source}.onnx", input_size=size)
            levels = [int(v) for v in rest[0].split("-")] if rest else []
            t0 = time.perf_counter()
            q = quantize_int8(sources[source], calib, Path(tmp) / f"q{k}.onnx", method=method,
                              percentile=args.percentile, float_levels=levels, check_frames=0)
            seconds = time.perf_counter() - t0
            predictors[name] = OnnxPredictor(q, threads=args.threads, spin=False)
            s = int8_quality._score(predict(predictors[name]), masks, ref, n_classes)
            results[name] = {**s, "miou_loss_points": fp32["miou"] - s["miou"], "quantize_seconds": seconds}
            print(f"  {name:32s} mIoU {s['miou']:6.2f} %  ({fp32['miou'] - s['miou']:+.2f} lost)  agreement with "
                  f"fp32 {s['agreement_with_fp32']:6.2f} %  (quantized in {seconds:.0f} s)", flush=True)
        if args.rounds > 0:  # --rounds 0: scores only (timing is meaningless while the machine is busy)
            fast = prepare_model_for_inference(model, "auto", "cpu")
            x = images[: args.batch]
            fns = {name: (lambda p=p: p.run_numpy(x.numpy())) for name, p in predictors.items()}
            bf16_name = f"InferenceModel {fast.precision}"
            fns[bf16_name] = lambda: fast(x)
            medians = interleaved_medians(fns, rounds=args.rounds, warmup=1, settle_s=0.25)
            print(f"speed, batch {args.batch} at {size}, median of {args.rounds} round-robin rounds:")
            for name, t in medians.items():
                print(f"  {name:32s} {args.batch / t:7.1f} img/s  ({medians[bf16_name] / t:.2f}x {bf16_name})")
                results.setdefault(name, {})["images_per_s"] = args.batch / t
    if args.json:
        meta = {"checkpoint": str(ckpt), "epoch": state.get("epoch"), "val_frames": len(images),
                "calibration_frames": len(calib), "percentile": args.percentile, "batch": args.batch,
                "rounds": args.rounds, "threads": args.threads}
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
