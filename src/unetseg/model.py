"""U-Net models: the DeepLearning.AI lab's network and the original 2015 paper's.

Tensors are NCHW: images ``(N, C, H, W)`` float, logits ``(N, n_classes, H', W')``.

* ``unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23)`` is the lab's Exercise 3 exactly:
  'same' 3x3 convs with ReLU and He-normal init, dropout 0.3 on the last two encoder blocks, 3x3
  stride-2 transposed convs, concatenation ``[up, skip]``, a 3x3 ``conv9`` and a 1x1 ``conv10`` head
  that outputs logits. 8,640,471 parameters.
* ``PaperUNet`` is Ronneberger et al. (2015): unpadded 3x3 convs, 2x2 up-convolutions,
  crop-and-concatenate skips, 64 base filters, 23 conv layers; 572x572x1 in -> 388x388 out.
* ``build_model("lab" | "paper", **options)`` builds either.

Example:
    >>> import torch
    >>> from unetseg.model import unet_model, build_model
    >>> net = unet_model()                       # the lab's model
    >>> sum(p.numel() for p in net.parameters())
    8640471
    >>> net(torch.zeros(1, 3, 96, 128)).shape
    torch.Size([1, 23, 96, 128])
    >>> build_model("paper", n_classes=2, in_channels=1)(torch.zeros(1, 1, 572, 572)).shape
    torch.Size([1, 2, 388, 388])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnetsegError

__all__ = [
    "ConvBlock",
    "UpsamplingBlock",
    "UNet",
    "PaperUNet",
    "conv_block",
    "upsampling_block",
    "unet_model",
    "build_model",
    "model_from_config",
    "fold_batch_norm",
    "check_lab_size",
    "paper_output_size",
    "valid_paper_sizes",
    "count_parameters",
    "count_conv_layers",
    "forward_full",
]

# TF draws He-normal from a normal truncated at 2 sigma and divides sigma by this constant (the std of a
# standard normal truncated to [-2, 2]) so the final std is exactly sqrt(2 / fan_in).
_TRUNC_STD = 0.87962566103423978


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras ``HeNormal``: truncated normal (±2σ) whose final std is ``sqrt(2 / fan_in)``."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / fan_in) / _TRUNC_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _conv(cin: int, cout: int, k: int, padding: str, init: str = "HeNormal", bias: bool = True) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=1 if (padding == "same" and k == 3) else 0, bias=bias)
    if init == "HeNormal":
        he_normal_(conv.weight)
    else:  # Keras' default for a Conv2D without kernel_initializer (the lab's conv10)
        nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    # Read by the Keras-style summary.
    conv.keras_padding, conv.keras_init = padding, init
    return conv


def _double_conv(cin: int, cout: int, padding: str, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(_conv(c, cout, 3, padding, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Concatenate(nn.Module):
    """``torch.cat`` on channels, as a module so it shows in the layer table (Keras ``Concatenate``)."""

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([up, skip], dim=1)


def transposed_conv_weight_grad(x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """Weight gradient ``(C_in, C_out, 3, 3)`` of :class:`ConvTranspose2dSame`'s 3x3 stride-2 op.

    ``x``: the layer's input ``(N, C_in, H, W)``; ``padded``: its output gradient ``(N, C_out, 2H, 2W)``
    padded by one zero row and column at the end. Output pixel ``o = 2i + k`` gathers input ``i`` through
    tap ``k``, so ``grad_W[:, :, kh, kw] = x^T · padded[kh::2, kw::2]``: the nine taps as one GEMM.
    """
    n, c_in, h, w = x.shape
    c_out = padded.shape[1]
    # The nine taps as one strided view (N, H, W, kh, kw, C_out) of the padded gradient, copied once into
    # GEMM rows: torch.stack of nine strided slices took ~1.5x as long.
    p = padded.permute(0, 2, 3, 1)
    sn, sh, sw, sc = p.stride()
    taps = p.as_strided((n, h, w, 3, 3, c_out), (sn, 2 * sh, 2 * sw, sh, sw, sc), p.storage_offset())
    g = taps.reshape(n * h * w, 9 * c_out)  # (pixels, (kh, kw, C_out))
    x_rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in)  # a view for channels_last x
    return (x_rows.t() @ g).view(c_in, 3, 3, c_out).permute(0, 3, 1, 2).contiguous()


@functools.cache
def wgrad_onednn_min_taps_bytes() -> float:
    """Above this many bytes of taps, ``_TransposedConvSameCPU`` takes its weight gradient from oneDNN.

    On an AMX CPU oneDNN's backward-weights of the equivalent stride-2 conv beat the taps GEMM on the
    upper two decoder layers (lab step: 6.4 -> 3.8 and 13.4 -> 4.5 ms; taps 27 and 54 MiB) and lose at the
    bottleneck (3.8 vs 7.8 ms at 6.8 MiB): with 8 MiB, the lab step ran 1.03x and the default recipe's
    1.02x faster (``experiments/transposed_wgrad.py``, ``benchmarks/train_step_ab.py --set wgrad``;
    BENCHMARKS.md, session 15). On an AVX512-BF16 CPU without AMX, oneDNN for the largest layer alone did not
    speed up the whole step (session 12), so the taps GEMM stays there.
    """
    from .runtime import cpu_has_amx  # runtime imports this module

    return 8 * 2**20 if cpu_has_amx() else math.inf


class _TransposedConvSameCPU(torch.autograd.Function):
    """``ConvTranspose2dSame``'s op with a faster backward for CPU training; forward and gradients unchanged.

    oneDNN computes a strided transposed conv's weight gradient with a generic kernel: on an AVX512-BF16
    CPU it ran at 15-35 % of the bf16 peak, 78 ms of the lab model's ~850 ms training step (batch 32,
    bf16) for 4 layers holding 9 % of its FLOPs, and the crop's backward writes a zero-padded copy of each
    output gradient. This backward made the whole step 1.07-1.14x faster (benchmarks/train_step_ab.py). Output
    pixel ``o = 2i + k`` gathers input ``i`` through tap ``k``, so with the output gradient ``g`` padded by
    one zero row/column: ``grad_x = conv2d(g, W, stride=2)`` and ``grad_W[:, :, kh, kw] = x^T · g[kh::2,
    kw::2]``, the nine taps as one GEMM over all pixels. Training converges as with oneDNN's backward: 14
    paired 10-epoch runs on generated scenes ended 0.008 lower in training loss and equal in val mIoU on
    average (experiments/deconv_convergence.py; BENCHMARKS.md, session 5).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        h, w = x.shape[-2:]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.conv_transpose2d(x, weight, bias, stride=2, output_padding=1)
        return out[..., : 2 * h, : 2 * w]

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        padded = F.pad(grad_out, (0, 1, 0, 1))  # (N, C_out, 2H+1, 2W+1): tap k=2 of the last row lands outside
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(padded, weight, stride=2)
        if ctx.needs_input_grad[1]:
            taps_bytes = x.shape[0] * x.shape[2] * x.shape[3] * 9 * padded.shape[1] * padded.element_size()
            if taps_bytes > wgrad_onednn_min_taps_bytes():  # the stride-2 conv's weight gradient, in place
                grad_w = torch.ops.aten.convolution_backward(
                    x, padded, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
                )[1]
            else:
                grad_w = transposed_conv_weight_grad(x, padded)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class ConvTranspose2dSame(nn.ConvTranspose2d):
    """Keras ``Conv2DTranspose(k, strides=2, padding='same')``: ``(N, C, H, W)`` → ``(N, C', 2H, 2W)``.

    Reproduces TensorFlow's alignment (output pixel ``o`` gathers input ``i`` through tap ``k`` where
    ``o = 2i + k``): an unpadded transposed conv cropped to ``2H x 2W``. PyTorch's
    ``padding=1, output_padding=1`` is the same shape but shifted by one pixel, so Keras weights would
    not give Keras' outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=2, padding=0)
        he_normal_(self.weight)
        nn.init.zeros_(self.bias)
        self.keras_padding, self.keras_init = "same", "HeNormal"

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        weight, bias = self.weight, self.bias
        if (
            x.device.type == "cpu"
            and self.kernel_size == (3, 3)
            and torch.is_grad_enabled()
            and weight.requires_grad
            and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())
        ):
            if torch.is_autocast_enabled("cpu"):  # what autocast would do to conv_transpose2d's arguments
                dtype = torch.get_autocast_dtype("cpu")
                x, weight = x.to(dtype), weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            return _TransposedConvSameCPU.apply(x, weight, bias)
        # output_padding=1 makes the uncropped output 2H+2 instead of 2H+1: the extra row/column is
        # cropped away with the other one, so the values are the same, but oneDNN's strided bf16
        # deconvolution kernel is 8-30x slower on odd output sizes (measured on an AVX512-BF16 CPU), which
        # made these 4 layers (9 % of the FLOPs) about half of the lab model's bf16 forward time.
        out = F.conv_transpose2d(x, weight, bias, stride=self.stride, output_padding=1)
        return out[..., : 2 * h, : 2 * w]


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``torch.rand`` (a uniform draw below ``1 - p``).

    The same distribution and scaling as ``nn.Dropout``; on CPU, ``bernoulli_`` draws its numbers one by
    one and took 2 % of the lab model's training step, ``torch.rand`` is vectorised and ~3.5x faster.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        keep = torch.rand(x.shape, device=x.device) < (1 - self.p)
        return torch.where(keep, x * (1 / (1 - self.p)), 0)


class ConvBlock(nn.Module):
    """The lab's ``conv_block``: two 3x3 convs + ReLU, optional dropout, optional 2x2 max-pool.

    ``forward(x)`` returns ``(next_layer, skip_connection)``: the skip is taken after dropout and before
    pooling; without pooling both are the same tensor. Input ``(N, C_in, H, W)``; skip
    ``(N, n_filters, H, W)``; next ``(N, n_filters, H/2, W/2)`` when pooling.
    """

    def __init__(
        self,
        in_channels: int,
        n_filters: int = 32,
        dropout_prob: float = 0.0,
        max_pooling: bool = True,
        padding: str = "same",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.convs = _double_conv(in_channels, n_filters, padding, batch_norm)
        self.dropout = Dropout(dropout_prob) if dropout_prob > 0 else None
        self.pool = nn.MaxPool2d(2) if max_pooling else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.convs(x)
        if self.dropout is not None:
            skip = self.dropout(skip)
        return (self.pool(skip) if self.pool is not None else skip), skip


class UpsamplingBlock(nn.Module):
    """The lab's ``upsampling_block``: 3x3 stride-2 'same' transposed conv, ``cat([up, skip])``, two convs.

    ``forward(expansive_input (N, C_e, H, W), contractive_input (N, C_c, 2H, 2W))`` →
    ``(N, n_filters, 2H, 2W)``.
    """

    def __init__(
        self, expansive_channels: int, contractive_channels: int, n_filters: int = 32, batch_norm: bool = False
    ) -> None:
        super().__init__()
        self.up = ConvTranspose2dSame(expansive_channels, n_filters, 3)
        self.merge = Concatenate()
        self.convs = _double_conv(n_filters + contractive_channels, n_filters, "same", batch_norm)

    def forward(self, expansive_input: torch.Tensor, contractive_input: torch.Tensor) -> torch.Tensor:
        return self.convs(self.merge(self.up(expansive_input), contractive_input))


def conv_block(
    in_channels: int, n_filters: int = 32, dropout_prob: float = 0.0, max_pooling: bool = True
) -> ConvBlock:
    """The lab's ``conv_block(inputs, n_filters, dropout_prob, max_pooling)`` as a module."""
    return ConvBlock(in_channels, n_filters, dropout_prob, max_pooling)


def upsampling_block(expansive_channels: int, contractive_channels: int, n_filters: int = 32) -> UpsamplingBlock:
    """The lab's ``upsampling_block(expansive_input, contractive_input, n_filters)`` as a module."""
    return UpsamplingBlock(expansive_channels, contractive_channels, n_filters)


def check_lab_size(height: int, width: int, depth: int = 4) -> None:
    """Raise ``UnetsegError`` unless both sides divide by ``2**depth`` (naming the nearest valid sizes)."""
    m = 2**depth
    for name, v in (("height", height), ("width", width)):
        if v < m or v % m:
            lo, hi = max(m, v // m * m), (v // m + 1) * m
            options = f"{lo} or {hi}" if lo != hi and lo < v else f"{hi}"
            raise UnetsegError(f"{name} {v} is not divisible by {m} (the lab U-Net pools {depth} times); use {options}")


class UNet(nn.Module):
    """The lab's U-Net (``'same'`` padding): output logits have the input's height and width.

    Encoder: ``depth + 1`` conv blocks with ``n_filters * 2**i`` filters; the last two get dropout, the
    last one no pooling. Decoder: ``depth`` upsampling blocks from the matching skips, then ``conv9``
    (3x3, ReLU) and ``conv10`` (1x1, logits). Input ``(N, in_channels, H, W)``, H and W divisible by
    ``2**depth``; output ``(N, n_classes, H, W)``.
    """

    arch = "lab"

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 23,
        n_filters: int = 32,
        depth: int = 4,
        dropout: float = 0.3,
        batch_norm: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise UnetsegError(f"depth {depth} must be at least 1")
        self.config = dict(
            arch="lab", in_channels=in_channels, n_classes=n_classes, base_filters=n_filters, depth=depth,
            dropout=dropout, batch_norm=batch_norm,
        )
        self.depth = depth
        self.input_size = input_size
        if input_size is not None:
            check_lab_size(*input_size, depth=depth)
        chans = [n_filters * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(chans):
            self.encoder.append(
                ConvBlock(cin, c, dropout if i >= depth - 1 else 0.0, max_pooling=i < depth, batch_norm=batch_norm)
            )
            cin = c
        self.decoder = nn.ModuleList(
            UpsamplingBlock(chans[i + 1], chans[i], chans[i], batch_norm)
            for i in reversed(range(depth))
        )
        self.conv9 = _conv(n_filters, n_filters, 3, "same")
        self.relu9 = nn.ReLU(inplace=True)
        self.conv10 = _conv(n_filters, n_classes, 1, "same", init="GlorotUniform")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            check_lab_size(x.shape[-2], x.shape[-1], self.depth)
        skips = []
        for block in self.encoder:
            x, skip = block(x)
            skips.append(skip)
        x = skips.pop()  # the bottleneck: the last block does not pool
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.conv10(self.relu9(self.conv9(x)))


def unet_model(input_size: Sequence[int] = (96, 128, 3), n_filters: int = 32, n_classes: int = 23) -> UNet:
    """The lab's ``unet_model``; ``input_size`` is ``(height, width, channels)`` as in the lab."""
    h, w, c = input_size
    return UNet(in_channels=c, n_classes=n_classes, n_filters=n_filters, input_size=(h, w))


def _paper_out(size: int, depth: int) -> tuple[int | None, str]:
    """Output side for an input side of the unpadded U-Net, or ``(None, why)``."""
    x = size
    for level in range(depth):
        x -= 4  # two unpadded 3x3 convs
        if x <= 0 or x % 2:
            return None, f"level {level + 1} reaches side {x}, which 2x2 pooling cannot halve"
        x //= 2
    x -= 4
    if x <= 0:
        return None, "the bottleneck is empty"
    for _ in range(depth):
        x = 2 * x - 4
    return (x, "") if x > 0 else (None, "the output is empty")


def paper_output_size(size: int, depth: int = 4) -> int:
    """Output side length of the unpadded (paper) U-Net for an input side length.

    Raises ``UnetsegError`` naming the nearest valid input sides when ``size`` does not fit.
    """
    out, why = _paper_out(size, depth)
    if out is None:
        options = " or ".join(f"{s} (output {_paper_out(s, depth)[0]})" for s in valid_paper_sizes(size, depth, 1))
        raise UnetsegError(f"input side {size} does not fit the unpadded U-Net ({why}); use {options}")
    return out


def valid_paper_sizes(near: int, depth: int = 4, count: int = 2) -> list[int]:
    """The valid paper-U-Net input sides closest to ``near``: up to ``count`` at or below it and ``count`` above."""
    step = 2**depth  # valid sides repeat with this period
    below = [s for s in range(near, 0, -1) if _paper_out(s, depth)[0]][:count]
    above = [s for s in range(near + 1, near + step * (count + 1) + 200) if _paper_out(s, depth)[0]][:count]
    return sorted(below + above)


class PaperUNet(nn.Module):
    """Ronneberger et al. (2015): unpadded convs, 2x2 up-convs, crop-and-concatenate, 1x1 head.

    Input ``(N, in_channels, S, S')`` with sides valid for ``paper_output_size``; output
    ``(N, n_classes, paper_output_size(S), paper_output_size(S'))``, aligned with the input's centre.
    With the defaults (depth 4, 64 filters) it has 23 conv layers: 18 3x3 convs, 4 up-convs and the head.
    """

    arch = "paper"

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        n_filters: int = 64,
        depth: int = 4,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.config = dict(
            arch="paper", in_channels=in_channels, n_classes=n_classes, base_filters=n_filters, depth=depth,
            dropout=dropout, batch_norm=batch_norm,
        )
        self.depth = depth
        chans = [n_filters * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(chans):
            # The paper puts dropout "at the end of the contracting path".
            self.encoder.append(
                ConvBlock(cin, c, dropout if i >= depth - 1 else 0.0, i < depth, "valid", batch_norm)
            )
            cin = c
        self.ups = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth)):
            up = nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
            he_normal_(up.weight)
            nn.init.zeros_(up.bias)
            up.keras_padding, up.keras_init = "valid", "HeNormal"
            self.ups.append(up)
            self.merges.append(Concatenate())
            self.decoder.append(_double_conv(2 * chans[i], chans[i], "valid", batch_norm))
        self.head = _conv(n_filters, n_classes, 1, "valid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            for side in x.shape[-2:]:
                paper_output_size(int(side), self.depth)
        skips = []
        for block in self.encoder:
            x, skip = block(x)
            skips.append(skip)
        x = skips.pop()
        for up, merge, convs in zip(self.ups, self.merges, self.decoder, strict=True):
            x = up(x)
            skip = skips.pop()
            dh, dw = (skip.shape[-2] - x.shape[-2]) // 2, (skip.shape[-1] - x.shape[-1]) // 2
            x = convs(merge(x, skip[..., dh : dh + x.shape[-2], dw : dw + x.shape[-1]]))
        return self.head(x)


def build_model(arch: str = "lab", **options: Any) -> nn.Module:
    """Build ``"lab"`` (``UNet``) or ``"paper"`` (``PaperUNet``).

    Options: ``depth``, ``base_filters`` (32 lab / 64 paper), ``dropout`` (0.3 lab / 0.0 paper),
    ``in_channels`` (3 / 1), ``n_classes`` (23 / 2), ``batch_norm`` (False: the lab and paper have none).
    """
    options = dict(options)
    if "base_filters" in options:
        options["n_filters"] = options.pop("base_filters")
    options.pop("arch", None)
    if arch == "lab":
        cls = UNet
    elif arch == "paper":
        cls = PaperUNet
    else:
        raise UnetsegError(f"unknown architecture {arch!r}; use 'lab' or 'paper'")
    try:
        return cls(**options)
    except TypeError as e:
        raise UnetsegError(f"bad model option for {arch!r}: {e}") from None


def model_from_config(config: dict) -> nn.Module:
    """Rebuild a model from ``model.config`` (as stored in checkpoints)."""
    config = dict(config)
    return build_model(config.pop("arch"), **config)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """The same network without batch norm: each eval-mode ``BatchNorm2d`` folded into the conv before it.

    A model built with ``batch_norm=True`` trains with a normalised parametrisation, but at inference each
    batch norm is a fixed per-channel affine map, ``y = g (x - mean) / sqrt(var + eps) + b``, which the conv
    before it absorbs exactly: ``w' = w * s``, ``b' = (bias - mean) * s + b`` with ``s = g / sqrt(var + eps)``.
    The result is the architecture of ``batch_norm=False`` (for the lab model, ``unet_model``'s layers and
    8,640,471 parameters), with the same outputs up to float rounding. A model without batch norm is returned
    as it is. Returns a new fp32 CPU model in eval mode; ``model`` is left untouched.

    Example:
        >>> net = build_model("lab", base_filters=4, depth=2, n_classes=5, batch_norm=True).eval()
        >>> plain = fold_batch_norm(net)
        >>> plain.config["batch_norm"], count_parameters(plain) == count_parameters(build_model(
        ...     "lab", base_filters=4, depth=2, n_classes=5))
        (False, True)
    """
    config = getattr(model, "config", None)
    if not config or not config.get("batch_norm"):
        return model
    folded = model_from_config(dict(config, batch_norm=False)).eval()
    source = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    target = folded.state_dict()
    with torch.no_grad():
        # Parameters outside the double convs (transposed convs, conv9/conv10, head) keep their names.
        for name, value in target.items():
            if name in source and source[name].shape == value.shape:
                value.copy_(source[name])
        for name, block in model.named_modules():
            if not (isinstance(block, nn.Sequential) and any(isinstance(m, nn.BatchNorm2d) for m in block)):
                continue
            layers = list(block)
            pairs = [(i, layers[i + 1]) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
            plain = [m for m in folded.get_submodule(name) if isinstance(m, nn.Conv2d)]
            if len(plain) != len(pairs) or not all(isinstance(bn, nn.BatchNorm2d) for _, bn in pairs):
                raise UnetsegError(f"{name}: not a conv + batch norm block of a unetseg U-Net: {block}")
            for conv_out, (i, bn) in zip(plain, pairs, strict=True):
                prefix = f"{name}.{i}." if name else f"{i}."
                w, bias = source[prefix + "weight"], source.get(prefix + "bias")
                bn_prefix = f"{name}.{i + 1}." if name else f"{i + 1}."
                scale = source[bn_prefix + "weight"] / torch.sqrt(source[bn_prefix + "running_var"] + bn.eps)
                bias = torch.zeros_like(scale) if bias is None else bias
                conv_out.weight.copy_(w * scale.view(-1, 1, 1, 1))
                conv_out.bias.copy_((bias - source[bn_prefix + "running_mean"]) * scale + source[bn_prefix + "bias"])
    return folded


#: Attribute names of the 1x1 logits layer: ``conv10`` of the lab U-Net, ``head`` of the paper's.
LOGITS_LAYER_NAMES = ("conv10", "head")


def logits_layer(model: nn.Module) -> nn.Conv2d:
    """The 1x1 convolution that produces the logits (see ``LOGITS_LAYER_NAMES``)."""
    layer = next((getattr(model, n) for n in LOGITS_LAYER_NAMES if hasattr(model, n)), None)
    if not isinstance(layer, nn.Conv2d):
        raise UnetsegError(f"{type(model).__name__} has no 1x1 logits layer (conv10 or head)")
    return layer


def model_from_checkpoint(state: dict) -> nn.Module:
    """The inference model of a checkpoint: weights loaded, batch norm (if trained with it) folded into the
    convs (``fold_batch_norm``), ``logit_bias`` (if any) folded into the logits layer.

    A run trained with class-weighted loss stores ``logit_bias`` ``(C,)`` = ``-prior_correction * log(weight)``:
    adding it to the logits undoes that share of the weighting's shift towards rare classes. Folding it into
    the 1x1 head's bias makes every path (eager, bf16, ONNX, int8) predict with it at no cost.
    """
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    model = fold_batch_norm(model.eval())
    bias = state.get("logit_bias")
    if bias is not None:
        head = logits_layer(model)
        bias = torch.as_tensor(bias, dtype=head.bias.dtype)
        if bias.shape != head.bias.shape:
            raise UnetsegError(f"checkpoint logit_bias has {bias.numel()} values for {head.bias.numel()} classes: "
                               "the file is inconsistent")
        with torch.no_grad():
            head.bias += bias
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_conv_layers(model: nn.Module) -> int:
    """Conv and transposed-conv layers (what the paper counts as its 23)."""
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def output_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Output ``(H', W')`` of ``model`` for an ``(H, W)`` input, or raise ``UnetsegError`` if invalid."""
    depth = getattr(model, "depth", 4)
    if getattr(model, "arch", "lab") == "paper":
        return paper_output_size(height, depth), paper_output_size(width, depth)
    check_lab_size(height, width, depth)
    return height, width


def forward_full(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` for images ``(N, 3, H, W)`` of any size.

    The lab U-Net needs sides divisible by ``2**depth`` and the paper U-Net loses a border, so the input
    is mirror-padded to the nearest size the network takes and the logits are cropped back.
    """
    h, w = images.shape[-2:]
    depth = getattr(model, "depth", 4)
    if getattr(model, "arch", "lab") == "paper":
        pads = []
        for side in (h, w):
            size = side  # the smallest valid input whose output covers the side
            while (out := _paper_out(size, depth)[0] or 0) < side:
                size += 1
            border = (size - out) // 2
            pads.append((border, size - side - border))
    else:
        m = 2**depth
        pads = [(0, -side % m) for side in (h, w)]
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
        images = F.pad(images, (left, right, top, bottom), mode=mode)
    logits = model(images)
    return logits[..., :h, :w]


def crop_like(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop the last two dims of ``target`` to ``size`` (paper U-Net labels vs. its smaller output)."""
    dh, dw = (target.shape[-2] - size[0]) // 2, (target.shape[-1] - size[1]) // 2
    return target[..., dh : dh + size[0], dw : dw + size[1]]
