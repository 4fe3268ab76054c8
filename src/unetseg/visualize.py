"""Pictures: colourised masks, overlays, the lab's input | true | predicted triplet, training curves and
confusion matrices. Arrays are HWC uint8 RGB images and HW uint8 class-index masks.

Example:
    >>> import numpy as np
    >>> from unetseg.classes import CARLA
    >>> from unetseg.visualize import overlay
    >>> overlay(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 7, np.uint8), CARLA).shape
    (4, 4, 3)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_bytes
from .classes import ClassTable, colorize


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def overlay(image: np.ndarray, mask: np.ndarray, classes: ClassTable, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised ``mask (H, W)`` over ``image (H, W, 3)``: ``(H, W, 3)`` uint8."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask, classes).astype(np.float32)
    return blend.round().clip(0, 255).astype(np.uint8)


def save_triplet(
    image: np.ndarray, true_mask: np.ndarray | None, pred_mask: np.ndarray, classes: ClassTable, path: str | Path
) -> Path:
    """The lab's ``display([image, true mask, predicted mask])`` figure, saved as PNG."""
    plt = _pyplot()
    panels = [("Input Image", image)]
    if true_mask is not None:
        panels.append(("True Mask", colorize(true_mask, classes)))
    panels.append(("Predicted Mask", colorize(pred_mask, classes)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.set_title(title)
        ax.imshow(img)
        ax.axis("off")
    return _save(fig, path)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss, pixel accuracy and validation mIoU per epoch (the lab's accuracy plot, and more)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    validated = [r for r in history if r["val_miou"] == r["val_miou"]]  # epochs that ran validation (not NaN)
    val_epochs = [r["epoch"] for r in validated]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "accuracy"), ("Loss", "Pixel accuracy"), strict=False):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train", markersize=3)
        ax.plot(val_epochs, [r[f"val_{key}"] for r in validated], "o-", label="validation", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(val_epochs, [r["val_miou"] for r in validated], "o-", color="C2", markersize=3)
    axes[2].set_title("Validation mean IoU")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, classes: ClassTable, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class) of the classes present in truth or prediction."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    keep = np.nonzero(cm.sum(0) + cm.sum(1))[0]
    sub = cm[np.ix_(keep, keep)]
    norm = sub / np.maximum(sub.sum(1, keepdims=True), 1)
    names = [classes.names[i] if i < len(classes) else str(i) for i in keep]
    n = len(keep)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), max(4, 0.45 * n + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Confusion matrix (row-normalised)")
    return _save(fig, path, dpi=110)


def save_png(array: np.ndarray, path: str | Path, mode: str | None = None) -> Path:
    """Write an array as PNG atomically (``mode="L"`` for index masks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
