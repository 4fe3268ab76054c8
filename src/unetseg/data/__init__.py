"""Datasets: folder layouts, in-memory loading with a decode-once cache, sequence splits, augmentation
and the ``data check`` report.

Example:
    >>> from unetseg.data import load_dataset, split_by_sequence, augment_batch
    >>> data = load_dataset("data/carla", size=(96, 128), cache_dir=".cache")  # doctest: +SKIP
    >>> split = split_by_sequence(data.names, val_fraction=0.2, seed=0)       # doctest: +SKIP
    >>> train, val = data.subset(split.train), data.subset(split.val)         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .augment import augment_batch, class_mix, jitter_colors, rare_class_centers, rare_paste
from .check import CheckReport, check_folder
from .dataset import RESIZE_MODES, SegmentationData, load_dataset, nearest_indices, resize_image, resize_mask
from .layouts import (
    LAYOUT_CHOICES,
    LAYOUTS,
    Pair,
    Palette,
    Scan,
    detect_layout,
    find_pairs,
    list_images,
    load_palette,
    read_image,
    read_mask,
    scan_folder,
)
from .split import Split, sequence_groups, split_by_sequence

__all__ = [
    "LAYOUTS", "LAYOUT_CHOICES", "RESIZE_MODES", "CheckReport", "Pair", "Palette", "Scan",
    "SegmentationData", "Split", "augment_batch", "check_folder", "class_mix", "detect_layout", "find_pairs",
    "jitter_colors", "list_images", "load_dataset", "load_palette", "nearest_indices", "read_image",
    "rare_class_centers", "rare_paste", "read_mask", "resize_image", "resize_mask", "scan_folder", "sequence_groups",
    "split_by_sequence",
    "synth_dataset",
]


def __getattr__(name: str) -> Any:
    # synth.py is written separately and imports more; load it only when asked for.
    if name == "synth_dataset":
        from .synth import synth_dataset

        return synth_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
