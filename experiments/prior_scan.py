"""Score checkpoints' validation frames with other strengths of the prior correction (``prior_correction``).

A checkpoint trained with class-weighted cross-entropy stores ``logit_bias = -strength * log(weight)``
(``losses.prior_correction_bias``; the default recipe's strength is 0.5), which the loaded model adds to its
logits. This script predicts each validation frame once per prediction scale (the checkpoint's own
``predict_scales`` unless ``--scales`` is given), then re-scores the frames with the bias rescaled to each
strength in ``--strengths`` (the per-scale logits shifted by ``(s / stored - 1) * logit_bias``, softmax per
scale, probabilities averaged as ``--scales`` does). Prints mean IoU (over the classes present) per strength.

Usage::

    python experiments/prior_scan.py ../shared/data/carla runs/bn_s4 runs/bn_s5 --strengths 0 0.25 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scale_scan import val_frames  # experiments/ is on sys.path when a script here runs

from unetseg.metrics import confusion_matrix, mean_iou
from unetseg.predict import Predictor, load_model_file


def scan(run: str, data: str, strengths: list[float], scales: list[float] | None, threads: int | None) -> dict:
    path = Path(run)
    state = load_model_file(path / "best.pt" if path.is_dir() else path)
    stored = float(state["config"]["prior_correction"])
    if state.get("logit_bias") is None or stored == 0:
        raise SystemExit(f"{run}: no prior correction stored, nothing to rescale")
    bias = torch.as_tensor(state["logit_bias"], dtype=torch.float32).view(1, -1, 1, 1)
    scales = scales or list(state["config"]["predict_scales"])
    images, masks = val_frames(state, data)
    out_size = tuple(masks.shape[-2:])
    logits = []
    for s in scales:
        predictor = Predictor(state, threads=threads, scales=[s])
        # fp16 keeps one scale of 108 CARLA frames at ~0.4 GB
        logits.append(torch.cat([predictor.logits(images[i : i + 8], out_size).half()
                                 for i in range(0, len(images), 8)]))
    n = logits[0].shape[1]
    scores = {}
    for strength in strengths:
        shift = (strength / stored - 1) * bias
        cm = torch.zeros(n, n, dtype=torch.long)
        for i in range(0, len(images), 8):  # frame chunks keep the fp32 softmax small
            prob = sum((lg[i : i + 8].float() + shift).softmax(1) for lg in logits)
            cm += confusion_matrix(prob.argmax(1), masks[i : i + 8], n)
        scores[f"{strength:g}"] = mean_iou(cm)
    return {"run": run, "stored_strength": stored, "scales": scales, "frames": len(images), "mean_iou": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("runs", nargs="+", help="run folders (their best.pt) or checkpoint files")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--scales", type=float, nargs="+")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    for run in args.runs:
        result = scan(run, args.data, args.strengths, args.scales, args.threads)
        results.append(result)
        print(run, "  ".join(f"{k}: {v:.4f}" for k, v in result["mean_iou"].items()), flush=True)
    if len(results) > 1:
        mean = {k: float(np.mean([r["mean_iou"][k] for r in results])) for k in results[0]["mean_iou"]}
        print("mean", "  ".join(f"{k}: {v:.4f}" for k, v in mean.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
