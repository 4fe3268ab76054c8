"""ONNX export, int8 post-training quantization and an ONNX Runtime predictor.

Images go in as float32 ``(N, 3, H, W)`` scaled to ``[0, 1]`` (uint8 / 255, as the lab's
``tf.image.convert_image_dtype`` does); logits come out as float32 ``(N, n_classes, H, W)``.

* ``export_onnx(model, path, input_size=(H, W), batch=None)`` writes the model as ONNX. With
  ``rewrite_transposed=True`` (the default) each 3x3 stride-2 'same' transposed conv
  (``ConvTranspose2dSame``) is first rewritten, exactly, as zero-pad + 2x2 conv + pixel shuffle
  (see ``ConvTransposeAsConvShuffle``): ONNX Runtime has no int8 ``ConvTranspose``, so without the
  rewrite the four upsampling layers of an int8 model stay fp32 and take about a third of its time.
  The shuffle is written as NHWC reshapes/permutes rather than ``DepthToSpace``, so ONNX Runtime's
  NHWC int8 convs need no layout transposes around it.
* ``quantize_int8(onnx_path, calibration_images, out_path)`` does static post-training quantization
  (QDQ format, uint8 activations, per-channel 8-bit weights: signed, unsigned on x86 without VNNI)
  calibrated on training frames, and warns when the int8 model's classes stray from the fp32 model's on
  them (``int8_agreement``). A trained decoder's activations need rescaling first
  (``equalize.equalize_activations``, exact in float), and on some checkpoints one decoder level kept in
  float (``float_levels``): see ``quantize_int8``.
* ``OnnxPredictor(path, threads=None)`` runs either model with ONNX Runtime: ``predictor(images)``.
* ``export_checkpoint(checkpoint, out_dir, int8=True, data=DIR)`` (``unetseg export``) does all of it for a
  checkpoint: ``model.onnx``, the equalized and calibrated ``model.int8.onnx``, the same pair for each of
  the checkpoint's prediction scales but 1 (``model.x0.6.onnx``, ``model.int8.x0.6.onnx``: a graph has one
  input size), on x86 CPUs with VNNI also ``model.int8.pt`` (int8 through oneDNN, ``unetseg.int8``: one file
  for every scale) and ``model.json`` (input, scales, classes, int8 agreement with fp32);
  ``load_exported(out_dir)`` reads them back for predict/evaluate, running ``model.int8.pt`` where
  ``prefer_onednn_int8()`` (AMX CPUs) and ``model.int8.onnx`` elsewhere.

ONNX Runtime is an optional extra (``pip install unetseg[onnx]``); it is imported only when used.

Example:
    >>> import torch
    >>> from unetseg.model import build_model
    >>> from unetseg.export import export_onnx, quantize_int8, OnnxPredictor
    >>> from unetseg.equalize import equalize_activations
    >>> net = build_model("lab", base_filters=4, depth=2, n_classes=5).eval()
    >>> frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)      # training frames
    >>> net = equalize_activations(net, frames)     # the same logits, ranges that int8 can hold
    >>> path = export_onnx(net, "/tmp/tiny.onnx", input_size=(32, 32))           # doctest: +SKIP
    >>> q = quantize_int8(path, frames, "/tmp/tiny.int8.onnx")                   # doctest: +SKIP
    >>> OnnxPredictor(q)(torch.rand(2, 3, 32, 32)).shape                         # doctest: +SKIP
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cpuload import machine_is_busy
from .errors import UnetsegError
from .int8 import onednn_int8_available
from .model import ConvTranspose2dSame
from .runtime import cpu_has_amx, int8_may_saturate

__all__ = [
    "ConvTransposeAsConvShuffle",
    "rewrite_transposed_convs",
    "export_onnx",
    "quantize_int8",
    "calibration_frames",
    "export_checkpoint",
    "load_exported",
    "FullFrame",
    "decoder_level_nodes",
    "int8_agreement",
    "OnnxPredictor",
    "onnxruntime_available",
]


class ConvTransposeAsConvShuffle(nn.Module):
    """A stride-``s`` transposed conv rewritten exactly as zero-pad + ``M+1``-square conv + pixel shuffle.

    Input ``(N, C_in, H, W)`` → output ``(N, C_out, s*H, s*W)``, equal to the source layer's output
    (TF 'same' alignment for ``ConvTranspose2dSame``; the un-cropped output for a plain
    ``nn.ConvTranspose2d`` whose kernel is no larger than its stride).

    Why it is exact: a transposed conv sends input pixel ``i`` through tap ``k`` to output ``o = s*i + k``.
    Output ``o = s*p + r`` (phase ``r``) therefore gathers taps ``k = r + s*m`` from inputs ``i = p - m``,
    ``m = 0..M`` with ``M = ceil(k/s) - 1``: for every phase that is an ordinary ``(M+1)``-wide conv over
    inputs ``p-M..p``, i.e. a conv on the input zero-padded by ``M`` on the top and left. Stacking the
    ``s*s`` phases as output channels (``(r_h*s + r_w)*C_out + c``) gives one conv with ``s*s*C_out``
    channels, and a pixel shuffle (as reshapes and permutes) puts each phase at its place. No arithmetic
    is changed, only the order of the sums, so the result matches to float rounding (~1e-6).

    For the lab's 3x3 stride-2 layers this is pad (1, 0, 1, 0) + 2x2 conv to ``4*C_out`` + pixel shuffle:
    every conv of the network is then an ordinary conv, which ONNX Runtime runs in int8.
    """

    def __init__(self, source: nn.ConvTranspose2d) -> None:
        super().__init__()
        sh, sw = source.stride
        kh, kw = source.kernel_size
        if (
            sh != sw
            or kh != kw
            or source.groups != 1
            or tuple(source.dilation) != (1, 1)
            or tuple(source.padding) != (0, 0)
            or tuple(source.output_padding) != (0, 0)
        ):
            raise UnetsegError(f"cannot rewrite {source}: only square, unpadded, ungrouped transposed convs")
        if not isinstance(source, ConvTranspose2dSame) and kh > sh:
            raise UnetsegError(f"cannot rewrite {source}: its output is larger than stride x input")
        s, k = sh, kh
        m_max = math.ceil(k / s) - 1
        self.stride, self.pad = s, m_max
        w = source.weight.detach()  # (C_in, C_out, k, k): ConvTranspose2d stores in-channels first
        cin, cout = w.shape[0], w.shape[1]
        kk = m_max + 1
        weight = w.new_zeros(cout, s, s, cin, kk, kk)
        for rh in range(s):
            for a in range(kk):
                th = rh + s * (m_max - a)  # kernel row tap seen at window row a for phase rh
                if th >= k:
                    continue
                for rw in range(s):
                    for b in range(kk):
                        tw = rw + s * (m_max - b)
                        if tw >= k:
                            continue
                        weight[:, rh, rw, :, a, b] = w[:, :, th, tw].t()
        # Phase-major output channels, (r_h, r_w, c): in NHWC memory each output row segment (r_w, c) is then
        # one contiguous run of s*C_out values, so the shuffle below moves blocks, not single values.
        weight = weight.permute(1, 2, 0, 3, 4, 5)
        self.out_channels = cout
        self.conv = nn.Conv2d(cin, cout * s * s, kk, bias=source.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight.reshape(cout * s * s, cin, kk, kk))
            if source.bias is not None:
                self.conv.bias.copy_(source.bias.detach().repeat(s * s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad, 0, self.pad, 0))
        y = self.conv(x)
        s, c = self.stride, self.out_channels
        h, w = y.shape[-2:]
        # The pixel shuffle written in NHWC terms, not as F.pixel_shuffle (ONNX DepthToSpace): convs run
        # NHWC in ONNX Runtime's int8 kernels and in oneDNN, so the NCHW<->NHWC permutes here cancel
        # against the ones around the convs and what is left is one block transpose (N, H, r_h, W, r_w*C).
        # Exported, DepthToSpace instead cost two full-tensor transposes per upsampling layer.
        y = y.permute(0, 2, 3, 1).reshape(-1, h, w, s, s * c)
        y = y.permute(0, 1, 3, 2, 4).reshape(-1, s * h, s * w, c)
        return y.permute(0, 3, 1, 2)


def rewrite_transposed_convs(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every rewritable transposed conv replaced by ``ConvTransposeAsConvShuffle``.

    The original model is left untouched. Layers that cannot be rewritten exactly are kept.
    """
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ConvTranspose2d):
                try:
                    setattr(parent, name, ConvTransposeAsConvShuffle(child))
                except UnetsegError:
                    pass
    return model


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    """Run torch's ONNX exporter: the torch.export-based one where it exists, else the TorchScript one."""
    names = dict(input_names=["images"], output_names=["logits"])
    try:
        from torch.export import Dim

        dyn = ({0: Dim("batch", min=1, max=4096)},) if dynamic_batch else None  # by position: any arg name
        # The new exporter prints progress lines and logs a warning per missing torchvision op; both would
        # clutter every CLI command that exports.
        onnx_log = logging.getLogger("torch.onnx")
        level = onnx_log.level
        onnx_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                warnings.simplefilter("ignore")
                # One self-contained file (the lab model is 35 MB, far below protobuf's 2 GB limit).
                torch.onnx.export(
                    module, (example,), str(path), dynamo=True, dynamic_shapes=dyn, external_data=False, **names
                )
        finally:
            onnx_log.setLevel(level)
        return
    except (ImportError, TypeError):
        pass  # torch < 2.5 has no dynamo= argument: fall through to the TorchScript exporter
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), opset_version=17, dynamic_axes=axes, **names)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int] = (96, 128),
    batch: int | None = None,
    rewrite_transposed: bool = True,
) -> Path:
    """Write ``model`` (fp32, eval mode) as an ONNX file and return its path.

    Args:
        model: a unetseg model (not modified; a CPU fp32 copy is exported).
        path: output file, conventionally ``*.onnx``.
        input_size: ``(H, W)`` of the images it will see; the spatial size is fixed in the graph.
        batch: ``None`` for a dynamic batch axis, or a fixed batch size.
        rewrite_transposed: replace each transposed conv by the exact pad + conv + pixel shuffle
            (``ConvTransposeAsConvShuffle``), so an int8 model is int8 throughout.

    The graph has one input ``images`` float32 ``(N, C_in, H, W)`` and one output ``logits`` float32
    ``(N, n_classes, H', W')``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    if rewrite_transposed:
        module = rewrite_transposed_convs(module)
    in_ch = int(getattr(model, "config", {}).get("in_channels", 3))
    h, w = input_size
    example = torch.rand(batch or 2, in_ch, h, w)
    with torch.no_grad():
        _export(module, example, path, dynamic_batch=batch is None)
    return path


def onnxruntime_available() -> bool:
    """True where ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _require_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UnetsegError(
            "ONNX Runtime is not installed; install it with: pip install 'unetseg[onnx]' -c constraints.txt"
        ) from None
    return ort


def _as_float_images(images: Any) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` → float32 / 255; float arrays pass through as float32 (already in [0, 1])."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.ascontiguousarray(arr, dtype=np.float32)


def _input_batch(path: str | os.PathLike) -> int | None:
    """The fixed batch size of a model's ``images`` input, or ``None`` for a dynamic batch."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def quantize_int8(
    onnx_path: str | os.PathLike,
    calibration_images: torch.Tensor | np.ndarray,
    out_path: str | os.PathLike,
    method: str = "minmax",
    percentile: float = 99.999,
    calibration_batch: int = 8,
    keep_head_fp32: bool = True,
    float_levels: Sequence[int] = (),
    check_frames: int = 16,
    min_agreement: float = 0.96,
    weight_type: str | None = None,
    reduce_range: bool = False,
) -> Path:
    """Static post-training int8 quantization (QDQ, uint8 activations, per-channel 8-bit weights).

    Args:
        onnx_path: an fp32 model from ``export_onnx`` (preferably with ``rewrite_transposed=True``).
        calibration_images: training frames ``(N, C, H, W)``, uint8 (scaled by 1/255 here) or float
            in ``[0, 1]``; a few hundred frames are plenty, a few dozen work.
        out_path: where to write the int8 model.
        method: activation-range calibration, ``minmax`` | ``percentile`` | ``entropy``.
        percentile: for ``method="percentile"``, the share of ``|activation|`` values (in %) each tensor's
            range keeps; the rest saturate.
        calibration_batch: frames per calibration run (the model's own batch when it is fixed).
        keep_head_fp32: leave the final 1x1 logits conv in float, so logits are not rounded to 256 levels:
            on the lab model that halved int8's mIoU loss (0.5 instead of 1.0 point) for ~1 % of its speed
            (BENCHMARKS.md).
        float_levels: decoder levels to leave in float (0 = the deepest, next to the bottleneck): each
            level's up-conv, the ops up to its concatenation, the concatenation and the two convs after it.
            A fall-back for a checkpoint that equalizing alone does not rescue: on session 3's default-
            recipe checkpoint (``def40``), already equalized, keeping level 1 in float cut the int8 mIoU
            loss from 3.38 to 0.43 point, at a cost in speed (BENCHMARKS.md, session 7).
        check_frames: after quantizing, compare the int8 model's argmax with the fp32 model's on this many
            calibration frames (0: skip) and warn when they agree on fewer than ``min_agreement`` of the
            pixels. On 16 training frames the lab recipe's checkpoint agreed on 97.3 % (0.77 mIoU point
            lost on validation frames), the default recipe's on 94.1-94.4 % (8.3 points lost).

        weight_type: ``int8`` (signed weights, what VNNI multiplies) or ``uint8``; ``None`` picks ``uint8`` on
            an x86 CPU without VNNI (``runtime.int8_may_saturate``) and ``int8`` elsewhere. Without VNNI,
            ONNX Runtime multiplies u8 activations by s8 weights with AVX2's ``vpmaddubsw``, whose int16 pair
            sums saturate: on a lab-recipe checkpoint the fused kernels' logits strayed by up to 23 from the
            QDQ graph's exact arithmetic and int8 lost 0.97 mIoU point against fp32, 0.30 with u8 weights
            (which it widens to int16 first; BENCHMARKS.md, session 11). An s8 model made on a VNNI CPU is
            therefore not run int8 on such a CPU (``load_exported``, ``int8_weights``).
        reduce_range: 7-bit weights, ONNX Runtime's own remedy for that saturation; they halve the weights'
            precision (class agreement with fp32 95.4 and 73.6 % on two checkpoints, 97.6 and 96.4 % with
            u8 weights), so they are kept for comparison only.

    Weights are symmetric per output channel; activations asymmetric per tensor.

    One uint8 scale per tensor cannot hold a trained decoder's uneven activations: quantize the export of
    ``equalize.equalize_activations(model, frames)`` (exact in float), as ``export_checkpoint`` does, and
    check the quality on your own checkpoint (``unetseg evaluate`` takes the export). Quantized as
    exported, session 6's lab-recipe checkpoint lost 0.77 mIoU point and the default recipe's ``def40``
    8.28; equalized, −0.07 and 3.38 (BENCHMARKS.md, sessions 6 and 7).
    """
    _require_ort()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise UnetsegError(f"calibration method {method!r} is not one of {', '.join(methods)}")
    weight_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if weight_type is None:
        weight_type = "uint8" if int8_may_saturate() else "int8"
    if weight_type not in weight_types:
        raise UnetsegError(f"weight type {weight_type!r} is not one of {', '.join(weight_types)}")
    if check_frames < 0:
        raise UnetsegError(f"check_frames {check_frames} must be 0 (no check) or more")
    frames = _as_float_images(calibration_images)
    if frames.ndim != 4 or len(frames) == 0:
        raise UnetsegError(f"calibration images must be (N, C, H, W) with N >= 1, got shape {frames.shape}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    fixed = _input_batch(onnx_path)
    step = fixed or max(1, calibration_batch)

    starts = list(range(0, len(frames), step))
    if fixed and len(starts) > 1 and len(frames) - starts[-1] < fixed:  # a fixed-batch graph takes full batches
        starts.pop()

    class _Reader(CalibrationDataReader):
        """Calibration batches; ``set_range`` lets ONNX Runtime take them a few at a time (below)."""

        def __init__(self) -> None:
            self.set_range(0, len(starts))

        def __len__(self) -> int:
            return len(starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = self._batches(starts[start_index:end_index])

        def _batches(self, batch_starts: list[int]) -> Iterator[dict[str, np.ndarray]]:
            for i in batch_starts:
                chunk = frames[i : i + step]
                if fixed and len(chunk) < fixed:  # fewer frames than the graph's batch: repeat them
                    chunk = np.concatenate([chunk] * math.ceil(fixed / len(chunk)))[:fixed]
                yield {"images": chunk}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self.set_range(0, len(starts))

    import onnx

    model = onnx.load(str(onnx_path))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    exclude = convs[-1:] if keep_head_fp32 else []
    for level in float_levels:
        exclude += decoder_level_nodes(model, level)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pre.onnx"
        try:  # shape inference + constant folding, as ONNX Runtime recommends before quantizing
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(onnx_path), str(src), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; the plain model quantizes too
            src = onnx_path
        # The histogram calibrators print a line per batch; the CLI's output is not the place for them.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            quantize_static(
                str(src),
                str(out_path),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=weight_types[weight_type],
                per_channel=True,
                reduce_range=reduce_range,
                calibrate_method=methods[method],
                nodes_to_exclude=exclude,
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": False,
                    "CalibPercentile": percentile,
                    # The histogram calibrators keep every activation of every batch they are given until they
                    # histogram them (all of 256 frames at 240x320 took over the machine's 24 GB): handing them
                    # one batch at a time (ORT's strided collection) bounds that to one batch's activations.
                    # MinMax reduces inside the graph and needs no striding.
                    **({} if method == "minmax" else {"CalibStridedMinMax": 1}),
                },
            )
    if check_frames > 0:
        _warn_if_astray(out_path, int8_agreement(onnx_path, out_path, frames[:check_frames]),
                        f"{min(check_frames, len(frames))} calibration frames", min_agreement)
    return out_path


def int8_weights(path: str | os.PathLike) -> dict[str, Any]:
    """How an int8 ONNX model's weights are quantized: ``{"type": "int8" | "uint8", "bits": 7 | 8}`` (7: signed
    weights within +-64, ``reduce_range``). Signed 8-bit weights are the ones that saturate on an x86 CPU
    without VNNI."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    kinds = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    inits = {t.name: t for t in model.graph.initializer if t.data_type in kinds}
    types, largest = set(), 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            t = inits[node.input[0]]
            types.add(kinds[t.data_type])
            if t.data_type == onnx.TensorProto.INT8:
                largest = max(largest, int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max()))
    if not types:
        raise UnetsegError(f"{path}: no quantized weights (not an int8 model of quantize_int8)")
    kind = "int8" if "int8" in types else "uint8"
    return {"type": kind, "bits": 7 if kind == "int8" and largest <= 64 else 8}


def _warn_if_astray(int8_path: Path, agreement: float, frames: str, min_agreement: float = 0.96) -> None:
    """Warn when an int8 model's classes agree with fp32's on fewer than ``min_agreement`` of the pixels."""
    if agreement < min_agreement:
        warnings.warn(
            f"{int8_path}: the int8 model's classes agree with the fp32 model's on only {agreement:.1%} of the "
            f"pixels of {frames} (below {min_agreement:.0%}): expect a large accuracy loss. Quantize the model "
            "rescaled by equalize.equalize_activations (as export_checkpoint and `unetseg export --int8` do), try "
            "percentile calibration, measure the loss on validation frames (`unetseg evaluate` takes the export), "
            "or serve the float model (the checkpoint, or the export's model.onnx)",
            UserWarning,
            stacklevel=3,
        )


def decoder_level_nodes(model: Any, level: int) -> list[str]:
    """Names of the nodes of U-Net decoder level ``level`` (0 = deepest) in an exported ONNX graph: the
    up-conv (the last conv before the level's concatenation), the ops between it and the concatenation
    (pixel shuffle, crop), the concatenation, and everything up to and including the second conv after it.
    ``model`` is an ``onnx.ModelProto``."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    cats = [i for i, n in enumerate(nodes) if n.op_type == "Concat"]
    if not 0 <= level < len(cats):
        raise UnetsegError(f"decoder level {level} does not exist: the graph has {len(cats)} (0 to {len(cats) - 1})")
    c = cats[level]
    before = [i for i in range(c) if nodes[i].op_type in ("Conv", "ConvTranspose")]
    after = [i for i in range(c + 1, len(nodes)) if nodes[i].op_type == "Conv"][:2]
    if not before or len(after) < 2:
        raise UnetsegError(f"decoder level {level}: expected an up-conv before and two convs after its concatenation")
    return [n.name for n in nodes[before[-1] : after[1] + 1]]


def int8_agreement(
    fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: torch.Tensor | np.ndarray
) -> float:
    """Share of pixels whose top class the two ONNX models agree on, for ``images (N, C, H, W)`` (uint8 or
    float in ``[0, 1]``): 1.0 when they always agree."""
    x = _as_float_images(images)
    # spin=False: spinning only changes speed, and deciding it samples the machine's load for 0.5 s each
    a = OnnxPredictor(fp32_path, spin=False).run_numpy(x).argmax(1)
    b = OnnxPredictor(int8_path, spin=False).run_numpy(x).argmax(1)
    return float((a == b).mean())


class OnnxPredictor:
    """Run an exported (fp32 or int8) model with ONNX Runtime on the CPU.

    ``OnnxPredictor(path, threads=None)(images)``: images float32 ``(N, C, H, W)`` in ``[0, 1]`` (uint8 is
    scaled by 1/255), a ``torch.Tensor`` or ``np.ndarray``; returns float32 logits ``(N, n_classes, H', W')``
    of the same kind (a CPU tensor for tensor input). Any ``N`` works: a fixed-batch graph is fed in
    chunks of its batch, the last one padded.

    ``threads``: ONNX Runtime intra-op threads (``None``: torch's current thread count, i.e. the
    physical cores or ``--threads``). ``spin``: whether idle pool threads busy-wait for work (ONNX
    Runtime's default, fastest on an idle machine); ``None`` turns spinning off when the machine is
    already busy (1-minute load average >= 0.75 x cores), where spinning threads starve the working one.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spin: bool | None = None) -> None:
        ort = _require_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise UnetsegError(f"{self.path}: no such ONNX model")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # ORT warns about every QDQ pair it leaves unfused; that is noise
        if spin is None:
            spin = not machine_is_busy()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.spin = spin
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.batch = _input_batch(self.path)

    def run_numpy(self, images: np.ndarray) -> np.ndarray:
        """Logits for float32 ``(N, C, H, W)`` images as a float32 array."""
        if self.batch is None:
            return self.session.run(None, {self.input_name: images})[0]
        outs = []
        for i in range(0, len(images), self.batch):
            chunk = images[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:  # pad the last chunk to the graph's fixed batch
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(outs)

    def __call__(self, images: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor | np.ndarray:
        out = self.run_numpy(_as_float_images(images))
        return torch.from_numpy(out) if isinstance(images, torch.Tensor) else out


def _frames(pairs: list[Any], size: tuple[int, int], resize_mode: str) -> torch.Tensor:
    """The images of ``pairs`` resized as in training: uint8 ``(N, 3, H, W)``."""
    from .data import read_image, resize_image

    images = [resize_image(read_image(p.image), size, resize_mode) for p in pairs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _split_pairs(state: dict[str, Any], data: str | os.PathLike, layout: str) -> tuple[list[Any], list[Any]]:
    """The image pairs of ``data`` (one scan of the folder): those the checkpoint's run did not validate on,
    and those it did."""
    from .data import find_pairs

    held_out = set(state.get("val_names") or [])
    pairs = find_pairs(data, layout, require_masks=False)[0]
    return [p for p in pairs if p.name not in held_out], [p for p in pairs if p.name in held_out]


def _calibration_pairs(
    state: dict[str, Any], data: str | os.PathLike, train_pairs: list[Any], count: int, seed: int
) -> list[Any]:
    if count < 1:
        raise UnetsegError(f"calibration frame count {count} must be at least 1")
    pre = state.get("preprocess") or {}
    if not pre.get("size"):
        raise UnetsegError("the checkpoint records no input size (preprocess.size)")
    if not train_pairs:
        raise UnetsegError(f"{data}: no images outside the checkpoint's validation frames to calibrate int8 on")
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed))[:count]
    return [train_pairs[i] for i in sorted(order.tolist())]


def calibration_frames(
    state: dict[str, Any], data: str | os.PathLike, count: int = 64, layout: str = "auto", seed: int = 0
) -> torch.Tensor:
    """Up to ``count`` images of ``data`` that the checkpoint's run did not validate on, preprocessed as in
    training: uint8 ``(N, 3, H, W)`` at the checkpoint's input size. Drawn at random (seeded) so that they
    span the folder's driving runs rather than its first frames."""
    chosen = _calibration_pairs(state, data, _split_pairs(state, data, layout)[0], count, seed)  # checks the size
    pre = state["preprocess"]
    return _frames(chosen, tuple(pre["size"]), pre.get("resize_mode", "default"))


class FullFrame(nn.Module):
    """``model.forward_full`` as a module: logits ``(N, C, H, W)`` for images ``(N, C_in, H, W)`` at the exact
    input size, whatever the architecture (the paper U-Net's input is mirror-padded so that its smaller
    output covers the frame, then cropped). Exported, it gives an ONNX model that maps frames to logits
    of the same size, as ``predict`` does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = dict(getattr(model, "config", {}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .model import forward_full

        return forward_full(self.model, images)


#: The oneDNN int8 model of an export (``int8.save_int8``): one file for every prediction scale.
ONEDNN_INT8_FILE = "model.int8.pt"


def prefer_onednn_int8() -> bool:
    """Whether an export's int8 model runs through oneDNN (``model.int8.pt``) rather than ONNX Runtime here:
    on CPUs with AMX, where oneDNN's int8 convs use the tile units. There the lab model ran 568-602 images/s
    through oneDNN against 175-180 through ONNX Runtime (batch 32, four runs; BENCHMARKS.md, session 16); on
    VNNI CPUs without AMX ONNX Runtime's int8 was the measured one (1.56x Keras bf16, session 12), so it stays
    the choice there. Pass the file itself to ``predict``/``evaluate`` to run the other."""
    return onednn_int8_available() and cpu_has_amx()


def _int8_info(n_frames: int, method: str, agreements: dict[str, float], n_check: int, check_on: str) -> dict[str, Any]:
    """What ``model.json`` says of an int8 model: its calibration and its class agreement with fp32 per scale."""
    return {
        "calibration_frames": n_frames, "method": method, "equalized": True,
        "agreement_with_fp32": round(agreements["1"], 6), "agreement_frames": n_check,
        "agreement_on": f"{check_on} frames",
        "agreement_with_fp32_by_scale": {k: round(a, 6) for k, a in agreements.items()},
    }


def _onednn_int8(
    model: nn.Module, equalized: nn.Module, frames: dict[float, torch.Tensor], checks: dict[float, torch.Tensor],
    check_on: str, path: Path,
) -> tuple[Path, dict[str, Any]]:
    """The oneDNN int8 model of an export, calibrated on ``frames`` (uint8, one tensor per scale: ranges of its
    own for each), its classes checked against ``model``'s on ``checks`` (the same), written to ``path``; and
    what ``model.json`` says of it."""
    from .int8 import Int8UNet, calibrate_ranges, save_int8
    from .model import forward_full

    q = Int8UNet(equalized, {tuple(f.shape[-2:]): calibrate_ranges(equalized, f) for f in frames.values()})
    agreements = {}
    with torch.inference_mode():
        for v, check in checks.items():
            x = check.float() / 255
            same = forward_full(model, x).argmax(1) == forward_full(q, x).argmax(1)
            agreements[f"{v:g}"] = same.double().mean().item()
            _warn_if_astray(path.name, agreements[f"{v:g}"], f"{len(check)} {check_on} frames")
    save_int8(q, path)
    n_frames, n_check = len(next(iter(frames.values()))), len(next(iter(checks.values())))
    return path, {
        "runtime": "oneDNN through PyTorch (x86 CPUs with VNNI or AMX); chosen over ONNX Runtime on AMX CPUs",
        **_int8_info(n_frames, "minmax", agreements, n_check, check_on),
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    calibration: int = 64,
    method: str = "minmax",
    layout: str = "auto",
    scales: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write a checkpoint as ONNX models that a runtime can serve, with what it needs to use them.

    ``OUT/model.onnx`` is the fp32 model (dynamic batch, the checkpoint's input size, ``logit_bias``
    folded in); with ``int8``, ``OUT/model.int8.onnx`` is its int8 version: activations equalized
    (``equalize.equalize_activations``, exact in float), then quantized by ``quantize_int8`` with
    ``method`` calibration on ``calibration`` images of ``data`` that the run did not validate on.
    An ONNX graph has one input size, so each prediction scale other than 1 (``scales``; by default the
    checkpoint's ``predict_scales``, [0.6, 1.0] for the default recipe) gets graphs of its own,
    ``model.x0.6.onnx`` and ``model.int8.x0.6.onnx`` (int8 calibrated on the same frames at that size):
    ``predict`` and ``evaluate`` on the export then average the scales as the checkpoint does.
    With ``int8`` on an x86 CPU with VNNI (``int8.onednn_int8_available``), ``OUT/model.int8.pt`` is the same
    equalized model for oneDNN's int8 kernels (``int8.Int8UNet``), with ranges calibrated on the same frames
    at each scale's size. ``OUT/model.json`` records the input (name, NCHW float32, uint8 / 255, size), the output,
    the classes, the scales and their files, and, for int8, the calibration and the share of pixels whose class matches
    the fp32 model's on up to 16 of the run's validation frames found in ``data`` (else on calibration
    frames), per scale. Every file is written to a temporary name and renamed, so a failed export leaves
    earlier files intact; a successful export removes the model files of an earlier one that it did not
    write again (an int8 model after an fp32-only export, the graphs of scales no longer exported).
    Returns the ``model.json`` contents.
    """
    from .checkpoint import atomic_write_text, load_checkpoint
    from .equalize import equalize_activations
    from .model import model_from_checkpoint
    from .predict import check_scales, scaled_size

    if int8 and data is None:
        raise UnetsegError("int8 export needs --data DIR: training images to calibrate the int8 ranges on")
    state = load_checkpoint(checkpoint)
    pre = dict(state.get("preprocess") or {})
    if not pre.get("size"):
        raise UnetsegError(f"{checkpoint}: the checkpoint records no input size (preprocess.size)")
    size = (int(pre["size"][0]), int(pre["size"][1]))
    resize_mode = pre.get("resize_mode", "default")
    predict_scales = check_scales((pre.get("predict_scales") or [1.0]) if scales is None else scales)
    # 1x is model.onnx, always written; each other scale gets graphs of its own size
    extra = {v: scaled_size(size, v) for v in sorted(set(predict_scales) - {1.0})}
    model = model_from_checkpoint(state).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "format": "unetseg-onnx-1",
        "checkpoint": str(checkpoint),
        "epoch": state.get("epoch"),
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "scale": "uint8 / 255",
                  "size": list(size), "resize_mode": resize_mode},
        "output": {"name": "logits", "layout": "NCHW", "n_classes": int(state["model_config"]["n_classes"])},
        "classes": state["classes"],
        "model_config": dict(state["model_config"]),
        "layout": pre.get("layout", "auto"),
        "val_names": list(state.get("val_names") or []),
        "files": {"fp32": "model.onnx"},
        # predict/evaluate average these scales, as the checkpoint does (scale_files: the graphs for each
        # scale other than 1; checkpoint_predict_scales: the checkpoint's own, for reference).
        "predict_scales": predict_scales,
        "scale_files": {f"{v:g}": {"size": list(hw), "fp32": f"model.x{v:g}.onnx"} for v, hw in extra.items()},
        "checkpoint_predict_scales": [float(v) for v in pre.get("predict_scales") or [1.0]],
    }
    graphs = {1.0: (info["files"], size)} | {v: (info["scale_files"][f"{v:g}"], hw) for v, hw in extra.items()}
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        staged = {files["fp32"]: export_onnx(FullFrame(model), Path(tmp) / files["fp32"], input_size=hw)
                  for files, hw in graphs.values()}
        if int8:
            train_pairs, val_pairs = _split_pairs(state, data, layout)
            chosen = _calibration_pairs(state, data, train_pairs, calibration, seed=0)
            frames = _frames(chosen, size, resize_mode)
            # Equalization is exact in float and does not depend on the input size: one model for every scale.
            equalized_model = equalize_activations(model, frames)
            check_pairs, check_on = (val_pairs[:16], "validation") if val_pairs else (chosen[:16], "calibration")
            # Each scale's frames, decoded and resized once for both int8 models.
            scaled = {v: frames if hw == size else _frames(chosen, hw, resize_mode) for v, (_, hw) in graphs.items()}
            checks = {v: _frames(check_pairs, hw, resize_mode) for v, (_, hw) in graphs.items()}
            agreements = {}
            for v, (files, hw) in graphs.items():
                equalized = export_onnx(FullFrame(equalized_model), Path(tmp) / "eq.onnx", input_size=hw)
                files["int8"] = files["fp32"].replace("model.", "model.int8.", 1)
                staged[files["int8"]] = quantize_int8(
                    equalized, scaled[v], Path(tmp) / files["int8"], method=method, check_frames=0
                )
                agreements[f"{v:g}"] = int8_agreement(staged[files["fp32"]], staged[files["int8"]], checks[v])
                _warn_if_astray(out / files["int8"], agreements[f"{v:g}"], f"{len(check_pairs)} {check_on} frames")
            info["int8"] = {
                **_int8_info(len(frames), method, agreements, len(check_pairs), check_on),
                # uint8 where made on an x86 CPU without VNNI; an int8-weight model is not run int8 on such a CPU
                "weights": int8_weights(staged[info["files"]["int8"]]),
            }
            if onednn_int8_available():
                staged[ONEDNN_INT8_FILE], info["int8_onednn"] = _onednn_int8(
                    model, equalized_model, scaled, checks, check_on, Path(tmp) / ONEDNN_INT8_FILE
                )
                info["files"]["int8_onednn"] = ONEDNN_INT8_FILE
        for name, path in staged.items():
            os.replace(path, out / name)
    # Model files of an earlier export that this one did not write (an int8 model after an fp32-only export,
    # graphs of other scales) no longer match model.onnx: remove them so nothing picks them up.
    for stale in [*out.glob("model.int8.onnx"), *out.glob("model.x*.onnx"), *out.glob("model.int8.x*.onnx"),
                  *out.glob(ONEDNN_INT8_FILE)]:
        if stale.name not in staged:
            stale.unlink(missing_ok=True)
    atomic_write_text(out / "model.json", json.dumps(info, indent=2) + "\n")
    return info


def load_exported(path: str | os.PathLike) -> dict[str, Any]:
    """What ``predict``/``evaluate`` need to run an export of ``export_checkpoint``: ``path`` is its folder
    (which runs the int8 model where there is one: ``model.int8.pt`` through oneDNN where
    ``prefer_onednn_int8()``, else ``model.int8.onnx``) or one of its model files (``model.onnx``,
    ``model.int8.onnx``, ``model.int8.pt``). Returns a dict shaped like a checkpoint's (``classes``,
    ``preprocess`` with the export's ``predict_scales``, ``model_config``, ``val_names``) plus ``onnx`` (the 1x
    ONNX file), ``onnx_scales`` (scale -> ONNX file of that precision; empty when the oneDNN model runs),
    ``int8_onednn`` (the oneDNN int8 file, when it runs) and ``precision`` (``int8`` or ``fp32``)."""
    p = Path(path)
    folder = p.parent if p.suffix in (".onnx", ".pt") else p
    meta = folder / "model.json"
    if not meta.is_file():
        raise UnetsegError(f"{path}: not an export of `unetseg export` (no model.json beside it)")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        files = info["files"]
        scale_files = {float(k): v for k, v in (info.get("scale_files") or {}).items()}
        if p.suffix == ".onnx" and any(p.name in v.values() for v in scale_files.values()):
            raise UnetsegError(f"{path}: one scale's graph of a multi-scale export; pass its folder {folder}, "
                               f"{folder / files['fp32']} or {folder / files.get('int8', files['fp32'])}")
        onednn_file = folder / files["int8_onednn"] if "int8_onednn" in files else None
        if p.suffix == ".pt" and (onednn_file is None or p.name != onednn_file.name):
            raise UnetsegError(f"{path}: model.json beside it lists no such int8 model; pass the export's folder")
        if p.suffix == ".onnx":
            onnx_file, precision = p, ("int8" if p.name == files.get("int8") else "fp32")
        else:
            precision = "int8" if "int8" in files else "fp32"
            onnx_file = folder / files[precision]
        if precision == "int8" and int8_may_saturate() and onnx_file.is_file():
            weights = (info.get("int8") or {}).get("weights") or int8_weights(onnx_file)  # older exports: read it
            if weights["type"] == "int8" and weights["bits"] == 8:  # the weights that saturate here
                chosen = p.suffix == ".onnx"  # the int8 file named: run it, but say what to expect
                warnings.warn(
                    f"{onnx_file}: an int8 model with signed 8-bit weights, made on a CPU with VNNI; this CPU (x86 "
                    "without VNNI) adds their products in saturating 16-bit sums, so its classes can differ from "
                    "those the export measured (0.97 mIoU point lost on a lab-recipe checkpoint, BENCHMARKS.md). "
                    + ("Export again on this machine (it quantizes to uint8 weights) or pass model.onnx."
                       if chosen else f"Running {folder / files['fp32']} instead; export again on this machine "
                       "(`unetseg export --int8`, uint8 weights) to run int8 here."),
                    UserWarning, stacklevel=2,
                )
                if not chosen:
                    precision, onnx_file = "fp32", folder / files["fp32"]
        # Scales whose graphs exist in this precision; exports before multi-scale ones have only 1x.
        onnx_scales = {1.0: onnx_file} | {v: folder / f[precision] for v, f in scale_files.items() if precision in f}
        predict_scales = [float(v) for v in info.get("predict_scales") or [1.0] if float(v) in onnx_scales]
        # The oneDNN int8 model where it is the faster int8 path here (prefer_onednn_int8), or when named.
        if onednn_file is not None and (p.suffix == ".pt" or (p.suffix != ".onnx" and precision == "int8"
                                                               and prefer_onednn_int8())):
            precision, onnx_scales = "int8", {}
            predict_scales = [float(v) for v in info.get("predict_scales") or [1.0]]
        state = {
            "onnx": onnx_file, "onnx_scales": onnx_scales, "precision": precision, "classes": info["classes"],
            "model_config": info["model_config"], "val_names": info.get("val_names", []),
            "preprocess": {"size": info["input"]["size"], "resize_mode": info["input"]["resize_mode"],
                           "scale": 1 / 255, "layout": info.get("layout", "auto"),
                           "predict_scales": predict_scales or [1.0]},
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnetsegError(f"{meta}: not a model.json written by `unetseg export` ({type(e).__name__}: {e})") from None
    if not onnx_scales:
        if not onednn_file.is_file():
            raise UnetsegError(f"{onednn_file}: no such int8 model (model.json lists it; export again)")
        state["int8_onednn"] = onednn_file
    for f in onnx_scales.values():
        if not f.is_file():
            raise UnetsegError(f"{f}: no such ONNX model (model.json lists it; export again)")
    return state
