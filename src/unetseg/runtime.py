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
import functools
import os
from collections.abc import Iterator

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
        "torch": torch.__version__,
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
