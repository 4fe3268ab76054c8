"""Score a checkpoint on a labelled folder, at the labels' own resolution.

Each frame is predicted like ``predict`` does (resized as in training, logits resized back to the mask's
size), and one confusion matrix is accumulated over the whole set; pixel accuracy, per-class IoU and the
mean IoU over the classes present in the ground truth come from it.

Example:
    >>> from unetseg import evaluate
    >>> r = evaluate("runs/demo/best.pt", "../shared/data/carla", split="val")  # doctest: +SKIP
    >>> r["mean_iou"], r["per_class_iou"]["Road"]                                # doctest: +SKIP
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import atomic_write_text
from .errors import UnetsegError
from .metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from .predict import Predictor, load_model_file


def evaluate(
    checkpoint: str | Path, data: str | Path, out_dir: str | Path | None = None, batch_size: int = 16,
    precision: str = "auto", layout: str = "auto", threads: int | None = None, split: str | None = None,
    progress: bool = True, palette: str | Path | None = None, tta: bool = False, compile: str | bool = "auto",
    scales: list[float] | None = None,
) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on the image/mask folder ``data``.

    ``split="val"`` scores only the frames the checkpoint's run held out for validation, ``split="train"``
    the other frames of ``data`` (the run's training frames when ``data`` is its training folder): the two
    side by side show how much of the training fit carries over to unseen runs; ``palette`` maps
    colour masks to class ids (as in training); ``tta`` adds mirrored-image test-time augmentation;
    ``compile`` (``auto``, ``on``, ``off``) is ``torch.compile``, by default only where the set pays for it;
    ``scales`` overrides the checkpoint's prediction scales (``[1.0]``: one pass at the training size). Returns
    ``{"pixel_accuracy", "mean_iou", "per_class_iou": {name: IoU or None}, "classes_present",
    "frames", "confusion_matrix", ...}``; with ``out_dir``, also writes ``metrics.json`` and ``confusion.png``.
    """
    from .data import find_pairs, read_image, read_mask
    from .data.layouts import palette_or_none

    state = load_model_file(checkpoint)
    pairs, found_layout = find_pairs(data, layout)
    palette = palette_or_none(palette)  # parse the file once, not per mask
    if split is not None:
        if split not in ("val", "train"):
            raise UnetsegError(f"--split {split!r}: use 'val' (the run's held-out frames) or 'train' (the others)")
        held_out = set(state.get("val_names") or [])
        if not held_out:
            raise UnetsegError(f"{checkpoint}: the checkpoint records no validation frames, so --split has "
                               f"nothing to go by; leave it out to score every frame")
        pairs = [p for p in pairs if (p.name in held_out) == (split == "val")]
        if not pairs and split == "val":
            raise UnetsegError(f"{data}: none of the checkpoint's {len(held_out)} validation frames are in this folder")
        if not pairs:
            raise UnetsegError(f"{data}: every frame here is one of the checkpoint's validation frames; "
                               f"--split train scores the others")
    predictor = Predictor(state, precision=precision, threads=threads, batch_size=batch_size, tta=tta,
                          compile=compile, n_images=len(pairs), scales=scales)
    n = predictor.n_classes
    cm = torch.zeros(n, n, dtype=torch.long)

    def load(pair: Any) -> tuple[Any, Any, Any]:
        image, mask = read_image(pair.image), read_mask(pair.mask, found_layout, palette)
        if image.shape[:2] != mask.shape:
            raise UnetsegError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {pair.image} is "
                               f"{image.shape[1]}x{image.shape[0]}")
        if mask.max() >= n:
            bad = int((mask >= n).sum())
            raise UnetsegError(f"{pair.mask}: label {int(mask.max())} is outside the checkpoint's {n} classes "
                               f"({bad} pixels)")
        return pair, image, mask

    chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        bar = tqdm(total=len(pairs), desc="evaluate", disable=not progress, leave=False)
        for loaded in pool.map(lambda chunk: [load(p) for p in chunk], chunks):
            preds = predictor.predict([im for _, im, _ in loaded])
            for (_, _, mask), pred in zip(loaded, preds, strict=True):
                cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask), n)
            bar.update(len(loaded))
        bar.close()
    result = metrics_dict(cm, predictor.classes.names)
    result.update(frames=len(pairs), checkpoint=str(checkpoint), data=str(data), split=split,
                  precision=predictor.precision, tta=tta, scales=predictor.scales)
    if out_dir is not None:
        from .visualize import plot_confusion

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        plot_confusion(cm.numpy(), predictor.classes, out / "confusion.png")
    return result


def metrics_dict(cm: torch.Tensor, names: Any) -> dict[str, Any]:
    """The JSON-ready scores of a confusion matrix ``(C, C)`` (rows: true class)."""
    ious = iou_per_class(cm)
    present = (cm.sum(1) > 0).tolist()
    return {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_iou": mean_iou(cm),
        "per_class_iou": {
            name: (None if v != v else round(float(v), 6)) for name, v in zip(names, ious.tolist(), strict=True)
        },
        "classes_present": [name for name, p in zip(names, present, strict=True) if p],
        "pixels": int(cm.sum()),
        "confusion_matrix": cm.tolist(),
    }


def format_report(result: dict[str, Any]) -> str:
    """A text report: headline scores and a per-class IoU table with class names and pixel shares."""
    cm = torch.tensor(result["confusion_matrix"])
    total = max(int(cm.sum()), 1)
    lines = [
        f"frames: {result.get('frames')}{' (' + result['split'] + ' split)' if result.get('split') else ''}"
        f"   pixels: {result['pixels']:,}",
        f"prediction: {result.get('precision')}, scales {', '.join(f'{v:g}' for v in result.get('scales') or [1.0])}"
        f"{', mirror TTA' if result.get('tta') else ''}",
        f"pixel accuracy: {result['pixel_accuracy']:.4f}",
        f"mean IoU ({len(result['classes_present'])} classes present): {result['mean_iou']:.4f}",
        "",
        f"{'id':>3}  {'class':<14} {'IoU':>7}  {'true px %':>9}",
    ]
    for i, (name, iou) in enumerate(result["per_class_iou"].items()):
        share = 100 * int(cm[i].sum()) / total
        if share == 0 and iou is None:
            continue
        shown = "   -   " if iou is None else f"{iou:7.4f}"
        lines.append(f"{i:>3}  {name:<14} {shown}  {share:9.3f}")
    return "\n".join(lines)
