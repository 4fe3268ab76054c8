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
  (QDQ format, uint8 activations, per-channel int8 weights) calibrated on training frames, and warns
  when the int8 model's classes stray from the fp32 model's on them (``int8_agreement``).
* ``OnnxPredictor(path, threads=None)`` runs either model with ONNX Runtime: ``predictor(images)``.

ONNX Runtime is an optional extra (``pip install unetseg[onnx]``); it is imported only when used.

Example:
    >>> import torch
    >>> from unetseg.model import build_model
    >>> from unetseg.export import export_onnx, quantize_int8, OnnxPredictor
    >>> net = build_model("lab", base_filters=4, depth=2, n_classes=5).eval()
    >>> path = export_onnx(net, "/tmp/tiny.onnx", input_size=(32, 32))           # doctest: +SKIP
    >>> frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> q = quantize_int8(path, frames, "/tmp/tiny.int8.onnx")                   # doctest: +SKIP
    >>> OnnxPredictor(q)(torch.rand(2, 3, 32, 32)).shape                         # doctest: +SKIP
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import contextlib
import copy
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
from .model import ConvTranspose2dSame

__all__ = [
    "ConvTransposeAsConvShuffle",
    "rewrite_transposed_convs",
    "export_onnx",
    "quantize_int8",
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

        dyn = {"x": {0: Dim("batch", min=1, max=4096)}} if dynamic_batch else None
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
    calibration_batch: int = 8,
    keep_head_fp32: bool = True,
    check_frames: int = 16,
    min_agreement: float = 0.96,
) -> Path:
    """Static post-training int8 quantization (QDQ, uint8 activations, per-channel int8 weights).

    Args:
        onnx_path: an fp32 model from ``export_onnx`` (preferably with ``rewrite_transposed=True``).
        calibration_images: training frames ``(N, C, H, W)``, uint8 (scaled by 1/255 here) or float
            in ``[0, 1]``; a few hundred frames are plenty, a few dozen work.
        out_path: where to write the int8 model.
        method: activation-range calibration, ``minmax`` | ``percentile`` | ``entropy``.
        calibration_batch: frames per calibration run (the model's own batch when it is fixed).
        keep_head_fp32: leave the final 1x1 logits conv in float, so logits are not rounded to 256 levels:
            on the lab model that halved int8's mIoU loss (0.5 instead of 1.0 point) for ~1 % of its speed
            (BENCHMARKS.md).
        check_frames: after quantizing, compare the int8 model's argmax with the fp32 model's on this many
            calibration frames (0: skip) and warn when they agree on fewer than ``min_agreement`` of the
            pixels. On 16 training frames the lab recipe's checkpoint agreed on 97.3 % (0.77 mIoU point
            lost on validation frames), the default recipe's on 94.1-94.4 % (8.3 points lost).

    Weights are symmetric per output channel; activations asymmetric per tensor. ``reduce_range`` (7-bit
    weights) is used only on CPUs without VNNI, where the u8 x s8 multiply can saturate.

    Check the quality on your own checkpoint (``benchmarks/int8_quality.py``): one uint8 scale per tensor
    cannot hold heavy-tailed activations. The lab recipe's checkpoint lost 0.77 mIoU point, the default
    recipe's 8.3 points (decoder activations up to 137x their 99th percentile; BENCHMARKS.md, session 6).
    """
    _require_ort()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from .runtime import cpu_has_vnni

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise UnetsegError(f"calibration method {method!r} is not one of {', '.join(methods)}")
    if check_frames < 0:
        raise UnetsegError(f"check_frames {check_frames} must be 0 (no check) or more")
    frames = _as_float_images(calibration_images)
    if frames.ndim != 4 or len(frames) == 0:
        raise UnetsegError(f"calibration images must be (N, C, H, W) with N >= 1, got shape {frames.shape}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    fixed = _input_batch(onnx_path)
    step = fixed or max(1, calibration_batch)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = self._batches()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(frames), step):
                chunk = frames[i : i + step]
                if fixed and len(chunk) < fixed:  # a fixed-batch graph takes only full batches
                    if i:
                        break
                    chunk = np.concatenate([chunk] * math.ceil(fixed / len(chunk)))[:fixed]
                yield {"images": chunk}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._batches()

    import onnx

    model = onnx.load(str(onnx_path))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    exclude = convs[-1:] if keep_head_fp32 else []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pre.onnx"
        try:  # shape inference + constant folding, as ONNX Runtime recommends before quantizing
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(onnx_path), str(src), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; the plain model quantizes too
            src = onnx_path
        quantize_static(
            str(src),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=not cpu_has_vnni(),
            calibrate_method=methods[method],
            nodes_to_exclude=exclude,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    if check_frames > 0:
        agreement = int8_agreement(onnx_path, out_path, frames[:check_frames])
        if agreement < min_agreement:
            warnings.warn(
                f"{out_path}: the int8 model's classes agree with the fp32 model's on only {agreement:.1%} of "
                f"the pixels of {min(check_frames, len(frames))} calibration frames (below {min_agreement:.0%}): "
                "expect a large accuracy loss; measure it on validation frames with benchmarks/int8_quality.py "
                "and prefer the bf16 path (BENCHMARKS.md, session 6)",
                UserWarning,
                stacklevel=2,
            )
    return out_path


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
