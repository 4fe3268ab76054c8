"""unetseg: train, evaluate and run U-Net models for semantic segmentation.

Example:
    >>> import unetseg
    >>> net = unetseg.unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23)
    >>> unetseg.count_parameters(net)
    8640471

Training, evaluation and prediction (``unetseg.train``, ``unetseg.evaluate``, ``unetseg.predict``) are
imported on first use so that ``import unetseg`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import UnetsegError
from .model import (
    PaperUNet,
    UNet,
    build_model,
    conv_block,
    count_conv_layers,
    count_parameters,
    unet_model,
    upsampling_block,
)
from .summary import layer_table, model_summary

__version__ = "0.1.0"
__all__ = [
    "UnetsegError", "UNet", "PaperUNet", "build_model", "conv_block", "upsampling_block", "unet_model",
    "count_parameters", "count_conv_layers", "layer_table", "model_summary", "train", "resume", "evaluate",
    "predict", "load_checkpoint",
]

_LAZY = {
    "train": ("train", "train"),
    "resume": ("train", "resume"),
    "load_checkpoint": ("checkpoint", "load_checkpoint"),
    "evaluate": ("evaluate", "evaluate"),
    "predict": ("predict", "predict"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'unetseg' has no attribute {name!r}")
