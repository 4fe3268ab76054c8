"""Where and how the model runs: device, precision, threads, memory layout.

``auto`` choices pick the fastest numerically sound path: bf16 autocast only where the hardware does bf16
matmuls natively (AVX512-BF16 or AMX on a CPU, a CUDA GPU with bf16), channels_last on CPU.

Example:
    >>> from unetseg.runtime import resolve_precision, autocast
    >>> import torch
    >>> p = resolve_precision("fp32", torch.device("cpu"))
    >>> with autocast(p, torch.device("cpu")):
    ...     pass
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import shutil
import sys
from collections.abc import Callable

import torch

from .errors import UnetsegError
from .model import LOGITS_LAYER_NAMES

PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where unreadable, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_vnni() -> bool:
    """True where int8 dot products run natively (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def cpu_has_amx() -> bool:
    """True where the CPU has AMX tile units for bf16 (Intel Xeon since Sapphire Rapids), which oneDNN's bf16
    convs use: on such a 2-core host the bf16 matmul peak was 1.9-2.1 TFLOP/s and the lab model's bf16
    inference outran ONNX Runtime's int8 kernels 1.7x (BENCHMARKS.md, session 15)."""
    return "amx_bf16" in cpu_flags()


def int8_may_saturate() -> bool:
    """True on an x86 CPU without VNNI: there ONNX Runtime multiplies u8 activations by s8 weights with AVX2's
    ``vpmaddubsw``, whose int16 pair sums saturate for signed 8-bit weights (unsigned weights, which it
    widens first, and 7-bit ones cannot). ARM's int8 dot products and x86 VNNI accumulate in int32."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not cpu_has_vnni()


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnetsegError(f"device {name!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto | fp32 | bf16`` into ``fp32`` or ``bf16`` for ``device``."""
    if precision not in PRECISIONS:
        raise UnetsegError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: leave torch's default, the physical cores) and return it."""
    if threads is not None:
        if threads < 1:
            raise UnetsegError(f"--threads {threads} must be at least 1")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPU (oneDNN's native layout: no reorders around each conv), contiguous elsewhere."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def describe(device: torch.device, precision: str) -> dict:
    """Plain facts about the run's hardware and software, for config.yaml and benchmark output."""
    info = {
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": cpu_has_native_bf16(),
        "cpu_vnni": cpu_has_vnni(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------------
# Fast paths: torch.compile where it pays off, and a prepared inference model for predict/evaluate.
# --------------------------------------------------------------------------------------------------

#: Rough costs and gains of ``torch.compile`` (inductor) on the lab model, batch 32, 96x128, measured on a
#: 2-core AVX512-BF16 CPU with torch 2.13 (see BENCHMARKS.md): seconds to compile the first call with a cold
#: cache, and the fraction of each call's time that the compiled code saves over the eager path it
#: replaces. On that CPU a compiled bf16 *training* step was ~15 % slower than eager (its convolutions are
#: the same oneDNN calls and inductor's other kernels were slower), and so was the default recipe's fp32 step
#: with batch norm on an AVX2-only Zen 3 (0.85-0.97x eager's speed; session 27): compiling
#: never pays for CPU training; compiled inference (weights frozen) was 4-8 % faster at batch 32 on the
#: quiet machine (1-2 % under heavy load; 13-32 % lower single-image latency) and its first call took 18.6 s
#: with an empty inductor cache. The CUDA figures are typical ones, not measured here. ``compile_pays_off`` weighs them
#: against a run's length.
COMPILE_COST_S = {"train": 150.0, "infer": 20.0}
COMPILE_SAVING = {
    ("cpu", "train"): 0.0,
    ("cpu", "infer"): 0.07,
    ("cuda", "train"): 0.20,
    ("cuda", "infer"): 0.25,
}


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch.compile`` with inductor can run here, and if not, why.

    On a CPU inductor writes C++ and needs a compiler (``$CXX``, ``g++`` or ``clang++``); Windows and
    Python versions dynamo does not support are ruled out.
    """
    if not hasattr(torch, "compile"):
        return False, "torch.compile needs torch >= 2.0"
    if sys.platform == "win32":
        return False, "inductor is not supported on Windows CPUs"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return False, f"torch.compile does not support Python {sys.version.split()[0]}"
    except Exception as e:  # noqa: BLE001 - any import failure means no compile
        return False, f"torch._dynamo unavailable: {e}"
    if device.type == "cpu":
        cxx = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
        if not any(c and shutil.which(c) for c in cxx):
            return False, "no C++ compiler (g++/clang++) for inductor's CPU kernels"
    return True, ""


def compile_pays_off(
    kind: str, seconds_eager: float, device: torch.device, compile_cost_s: float | None = None
) -> bool:
    """Whether compiling saves more than it costs for work that takes ``seconds_eager`` uncompiled.

    Args:
        kind: ``"train"`` or ``"infer"``.
        seconds_eager: how long the run's steps would take on the eager path (e.g. ``steps * s/step``).
        device: where it runs; False wherever ``compile_available`` is False.
        compile_cost_s: override the measured compile time (``COMPILE_COST_S``).

    The saving is ``COMPILE_SAVING[device.type, kind] * seconds_eager``; compile only if it is at least
    twice the compile cost, since a cold cache, a slower machine or a busy one can easily double it.
    """
    if not compile_available(device)[0]:
        return False
    cost = COMPILE_COST_S[kind] if compile_cost_s is None else compile_cost_s
    saving = COMPILE_SAVING.get((device.type, kind), 0.0)
    return saving > 0 and saving * seconds_eager >= 2.0 * cost


def resolve_compile(flag: str | bool, kind: str, seconds_eager: float, device: torch.device) -> bool:
    """Turn ``--compile auto|on|off`` (or a bool) into a decision; ``on`` still needs ``compile_available``."""
    if isinstance(flag, bool):
        flag = "on" if flag else "off"
    if flag not in ("auto", "on", "off"):
        raise UnetsegError(f"compile {flag!r} is not one of auto, on, off")
    if flag == "off":
        return False
    if flag == "on":
        ok, why = compile_available(device)
        if not ok:
            raise UnetsegError(f"--compile on is not possible here: {why}; use --compile auto or off")
        return True
    return compile_pays_off(kind, seconds_eager, device)


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` for training: inductor, static shapes (the batch size is fixed, the last batch
    of an epoch recompiles once at most)."""
    return torch.compile(model, dynamic=False)


class _Fp32Head(torch.nn.Module):
    """The final 1x1 logits conv kept in fp32 inside a bf16 network: ``(N, C, H, W)`` any float → fp32 logits.

    Optional (``InferenceModel(fp32_head=True)``): fp32 logits cannot flip argmax between classes whose
    logits differ by less than bf16's rounding step (~0.4 % of their size), but on a CPU the fp32 1x1 conv
    over bf16 activations costs ~7 % of the lab model's batch time (the cast and a slow fp32 kernel with
    23 output channels), and on a trained lab checkpoint it raised argmax agreement with fp32 eager only
    from 99.81 to 99.83 %: the flips come from bf16 rounding throughout the network (BENCHMARKS.md).
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float())


def _conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: torch.nn.Conv2d) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "relu", [], "",
    )


class _ConvReLUFunction(torch.autograd.Function):
    """oneDNN's fused conv + ReLU with the gradients autograd computes for ``relu(conv2d(x))``.

    Backward is the same two aten calls autograd makes for the unfused pair (ReLU's ``threshold_backward``
    on the saved output, then ``convolution_backward``), so gradients are bit for bit the same; what goes
    is the forward's separate ReLU pass over each activation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv):  # type: ignore[override]
        out = _conv_relu(x, weight, bias, conv)
        ctx.save_for_backward(x, weight, out)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, out = ctx.saved_tensors
        conv = ctx.conv
        grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, want,
        )
        return grad_x, grad_w, grad_b, None


class _ConvReLU(torch.nn.Conv2d):
    """A ``Conv2d`` and the ``ReLU`` after it as one oneDNN primitive (ReLU as the conv's post-op), CPU only.

    ``fuse_conv_relu`` turns a conv into one in place (same parameters and state-dict keys). The outputs
    are identical to conv-then-ReLU (ReLU commutes with rounding to bf16), and so are the gradients when
    grad is on (``_ConvReLUFunction``); under CPU autocast it casts as autocast casts ``conv2d``. What goes
    is the separate pass over each activation: on the lab model in bf16 eager (batch 32, 2 cores) 4.4 %
    more inference images/s (``benchmarks/inference_ab.py``, BENCHMARKS.md), and on an AMX CPU, where
    the convs are fast and that pass is ~8 % of a training step, the training step too (BENCHMARKS.md,
    session 15). ``torch.compile`` does the same fusion itself, so compiled models keep plain layers.
    """

    #: oneDNN's own copy of the weight in its blocked layout, set for frozen inference models only
    #: (``prepack_conv_relu_weights``); training and autocast always use ``weight``.
    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.packed_weight is not None and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            return _conv_relu(x, self.packed_weight, bias, self)
        if torch.is_autocast_enabled("cpu"):  # what autocast does to conv2d's arguments
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _ConvReLUFunction.apply(x, weight, bias, self)
        return _conv_relu(x, weight, bias, self)


def _fusable_conv(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Conv2d and not isinstance(m.padding, str) and m.padding_mode == "zeros"


@functools.cache
def _fused_conv_runs(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's fused conv + ReLU for ``dtype`` on the CPU (a tiny trial: the
    op is internal to torch and not every build or CPU has it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    try:
        x, w = torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype)
        y = torch.ops.mkldnn._convolution_pointwise(x, -w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool((y == 0).all())


def fuse_conv_relu(net: torch.nn.Module, dtypes: tuple[torch.dtype, ...] = ()) -> int:
    """Turn, in place, each ``Conv2d`` directly followed by a ``ReLU`` (in an ``nn.Sequential``, or the lab
    U-Net's ``conv9``/``relu9``) into a ``_ConvReLU`` and that ReLU into an ``Identity``; returns how many.

    CPU only (the fused op has no GPU kernel); for inference and for training (same outputs and gradients).
    A no-op where this torch build or CPU lacks oneDNN's fused op for the weights' dtype or any of
    ``dtypes`` (for training under bf16 autocast: ``(torch.bfloat16,)``).
    """
    dtype = next((p.dtype for p in net.parameters()), torch.float32)
    if not all(_fused_conv_runs(d) for d in (dtype, *dtypes)):
        return 0
    fused = 0
    for module in list(net.modules()):
        if isinstance(module, torch.nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, relu = module._modules[a], module._modules[b]
                if _fusable_conv(conv) and type(relu) is torch.nn.ReLU:
                    conv.__class__ = _ConvReLU
                    module._modules[b] = torch.nn.Identity()
                    fused += 1
        conv9, relu9 = getattr(module, "conv9", None), getattr(module, "relu9", None)
        if conv9 is not None and _fusable_conv(conv9) and type(relu9) is torch.nn.ReLU:
            conv9.__class__ = _ConvReLU
            module.relu9 = torch.nn.Identity()
            fused += 1
    return fused


def prepack_conv_relu_weights(net: torch.nn.Module) -> int:
    """For a frozen inference copy: give each fused conv + ReLU of ``net`` its weight in oneDNN's blocked
    layout once, instead of a reorder on every call; returns how many (0 where this build cannot).

    The outputs are bit for bit the same (the same primitive runs). What goes is a weight reorder per conv per
    call, which matters for small batches: on the AMX host of session 16 one 96x128 image through the lab model
    in bf16 took 6.3 ms instead of 8.0-8.2 (``python benchmarks/inference_ab.py --batch-size 1 --settle 0``),
    a batch of 32 1.00-1.03x less time (BENCHMARKS.md, session 16). The packed copy does not follow later
    changes to ``weight``: only for models whose weights no longer change (``InferenceModel``).
    """
    if not hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"):
        return 0
    packed = 0
    for m in net.modules():
        if isinstance(m, _ConvReLU) and m.weight.device.type == "cpu":
            try:
                m.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                    m.weight.detach(), list(m.padding), list(m.stride), list(m.dilation), m.groups, None
                )
            except (RuntimeError, NotImplementedError):
                return packed
            packed += 1
    return packed


def count_fused_conv_relu(net: torch.nn.Module) -> int:
    """How many conv + ReLU pairs of ``net`` run as one oneDNN primitive (``fuse_conv_relu``)."""
    return sum(isinstance(m, _ConvReLU) for m in net.modules())


class InferenceModel(torch.nn.Module):
    """A frozen copy of a model on the fastest sound path, for predict/evaluate/benchmark.

    ``InferenceModel(model, precision, device)(images)``: images float ``(N, C, H, W)`` in ``[0, 1]``
    on any device → float32 logits ``(N, n_classes, H', W')`` on ``device``. Made by
    ``prepare_model_for_inference``; the source model is not modified.

    * ``bf16``: the copy's weights are stored in bf16 (not autocast, which re-casts every weight on every
      call); logits are returned as fp32 (``fp32_head=True`` also computes the last 1x1 conv in fp32).
    * channels_last on the CPU: oneDNN's native layout, so no reorders around each conv.
    * eager on the CPU: each conv + ReLU runs as one oneDNN primitive (``fuse_conv_relu``; ``fuse=False``
      keeps them apart) on weights prepacked in oneDNN's layout (``prepack_conv_relu_weights``), same outputs.
    * ``compiled``: ``torch.compile`` with inductor and weight freezing (constant-folded, prepacked
      weights, convs fused with bias and ReLU). Shapes are static: a batch smaller than ``batch_size``
      is zero-padded so that every call reuses one compiled graph.

    It exposes the wrapped network's ``arch``, ``depth`` and ``config``, so code that reads them
    (``model.forward_full``) takes it in place of the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        device: torch.device,
        compiled: bool = False,
        batch_size: int | None = None,
        fp32_head: bool = False,
        fuse: bool = True,
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.memory_format = memory_format(self.device)
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        if fp32_head and self.dtype != torch.float32:
            for name in LOGITS_LAYER_NAMES:
                head = getattr(model, name, None)
                if isinstance(head, torch.nn.Conv2d):
                    fp32 = copy.deepcopy(head).to(self.device, memory_format=self.memory_format).eval()
                    fp32.requires_grad_(False)
                    setattr(self.net, name, _Fp32Head(fp32))
        self.arch = getattr(model, "arch", "lab")
        self.depth = getattr(model, "depth", 4)
        self.config = dict(getattr(model, "config", {}))
        self.compiled = compiled
        self.batch_size = batch_size
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.net
        self.fused_conv_relu = self.prepacked_weights = 0
        if compiled:
            self._fn = torch.compile(self.net, dynamic=False)
        elif fuse and self.device.type == "cpu":
            self.fused_conv_relu = fuse_conv_relu(self.net)
            self.prepacked_weights = prepack_conv_relu_weights(self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            n = x.shape[0]
            pad = (self.batch_size or 0) - n if self.compiled else 0
            if pad > 0:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]).contiguous(memory_format=self.memory_format)
            if self.compiled:
                # Freezing folds the (now constant) weights into the graph, which lets inductor prepack
                # them for oneDNN and fuse conv + bias + ReLU (it needs no_grad: inference_mode is).
                # It must be set while the first call of each shape compiles; torch.compile(options=...)
                # does not reach it (torch 2.13), hence the config patch around every call.
                import torch._inductor.config as inductor_config

                with inductor_config.patch(freezing=True):
                    out = self._fn(x)
            else:
                out = self._fn(x)
            return out[:n].float()


def prepare_model_for_inference(
    model: torch.nn.Module,
    precision: str = "auto",
    device: torch.device | str = "cpu",
    compile: str | bool = "off",
    n_images: int = 0,
    batch_size: int | None = None,
    image_size: tuple[int, int] | None = (96, 128),
) -> InferenceModel:
    """The model on its fastest numerically sound inference path (see ``InferenceModel``).

    Args:
        model: any unetseg model (left untouched: the result holds a copy).
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``fp32`` or ``bf16``.
        device: where to run.
        compile: ``auto`` (only when ``n_images`` is enough to pay for compiling), ``on`` or ``off``.
        n_images: how many images the caller will run, for ``compile="auto"``.
        image_size: their ``(H, W)`` in pixels (the eager time estimate scales with it); ``None`` when the
            images keep their own, varying sizes: each new size would compile again, so ``auto`` never does.
        batch_size: the caller's batch size; compiled models pad smaller batches to it.

    On the CPU it also calls ``retain_freed_memory()`` and ``flush_denormals()`` (process-wide). bf16 is as
    exact as autocast: on a small trained model argmax agrees with fp32 eager on >= 99.9 % of pixels
    (tests/test_bench.py); on a lab checkpoint whose logits reach +-200, on 99.81 % with unchanged mIoU
    (BENCHMARKS.md). Use ``precision="fp32"`` for fp32-identical masks.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if device.type == "cpu":
        retain_freed_memory()  # ~20 % of a CPU batch is page faults on fresh activations otherwise
        flush_denormals()
    # Rough eager time for the compile decision: the lab model runs ~75 96x128 images/s per core in bf16
    # (BENCHMARKS.md), and its cost grows with the pixel count.
    if image_size is None and compile == "auto":
        compile = "off"
    h, w = image_size or (96, 128)
    compiled = resolve_compile(compile, "infer", n_images * h * w / (96 * 128) / 75.0, device)
    return InferenceModel(model, precision, device, compiled=compiled, batch_size=batch_size)


def prepare_model_for_training(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """``model`` moved, in place, onto the fastest sound training path of ``device``; returns it.

    ``precision`` is the resolved one (``fp32`` or ``bf16``, autocast). The weights stay fp32 (the
    optimizer's), in the device's memory format; on the CPU each conv + ReLU becomes one oneDNN primitive
    whose gradients are autograd's own (``fuse_conv_relu``): same weights after every step, bit for bit.
    State-dict keys are unchanged, so checkpoints load into an unprepared model.
    """
    model.to(device, memory_format=memory_format(device))
    if device.type == "cpu":
        fuse_conv_relu(model, (torch.bfloat16,) if precision == "bf16" else ())
    return model


_ALLOCATOR_TUNED: bool | None = None


def flush_denormals() -> bool:
    """Treat subnormal floats (below 1.2e-38) as zero in CPU arithmetic (FTZ/DAZ), as TensorFlow does; True
    if applied.

    Adam's second-moment estimate of a tiny gradient (|g| below ~1e-18) is subnormal, and x86 CPUs handle
    subnormal operands in microcode, many times slower: the optimizer's ``sqrt`` took 2.5 instead of
    0.4 ms per tensor, and the lab model's bf16 training step is 4 % faster with them flushed on the quiet
    machine (BENCHMARKS.md). Where it matters, Adam's step for such a weight is at most ~lr * 1e-10.
    Process-wide; ``UNETSEG_DENORMALS=keep`` leaves the CPU as it is. Idempotent.
    """
    if os.environ.get("UNETSEG_DENORMALS", "") == "keep":
        return False
    return bool(torch.set_flush_denormal(True))


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True if applied.

    PyTorch's CPU allocator takes every tensor from malloc and frees it when the tensor dies. glibc serves
    large blocks (the lab model's 25-50 MB activations) with fresh ``mmap`` pages and unmaps them on free,
    so every forward pass page-faults and zero-fills each activation again: on a 2-core AVX512-BF16 CPU that
    is ~20 % of a bf16 inference batch (72 vs 60 img/s per core, BENCHMARKS.md). With mmap off and trimming
    off, freed blocks stay in the heap and the next step reuses them, as TensorFlow's own allocator does.
    The cost is that the process keeps its peak footprint until it exits, which suits the CLI's
    single-purpose processes. Linux/glibc only; elsewhere, or with ``UNETSEG_MALLOC=default``, it does
    nothing. Idempotent.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if os.environ.get("UNETSEG_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED
