"""A Keras-style layer table for any unetseg model or block.

Shapes are printed NHWC as Keras prints them (``(None, 96, 128, 32)``), although the model runs NCHW.
Shapes are traced on the ``meta`` device, so even the paper's 572x572 network is summarised instantly.

Example:
    >>> from unetseg.model import unet_model
    >>> from unetseg.summary import layer_table, format_table
    >>> rows = layer_table(unet_model(), (96, 128, 3))
    >>> rows[1].lab_row()
    ['Conv2D', (None, 96, 128, 32), 896, 'same', 'relu', 'HeNormal']
    >>> print(format_table(rows).splitlines()[-3])
    Total params: 8,640,471
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .model import Concatenate

__all__ = ["LayerRow", "layer_table", "format_table", "model_summary"]

_KERAS_TYPE = {
    nn.Conv2d: "Conv2D",
    nn.ConvTranspose2d: "Conv2DTranspose",
    nn.MaxPool2d: "MaxPooling2D",
    nn.Dropout: "Dropout",
    nn.BatchNorm2d: "BatchNormalization",
    Concatenate: "Concatenate",
}


@dataclass
class LayerRow:
    """One row of the table: ``shape`` is NHWC with ``None`` for the batch."""

    name: str
    type: str
    shape: tuple
    params: int
    padding: str = ""
    activation: str = ""
    initializer: str = ""
    extra: Any = None  # dropout rate or pool size, as the lab's comparator prints them

    def lab_row(self) -> list:
        """The row as the lab's ``summary()`` helper lists it.

        For example ``['Conv2D', (None, 96, 128, 32), 896, 'same', 'relu', 'HeNormal']``.
        """
        if self.type == "InputLayer":
            return [self.type, [self.shape], 0]
        if self.type in ("Conv2D",):
            return [self.type, self.shape, self.params, self.padding, self.activation, self.initializer]
        if self.type in ("Dropout", "MaxPooling2D"):
            return [self.type, self.shape, self.params, self.extra]
        return [self.type, self.shape, self.params]


def _nhwc(shape: Sequence[int]) -> tuple:
    n, c, *spatial = shape
    return (None, *spatial, c)


def layer_table(module: nn.Module, *input_sizes: Sequence[int]) -> list[LayerRow]:
    """Trace ``module`` on inputs of the given ``(H, W, C)`` sizes and return its layer rows.

    Pass one size per forward argument (two for an ``UpsamplingBlock``: expansive, contractive).
    Raises whatever the module raises for an invalid size (``UnetsegError`` for the U-Nets).
    """
    meta = copy.deepcopy(module).to("meta").eval()
    names = {m: n for n, m in meta.named_modules()}
    rows = [
        LayerRow(f"input_{i + 1}", "InputLayer", (None, *map(int, s)), 0) for i, s in enumerate(input_sizes)
    ]
    traced: list[tuple[nn.Module, tuple]] = []

    def hook(mod: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        traced.append((mod, tuple(output.shape)))

    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (*_KERAS_TYPE, nn.ReLU))]
    try:
        with torch.no_grad():
            meta(*(torch.empty(1, s[2], s[0], s[1], device="meta") for s in input_sizes))
    finally:
        for h in handles:
            h.remove()

    for i, (mod, shape) in enumerate(traced):
        if isinstance(mod, nn.ReLU):
            continue  # folded into the conv row, as Keras' activation='relu' does
        kind = next(v for k, v in _KERAS_TYPE.items() if isinstance(mod, k))
        row = LayerRow(names[mod], kind, _nhwc(shape), sum(p.numel() for p in mod.parameters(recurse=False)))
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            row.padding = getattr(mod, "keras_padding", "")
            row.initializer = getattr(mod, "keras_init", "")
            nxt = [type(m) for m, _ in traced[i + 1 : i + 3]]
            relu = nxt[:1] == [nn.ReLU] or nxt == [nn.BatchNorm2d, nn.ReLU]
            row.activation = "relu" if relu else "linear"
        elif isinstance(mod, nn.Dropout):
            row.extra = mod.p
        elif isinstance(mod, nn.MaxPool2d):
            k = mod.kernel_size
            row.extra = k if isinstance(k, tuple) else (k, k)
        rows.append(row)
    return rows


def format_table(rows: list[LayerRow], trainable: int | None = None) -> str:
    """Render rows as a Keras-style text table followed by total/trainable parameter counts."""
    header = ("Layer (type)", "Output Shape", "Param #", "Padding", "Activation", "Initializer")
    body = [
        (
            f"{r.name} ({r.type})",
            str(r.shape),
            f"{r.params:,}",
            r.padding or (str(r.extra) if r.extra is not None else ""),
            r.activation,
            r.initializer,
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "=" * (sum(widths) + 2 * (len(widths) - 1))
    total = sum(r.params for r in rows)
    trainable = total if trainable is None else trainable
    out = [rule, line.format(*header), rule, *(line.format(*b).rstrip() for b in body), rule]
    out += [
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
    ]
    return "\n".join(out)


def model_summary(model: nn.Module, input_size: Sequence[int]) -> str:
    """The whole table for a one-input model and an ``(H, W, C)`` input size."""
    rows = layer_table(model, input_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Parameters only: BatchNorm running statistics are buffers here (Keras would list them as non-trainable).
    return format_table(rows, trainable)
