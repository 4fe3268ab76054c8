"""int8 inference through oneDNN, PyTorch's own CPU kernels: the fastest path on CPUs with AMX.

``quantize_model(model, frames)`` measures per-tensor activation ranges of a trained lab or paper U-Net on
training frames and returns an ``Int8UNet``: images float ``(N, C, H, W)`` in ``[0, 1]`` → float32 logits
``(N, n_classes, H', W')``, like the float model. Inside it

* every conv runs as oneDNN's int8 conv (``torch.ops.onednn.qconv2d_pointwise``): uint8 activations
  (asymmetric, one scale per tensor), int8 weights (symmetric, one scale per output channel), bias, ReLU
  and the requantization to the next layer's uint8 fused into it; on a CPU with AMX-INT8 oneDNN runs it
  on the tile units;
* each transposed conv is first rewritten exactly as conv + pixel shuffle
  (``export.ConvTransposeAsConvShuffle``), so it is an ordinary int8 conv too;
* activations stay uint8 from the input (``uint8 / 255`` is exact at scale 1/255) to the 1x1 head, which
  returns float32 logits: max-pooling and the pixel shuffle + concatenation only move bytes, and the up
  output and its skip are quantized with one shared range so that they can be concatenated as they are;
* batch norm, where a model has it, is folded into its conv;
* ranges are measured per input size (``quantize_model(model, [frames_1x, frames_0.6x])``): each size gets
  int8 weights packed for its own ranges, and an input runs with the nearest.

On the AMX host of session 16 this ran the lab model at 1.9x the toolkit's bf16 path and 1.9x Keras
``mixed_bfloat16`` at batch 32 (medians of four runs) and one image in 3.8 ms; on four trained checkpoints
of both recipes it lost -0.12 to 0.64 mIoU point against fp32 (BENCHMARKS.md, "Session 16"). Quantize an
``equalize.equalize_activations`` copy of the model (``quantize_model`` does by default, as ``unetseg export
--int8`` does for ONNX): it evens the channels that one per-tensor scale has to hold.

``save_int8`` / ``load_int8`` store one as the equalized float weights plus the measured ranges (a file that
``torch.load(..., weights_only=True)`` reads); ``unetseg export --int8`` writes it as ``model.int8.pt``.

Example:
    >>> import torch
    >>> from unetseg.model import build_model
    >>> from unetseg.int8 import quantize_model, onednn_int8_available
    >>> net = build_model("lab", base_filters=4, depth=2, n_classes=5).eval()
    >>> frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)   # training frames
    >>> if onednn_int8_available():
    ...     q = quantize_model(net, frames)
    ...     print(q(torch.rand(2, 3, 32, 32)).shape)
    ... else:
    ...     print(torch.Size([2, 5, 32, 32]))
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import pickle
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnetsegError
from .model import crop_like
from .runtime import cpu_has_vnni

__all__ = [
    "INT8_FORMAT",
    "Int8UNet",
    "calibrate_ranges",
    "load_int8",
    "max_pool2x2_uint8",
    "onednn_int8_available",
    "quantize_model",
    "save_int8",
]

#: ``format`` of a file written by ``save_int8``.
INT8_FORMAT = "unetseg-int8-onednn-1"

_CL = torch.channels_last


@functools.cache
def onednn_int8_available() -> bool:
    """True where PyTorch has oneDNN's int8 conv ops and the CPU multiplies int8 natively (x86 with VNNI or AMX).

    Without VNNI oneDNN's int8 kernels fall back to 16-bit pair sums that can saturate (as ONNX Runtime's do,
    ``runtime.int8_may_saturate``), so this path is not offered there."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpu_has_vnni():
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qconv_prepack")


def _require_onednn_int8() -> None:
    if not onednn_int8_available():
        raise UnetsegError(
            "oneDNN int8 inference needs an x86 CPU with VNNI or AMX and a PyTorch build with oneDNN "
            f"(this is {platform.machine()} {'with' if cpu_has_vnni() else 'without'} VNNI): use the checkpoint's "
            "float path, or the ONNX int8 model of `unetseg export --int8`"
        )


# --------------------------------------------------------------------------------------------- the float plan


@dataclass
class _Plan:
    """A U-Net as the int8 path walks it: its convs (from an fp32 copy, batch norm folded in), whether each encoder
    block pools, transposed convs rewritten as conv + pixel shuffle. ``tail``: the convs after the last decoder
    level, ReLU after all but the last (lab: ``conv9``, ``conv10``; paper: ``head``)."""

    encoder: list[tuple[nn.Conv2d, nn.Conv2d, bool]]
    decoder: list[tuple[Any, nn.Conv2d, nn.Conv2d]]  # (ConvTransposeAsConvShuffle, conv a, conv b)
    tail: list[nn.Conv2d]
    crop_skips: bool  # the paper's crop-and-concatenate


def _double_conv(seq: nn.Sequential) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The two convs of a ``model._double_conv`` without batch norm (conv, ReLU, conv, ReLU)."""
    layers = list(seq)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    if len(convs) != 2 or not isinstance(layers[-1], nn.ReLU):
        raise UnetsegError(f"not a double conv block of a unetseg U-Net: {seq}")
    return convs[0], convs[1]


def _plan(model: nn.Module) -> _Plan:
    from .export import ConvTransposeAsConvShuffle
    from .model import PaperUNet, UNet, fold_batch_norm

    if not isinstance(model, (UNet, PaperUNet)):
        raise UnetsegError(f"int8 through oneDNN takes a unetseg UNet or PaperUNet, not {type(model).__name__}")
    # The plan's convs belong to a CPU fp32 copy in eval mode, batch norm folded: the caller's model keeps its
    # device, dtype and mode.
    model = fold_batch_norm(copy.deepcopy(model).float().cpu().eval())
    encoder = [(*_double_conv(b.convs), b.pool is not None) for b in model.encoder]
    if isinstance(model, UNet):
        decoder = [(ConvTransposeAsConvShuffle(b.up), *_double_conv(b.convs)) for b in model.decoder]
        tail = [model.conv9, model.conv10]
    else:
        decoder = [(ConvTransposeAsConvShuffle(up), *_double_conv(convs))
                   for up, convs in zip(model.ups, model.decoder, strict=True)]
        tail = [model.head]
    return _Plan(encoder, decoder, tail, crop_skips=isinstance(model, PaperUNet))


def _float_points(plan: _Plan, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float network's activations at every point the int8 network quantizes (names as in ``Int8UNet``)."""
    relu = torch.relu
    points: dict[str, torch.Tensor] = {}
    skips = []
    for i, (ca, cb, pool) in enumerate(plan.encoder):
        a = points[f"enc{i}.a"] = relu(ca(x))
        s = points[f"enc{i}.b"] = relu(cb(a))
        skips.append(s)
        x = nn.functional.max_pool2d(s, 2) if pool else s
    x = skips.pop()
    for j, (up, ca, cb) in enumerate(plan.decoder):
        u = points[f"dec{j}.up"] = up(x)
        skip = skips.pop()
        if plan.crop_skips:
            skip = crop_like(skip, tuple(u.shape[-2:]))
        a = points[f"dec{j}.a"] = relu(ca(torch.cat([u, skip], 1)))
        x = points[f"dec{j}.b"] = relu(cb(a))
    for k, conv in enumerate(plan.tail[:-1]):
        x = points[f"tail{k}"] = relu(conv(x))
    return points


@torch.no_grad()
def calibrate_ranges(model: nn.Module, frames: torch.Tensor, batch_size: int = 8) -> dict[str, list[float]]:
    """``{point: [min, max]}`` of ``model``'s activations over ``frames`` at the points ``Int8UNet`` quantizes.

    ``frames``: ``(N, C, H, W)`` uint8 (scaled by 1/255 here) or float in ``[0, 1]``, at the size the model
    will see (training frames, not the ones you validate on); padded as ``model.forward_full`` pads them for
    ``predict`` where the network does not take that size as it is."""
    from .model import forward_full

    if frames.ndim != 4 or len(frames) == 0:
        raise UnetsegError(f"calibration frames must be (N, C, H, W) with N >= 1, got shape {tuple(frames.shape)}")
    plan = _plan(model)
    ranges: dict[str, list[float]] = {}

    class _Recorder:
        arch, depth = getattr(model, "arch", "lab"), getattr(model, "depth", 4)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            for name, t in _float_points(plan, x).items():
                lo, hi = t.min().item(), t.max().item()
                old = ranges.get(name)
                ranges[name] = [min(lo, old[0]), max(hi, old[1])] if old else [lo, hi]
            return x

    for i in range(0, len(frames), batch_size):
        x = frames[i : i + batch_size].cpu()
        forward_full(_Recorder(), x.float() / 255 if x.dtype == torch.uint8 else x.float())
    return ranges


# ---------------------------------------------------------------------------------------------- int8 pieces


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` covering ``[lo, hi]`` and exact at 0 (the ReLU floor, the convs' padding)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(min(255, max(0, round(-lo / scale))))


class _QConv:
    """One conv as oneDNN's int8 conv: uint8 input at ``x_qp``, per-output-channel int8 weights, bias, optional
    fused ReLU, output uint8 at ``out_qp`` (or float32 logits when ``out_qp`` is None)."""

    def __init__(self, conv: nn.Conv2d, x_qp: tuple[float, int], out_qp: tuple[float, int] | None, relu: bool,
                 padding: int | None = None) -> None:
        if conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
            raise UnetsegError(f"int8 through oneDNN takes stride-1 ungrouped convs here, not {conv}")
        w = conv.weight.detach().float()
        self.w_scale = (w.abs().amax((1, 2, 3)) / 127).clamp_min(1e-12)
        qw = torch.round(w / self.w_scale.view(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
        pad = conv.padding if padding is None else (padding, padding)
        if isinstance(pad, str):
            raise UnetsegError(f"int8 through oneDNN needs numeric padding, not {pad!r}")
        self.padding = [int(pad[0]), int(pad[1])]
        self.x_scale, self.x_zp = float(x_qp[0]), int(x_qp[1])
        self.w_zp = torch.zeros(len(self.w_scale), dtype=torch.int64)
        self.bias = conv.bias.detach().float() if conv.bias is not None else None
        self.out_scale, self.out_zp = (float(out_qp[0]), int(out_qp[1])) if out_qp is not None else (1.0, 0)
        self.out_dtype = None if out_qp is not None else torch.float32  # None: uint8
        self.attr = "relu" if relu else "none"
        # Prepacked into oneDNN's blocked layout once; the input shape stays free (any batch, any size).
        self.packed = torch.ops.onednn.qconv_prepack(
            qw, self.w_scale, self.x_scale, self.x_zp, [1, 1], self.padding, [1, 1], 1, None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # onednn::qconv2d_pointwise takes the output's own scale here (torch 2.13; inductor's graphs pass
        # the same number under the name o_inv_scale): tests/test_int8.py checks the logits against fp32.
        return torch.ops.onednn.qconv2d_pointwise(
            x, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp, self.bias, [1, 1], self.padding,
            [1, 1], 1, self.out_scale, self.out_zp, self.out_dtype, self.attr, [], "",
        )


def max_pool2x2_uint8(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling (stride 2, odd edges dropped, as ``nn.MaxPool2d(2)``) of a channels_last uint8
    ``(N, C, H, W)`` tensor → ``(N, C, H // 2, W // 2)`` channels_last.

    Three element-wise maxima over strided views: torch 2.13's ``max_pool2d`` refuses channels_last uint8
    tensors of the lab's sizes (its check ``input_depth * input_height * input_width <=
    numeric_limits<integer_t>::max()`` fails), and this took 1.1 ms against 3.9 ms for bf16 pooling of the
    same tensor (32 x 32 x 96 x 128)."""
    n, c, h, w = x.shape
    v = x.permute(0, 2, 3, 1)[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
    top = torch.maximum(v[:, :, 0, :, 0], v[:, :, 0, :, 1])
    return torch.maximum(top, torch.maximum(v[:, :, 1, :, 0], v[:, :, 1, :, 1]), out=top).permute(0, 3, 1, 2)


class _QUp:
    """A rewritten transposed conv (``ConvTransposeAsConvShuffle``), its pixel shuffle and the concatenation
    with the skip, into one uint8 buffer: ``(x (N, C_in, H, W), skip (N, C_s, sH, sW))`` →
    ``(N, C_out + C_s, sH, sW)``, channels_last, the up output first (the lab's ``[up, skip]``)."""

    def __init__(self, up: Any, x_qp: tuple[float, int], out_qp: tuple[float, int]) -> None:
        # The rewrite pads top/left by up.pad; a symmetric pad gives the same rows first, then up.pad extra
        # rows and columns at the bottom/right that are cut off below (no separate pad copy).
        self.conv = _QConv(up.conv, x_qp, out_qp, relu=False, padding=up.pad)
        self.stride, self.out_channels = up.stride, up.out_channels

    def __call__(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s, c = self.stride, self.out_channels
        y = self.conv(x).permute(0, 2, 3, 1)[:, :h, :w]  # NHWC (N, H, W, s*s*c), channels (r_h, r_w, c)
        out = torch.empty((n, s * h, s * w, c + skip.shape[1]), dtype=torch.uint8)
        out[..., :c].view(n, h, s, w, s, c).copy_(y.reshape(n, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5))
        out[..., c:].copy_(skip.permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ the model


class _Int8Net:
    """The int8 convs of one calibration: ``plan``'s layers quantized at ``ranges`` (joined for each concatenation)."""

    def __init__(self, plan: _Plan, ranges: dict[str, list[float]]) -> None:
        missing = sorted(set(_point_names(plan)) - set(ranges))
        if missing:
            raise UnetsegError(f"int8 ranges lack {', '.join(missing)}: calibrate this model "
                               "(int8.calibrate_ranges) rather than reuse another's ranges")
        ranges = {k: [float(v[0]), float(v[1])] for k, v in ranges.items()}
        depth = len(plan.decoder)
        for j in range(depth):
            # cat([up, skip]) is read as one uint8 tensor, so the up output and the skip it meets share a range
            up, skip = f"dec{j}.up", f"enc{depth - 1 - j}.b"
            joint = [min(ranges[up][0], ranges[skip][0]), max(ranges[up][1], ranges[skip][1])]
            ranges[up] = ranges[skip] = joint
        self.ranges = ranges  # joining them again (on load) changes nothing
        qp = {k: _qparams(*v) for k, v in ranges.items()}
        prev = (1 / 255, 0)  # uint8 frames / 255: exact
        self.encoder = []
        for i, (ca, cb, pool) in enumerate(plan.encoder):
            self.encoder.append((_QConv(ca, prev, qp[f"enc{i}.a"], True),
                                 _QConv(cb, qp[f"enc{i}.a"], qp[f"enc{i}.b"], True), pool))
            prev = qp[f"enc{i}.b"]
        self.decoder = []
        for j, (up, ca, cb) in enumerate(plan.decoder):
            self.decoder.append((_QUp(up, prev, qp[f"dec{j}.up"]),
                                 _QConv(ca, qp[f"dec{j}.up"], qp[f"dec{j}.a"], True),
                                 _QConv(cb, qp[f"dec{j}.a"], qp[f"dec{j}.b"], True)))
            prev = qp[f"dec{j}.b"]
        self.tail = []
        for k, conv in enumerate(plan.tail[:-1]):
            self.tail.append(_QConv(conv, prev, qp[f"tail{k}"], True))
            prev = qp[f"tail{k}"]
        self.tail.append(_QConv(plan.tail[-1], prev, None, False))
        self.crop_skips = plan.crop_skips

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv_a, conv_b, pool in self.encoder:
            s = conv_b(conv_a(x))
            skips.append(s)
            x = max_pool2x2_uint8(s) if pool else s
        x = skips.pop()
        for up, conv_a, conv_b in self.decoder:
            skip = skips.pop()
            if self.crop_skips:
                skip = crop_like(skip, (x.shape[-2] * up.stride, x.shape[-1] * up.stride))
            x = conv_b(conv_a(up(x, skip)))
        for conv in self.tail:
            x = conv(x)
        return x


Calibrations = dict[tuple[int, int], dict[str, list[float]]]


class Int8UNet(nn.Module):
    """A lab or paper U-Net running int8 through oneDNN on the CPU (see the module docstring).

    ``Int8UNet(model, calibrations)``: ``model`` the float network (left untouched; the one the ranges were
    measured on), ``calibrations`` ``{(H, W): ranges}`` with ``ranges`` from ``calibrate_ranges`` on frames of
    that size. Each calibration gets int8 weights of its own (the same values, packed for its input ranges),
    and an input runs with the one whose size is nearest in pixel count: ranges measured at one scale fit
    that scale (a default-recipe checkpoint calibrated on 1x and 0.6x frames at once lost 0.94 mIoU point at
    1x against 0.05 calibrated on 1x frames alone; BENCHMARKS.md, session 16). ``forward(images)``: float
    ``(N, C, H, W)`` in ``[0, 1]`` (or uint8) → float32 logits, the float model's shape. Like
    ``runtime.InferenceModel`` it exposes ``arch``, ``depth``, ``config`` and ``precision`` (``"int8"``), so
    ``model.forward_full`` and ``predict`` take it.
    """

    precision = "int8"

    def __init__(self, model: nn.Module, calibrations: Calibrations) -> None:
        super().__init__()
        _require_onednn_int8()
        if not calibrations:
            raise UnetsegError("int8 needs at least one calibration: {(H, W): int8.calibrate_ranges(model, frames)}")
        plan = _plan(model)
        self._nets = {(int(h), int(w)): _Int8Net(plan, r) for (h, w), r in calibrations.items()}
        self.arch = getattr(model, "arch", "lab")
        self.depth = getattr(model, "depth", len(plan.decoder))
        self.config = dict(getattr(model, "config", {}))
        self.device = torch.device("cpu")
        # What save_int8 stores: the float weights and the ranges.
        self.source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def calibrations(self) -> Calibrations:
        """``{(H, W): ranges}`` as used (each concatenation's pair joined)."""
        return {size: net.ranges for size, net in self._nets.items()}

    def _net_for(self, h: int, w: int) -> _Int8Net:
        if len(self._nets) == 1:
            return next(iter(self._nets.values()))
        pixels = math.log(h * w)
        return min(self._nets.items(), key=lambda kv: abs(math.log(kv[0][0] * kv[0][1]) - pixels))[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .model import output_size

        output_size(self, *images.shape[-2:])  # the float model's size check and message
        with torch.inference_mode():
            x = images.cpu()
            if x.dtype != torch.uint8:
                x = x.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
            return self._net_for(*x.shape[-2:])(x.contiguous(memory_format=_CL))


def _point_names(plan: _Plan) -> list[str]:
    names = [f"enc{i}.{p}" for i in range(len(plan.encoder)) for p in "ab"]
    names += [f"dec{j}.{p}" for j in range(len(plan.decoder)) for p in ("up", "a", "b")]
    return names + [f"tail{k}" for k in range(len(plan.tail) - 1)]


def quantize_model(
    model: nn.Module, frames: torch.Tensor | Sequence[torch.Tensor], equalize: bool = True, batch_size: int = 8
) -> Int8UNet:
    """``model`` on the oneDNN int8 path, its ranges calibrated on ``frames``.

    Args:
        model: a trained ``UNet`` or ``PaperUNet`` (left untouched), with ``logit_bias`` folded in when it came
            from a checkpoint (``model.model_from_checkpoint``).
        frames: training frames ``(N, C, H, W)``, uint8 or float in ``[0, 1]``, at the size the model will
            see (64 are plenty); or one such tensor per input size the model will see (a checkpoint's
            prediction scales), each calibrated on its own.
        equalize: quantize an ``equalize.equalize_activations`` copy (exact in float; measured on the first
            tensor of ``frames``), whose channels one per-tensor uint8 scale holds better.
        batch_size: frames per calibration pass.
    """
    _require_onednn_int8()
    model = copy.deepcopy(model).float().cpu().eval()  # any device or dtype in; the caller's model untouched
    sets = [f.cpu() for f in ([frames] if isinstance(frames, torch.Tensor) else map(torch.as_tensor, frames))]
    if not sets:
        raise UnetsegError("quantize_model needs calibration frames")
    if equalize:
        from .equalize import equalize_activations

        model = equalize_activations(model, sets[0], batch_size=batch_size)
    calibrations = {(int(f.shape[-2]), int(f.shape[-1])): calibrate_ranges(model, f, batch_size) for f in sets}
    return Int8UNet(model, calibrations)


def save_int8(model: Int8UNet, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: ``{"format", "model_config", "state_dict", "calibrations",
    **extra}``: the float (equalized) weights and, per calibration, its size and ranges (``[{"size": [H, W],
    "ranges": {...}}]``); ``load_int8`` quantizes them again (deterministic)."""
    from .checkpoint import atomic_write_bytes

    calibrations = [{"size": list(size), "ranges": ranges} for size, ranges in model.calibrations.items()]
    payload = {"format": INT8_FORMAT, "model_config": dict(model.config), "state_dict": model.source_state,
               "calibrations": calibrations, **(extra or {})}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_int8(path: str | os.PathLike) -> Int8UNet:
    """The ``Int8UNet`` that ``save_int8`` wrote to ``path``."""
    from .model import model_from_config

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UnetsegError(f"{path}: cannot read an int8 model ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != INT8_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UnetsegError(f"{path}: not an int8 model of `unetseg export` (format {found!r}, "
                           f"expected {INT8_FORMAT!r})")
    try:
        model = model_from_config(payload["model_config"])
        model.load_state_dict(payload["state_dict"])
        calibrations = {(int(c["size"][0]), int(c["size"][1])): c["ranges"] for c in payload["calibrations"]}
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UnetsegError(f"{path}: an incomplete int8 model ({type(e).__name__}: {e}); export again") from None
    return Int8UNet(model.eval(), calibrations)
