"""unetseg: train, evaluate and run U-Net models for semantic segmentation.

Example:
    >>> import unetseg
    >>> net = unetseg.unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23)
    >>> unetseg.count_parameters(net)
    8640471

Training, evaluation and prediction: ``unetseg.train(...)``, ``unetseg.evaluate(...)``,
``unetseg.predict(...)`` (see their modules).
"""

from __future__ import annotations

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

# Eager on purpose: importing the function after its submodule rebinds ``unetseg.train`` (etc.) to the
# function, so ``unetseg.train(...)`` works while ``unetseg.train`` the module stays in sys.modules.
from .checkpoint import load_checkpoint  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .predict import predict  # noqa: E402
from .train import resume, train  # noqa: E402
