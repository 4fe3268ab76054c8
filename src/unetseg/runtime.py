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
import shutil
import sys
from collections.abc import Callable, Iterator

import torch

from .errors import UnetsegError

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


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + ``torch.inference_mode`` for the block, restoring the model's training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Fast paths: torch.compile where it pays off, and a prepared inference model for predict/evaluate.
# --------------------------------------------------------------------------------------------------

#: Rough costs and gains of ``torch.compile`` (inductor) on the lab model, batch 32, 96x128, measured on
#: a 2-core AVX512-BF16 CPU with torch 2.13 (see BENCHMARKS.md): seconds to compile the first call with
#: a cold cache, and the fraction of each call's time that the compiled code saves over the eager
#: path it replaces. ``compile_pays_off`` weighs them against a run's length.
COMPILE_COST_S = {"train": 150.0, "infer": 60.0}
COMPILE_SAVING = {"train": 0.20, "infer": 0.25}


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

    The saving is ``COMPILE_SAVING[kind] * seconds_eager``; compile only if it is at least twice the
    compile cost, since a cold cache, a slower machine or a busy one can easily double it.
    """
    if not compile_available(device)[0]:
        return False
    cost = COMPILE_COST_S[kind] if compile_cost_s is None else compile_cost_s
    return COMPILE_SAVING[kind] * seconds_eager >= 2.0 * cost


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


class InferenceModel(torch.nn.Module):
    """A frozen copy of a model on the fastest sound path, for predict/evaluate/benchmark.

    ``InferenceModel(model, precision, device)(images)``: images float ``(N, C, H, W)`` in ``[0, 1]``
    on any device → float32 logits ``(N, n_classes, H', W')`` on ``device``. Made by
    ``prepare_model_for_inference``; the source model is not modified.

    * ``bf16``: the copy's weights are stored in bf16 (not autocast, which re-casts every weight on every
      call: ~5 ms of a 12 ms single-image forward on the lab model); the logits are returned in fp32.
    * channels_last on the CPU: oneDNN's native layout, so no reorders around each conv.
    * ``compiled``: ``torch.compile`` with inductor and weight freezing (constant-folded, prepacked
      weights, convs fused with bias and ReLU). Shapes are static: a batch smaller than ``batch_size``
      is zero-padded so that every call reuses one compiled graph.

    It exposes the wrapped network's ``arch``, ``depth`` and ``config``, so code that reads them
    (``train.forward_full``) takes it in place of the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        device: torch.device,
        compiled: bool = False,
        batch_size: int | None = None,
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
        self.arch = getattr(model, "arch", "lab")
        self.depth = getattr(model, "depth", 4)
        self.config = dict(getattr(model, "config", {}))
        self.compiled = compiled
        self.batch_size = batch_size
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.net
        if compiled:
            # Freezing folds the (now constant) weights into the graph, which lets inductor prepack them
            # for oneDNN and fuse conv + bias + ReLU; it needs no_grad, which forward guarantees.
            self._fn = torch.compile(self.net, dynamic=False, options={"freezing": True})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            n = x.shape[0]
            pad = (self.batch_size or 0) - n if self.compiled else 0
            if pad > 0:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]).contiguous(memory_format=self.memory_format)
            out = self._fn(x)
            return out[:n].float()


def prepare_model_for_inference(
    model: torch.nn.Module,
    precision: str = "auto",
    device: torch.device | str = "cpu",
    compile: str | bool = "off",
    n_images: int = 0,
    batch_size: int | None = None,
) -> InferenceModel:
    """The model on its fastest numerically sound inference path (see ``InferenceModel``).

    Args:
        model: any unetseg model (left untouched: the result holds a copy).
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``fp32`` or ``bf16``.
        device: where to run.
        compile: ``auto`` (only when ``n_images`` is enough to pay for compiling), ``on`` or ``off``.
        n_images: how many images the caller will run, for ``compile="auto"``.
        batch_size: the caller's batch size; compiled models pad smaller batches to it.

    The predictions agree with fp32 eager's argmax on >= 99.9 % of pixels (tests/test_bench.py).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    # Rough eager time for the compile decision: the lab model runs ~60 img/s in bf16 on two cores.
    compiled = resolve_compile(compile, "infer", n_images / 60.0, device)
    return InferenceModel(model, precision, device, compiled=compiled, batch_size=batch_size)
