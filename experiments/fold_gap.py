"""The default recipe's gain over the lab recipe on several sequence-grouped validation splits.

One split of the 542 CARLA frames holds out 6 of their 34 driving runs, and a single held-out run can
move a class's IoU by 0.3 (the rock cliff of run 007335 is Terrain, predicted as Building or not), so
one split cannot say what the recipe gains on unseen runs. This script reads ``unetseg evaluate
--json`` results of a lab-recipe and a default-recipe run per split and prints, per split and on
average, the 21-class-style mean IoU (over the classes present in that split's validation masks), the
gain, the mean over the classes holding >= 0.1 % of the validation pixels, and the per-class IoU
averaged over the splits.

Usage (each pair: lab result, default result; both runs trained with the same ``--seed``/``split_seed``)::

    python experiments/fold_gap.py runs/s7lab_eval.json:runs/s7d0_eval.json \\
        runs/f1lab_eval.json:runs/f1def_eval.json [--json OUT]

Any two results scored on the same frames pair up: ``--labels "one pass,0.6+1.0"`` names the columns of,
for example, one checkpoint evaluated with ``--scales 1`` and with ``--scales 0.6 1.0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np


def _scores(path: Path) -> dict:
    d = json.loads(path.read_text())
    cm = np.asarray(d["confusion_matrix"], dtype=np.int64)
    names = list(d["per_class_iou"])
    share = cm.sum(axis=1) / cm.sum()
    present = list(d["classes_present"])
    big = [n for n in present if share[names.index(n)] >= 1e-3]
    iou = d["per_class_iou"]
    return {
        "mean_iou": d["mean_iou"],
        "pixel_accuracy": d["pixel_accuracy"],
        "mean_iou_big": statistics.fmean(iou[n] for n in big),
        "classes_present": len(present),
        "classes_big": len(big),
        "per_class_iou": {n: iou[n] for n in present},
        "class_pixels": cm.sum(axis=1).tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="LAB_EVAL.json:DEFAULT_EVAL.json, one per split")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--labels", default="lab,default", help="names of the first and second result (lab,default)")
    args = p.parse_args()
    if "," not in args.labels:
        raise SystemExit(f"--labels {args.labels!r}: give two names separated by a comma")
    first, second = (s.strip() for s in args.labels.split(",", 1))
    rows = []
    for pair in args.pairs:
        lab_path, default_path = (Path(s) for s in pair.split(":"))
        lab, default = _scores(lab_path), _scores(default_path)
        if lab["class_pixels"] != default["class_pixels"]:
            raise SystemExit(f"{pair}: the two results count different label pixels; score both on one split")
        rows.append({"lab": lab, "default": default, "files": [str(lab_path), str(default_path)]})

    print(f"| split | classes | {first} mIoU | {second} mIoU | gain | {first} (>=0.1 % px) | {second} (>=0.1 % px) "
          "| gain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def cells(lab: dict, default: dict) -> str:
        return " | ".join(f"{lab[k]:.4f} | {default[k]:.4f} | {default[k] - lab[k]:+.4f}"
                          for k in ("mean_iou", "mean_iou_big"))

    for row in rows:
        lab = row["lab"]
        print(f"| {Path(row['files'][1]).stem} | {lab['classes_present']} ({lab['classes_big']}) "
              f"| {cells(lab, row['default'])} |")
    mean = {k: {key: statistics.fmean(r[k][key] for r in rows) for key in ("mean_iou", "mean_iou_big")}
            for k in ("lab", "default")}
    print(f"| mean of {len(rows)} | | {cells(mean['lab'], mean['default'])} |")

    classes = list(dict.fromkeys(n for r in rows for n in r["lab"]["per_class_iou"]))  # first-seen order
    print(f"\n| class | splits present | {first} IoU (mean) | {second} IoU (mean) | gain |")
    print("|---|---:|---:|---:|---:|")
    for n in classes:
        held = [r for r in rows if n in r["lab"]["per_class_iou"]]
        a = statistics.fmean(r["lab"]["per_class_iou"][n] for r in held)
        b = statistics.fmean(r["default"]["per_class_iou"][n] for r in held)
        print(f"| {n} | {len(held)} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"labels": {"lab": first, "default": second}, "splits": rows, "mean": mean},
                                        indent=1))


if __name__ == "__main__":
    main()
