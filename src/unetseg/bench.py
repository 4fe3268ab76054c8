"""``unetseg benchmark``: training and inference speed of every execution path, side by side.

One run times, for each *mode* (an execution path), one training step at ``batch_size`` (img/s),
inference on a batch of ``batch_size`` (img/s) and single-image latency (ms). Modes are timed
round-robin, one repetition of each per round, and each figure is the median over the rounds after
warm-up, so a machine that gets busier half-way slows every mode alike and the ratios stay fair. A
square matmul is timed in the same rounds, fp32 and bf16, so every rate is also given as a fraction of
what this machine's matmul reaches right now.

Modes (``--modes`` takes a comma-separated subset; ``auto`` and ``fp32`` are always useful):

=============  =======================================================================================
``fp32``       eager fp32, NCHW (the baseline)
``fp32_cl``    eager fp32, channels_last
``bf16``       eager bf16 autocast, channels_last (conv and ReLU apart, as written)
``fp32_compile``  ``torch.compile`` (inductor) fp32 channels_last; inference with frozen weights
``bf16_compile``  ``torch.compile`` bf16 autocast channels_last; inference with frozen bf16 weights
``onnx_fp32``  ONNX Runtime fp32 (inference only)
``onnx_int8``  ONNX Runtime int8, static QDQ quantization, transposed convs rewritten (inference only)
``onednn_int8``  int8 through oneDNN in PyTorch (``int8.Int8UNet``; x86 with VNNI/AMX; inference only)
``auto``       what the toolkit picks by itself: ``train.train_step`` on the model prepared as ``unetseg
               train`` prepares it, and ``runtime.prepare_model_for_inference`` as predict/evaluate do
=============  =======================================================================================

Process-wide settings the toolkit's commands use are applied to every mode alike and recorded in
``settings``: ``runtime.retain_freed_memory()`` (glibc keeps freed activations instead of page-faulting
fresh ones each step; ``UNETSEG_MALLOC=default`` turns it off), ``runtime.flush_denormals()`` (subnormal
floats as zero, as TensorFlow does; ``UNETSEG_DENORMALS=keep`` turns it off) and, set by ``unetseg benchmark`` before
torch loads, ``OMP_WAIT_POLICY=PASSIVE`` when the machine is already busy.

GFLOP counts are the convolutions' multiply-adds x 2 (5.02 GFLOP per 96x128 image forward for the lab
model; a training step counts 3x the forward). ``peak_rss_mib`` is the peak RSS of a fresh child process
training on the auto path (``train_peak_rss``); the per-mode ``peak_rss_mib`` in the table is this
process's high-water mark during that mode's steps (reset before them through ``/proc/self/clear_refs``),
which includes every other mode's models and the retained heap, so only its rise says anything.

Example:
    $ unetseg benchmark --json bench.json
    $ unetseg benchmark --quick --size 32 32 --batch-size 4 --filters 4 --depth 2 --modes fp32,auto
    >>> from unetseg.bench import run_benchmark
    >>> r = run_benchmark(quick=True, size=(32, 32), batch_size=4, modes=["fp32", "auto"],
    ...                   model_options=dict(base_filters=4, depth=2, n_classes=5), verbose=False)
    >>> r["infer_images_per_s"] > 0 and r["auto"]["precision"] in ("bf16", "fp32")
    True
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnetsegError
from .model import build_model
from .runtime import (
    InferenceModel,
    autocast,
    compile_available,
    compile_for_training,
    cpu_has_native_bf16,
    describe,
    flush_denormals,
    memory_format,
    pick_device,
    prepare_model_for_training,
    resolve_compile,
    resolve_precision,
    retain_freed_memory,
    set_threads,
)

__all__ = [
    "ALL_MODES",
    "Subject",
    "count_flops",
    "matmul_gflops",
    "run_benchmark",
    "format_report",
    "main",
    "main_from_args",
]

ALL_MODES = (
    "fp32", "fp32_cl", "bf16", "fp32_compile", "bf16_compile", "onnx_fp32", "onnx_int8", "onednn_int8", "auto",
)
DEFAULT_MODES = ALL_MODES

#: The lab's training run (40 epochs over the 1060 CARLA frames): the length the ``auto`` path's
#: compile decision assumes unless told otherwise.
LAB_TRAIN_IMAGES = 40 * 1060
#: Images the ``auto`` inference path expects to process (evaluating or predicting a folder of frames).
LAB_INFER_IMAGES = 1060
# Pause before each subject's turn in a round (untimed). Thread pools that busy-wait after their work
# (ONNX Runtime's by default, TensorFlow's Eigen pool in the Keras workers) otherwise take CPU from the
# next subject: right after an ONNX Runtime int8 batch, the lab model's bf16 inference batch took 308 ms,
# 253 ms after a 0.2 s pause, 247 ms after another torch batch (experiments/ort_spin.py, 2 cores).
SETTLE_S = 0.25


# ------------------------------------------------------------------------------------------------ FLOPs
def count_flops(model: nn.Module, size: tuple[int, int], in_channels: int | None = None) -> float:
    """Forward FLOPs for one image of ``size`` ``(H, W)``: 2 x multiply-adds of every conv layer.

    Traced on the ``meta`` device (instant, no memory). A transposed conv counts every tap it computes,
    including the ones ``ConvTranspose2dSame`` crops away; bias, ReLU, pooling and concat are not counted.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    total = 0.0

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
        if isinstance(mod, nn.ConvTranspose2d):
            _, cin, h, w = inputs[0].shape
            total += 2.0 * h * w * cin * mod.out_channels * k
        else:
            _, cout, h, w = out.shape
            total += 2.0 * h * w * cout * mod.in_channels * k

    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    cin = in_channels or int(getattr(model, "config", {}).get("in_channels", 3))
    try:
        with torch.no_grad():
            meta(torch.empty(1, cin, *size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def peak_reference(precision: str, has_bf16_peak: bool) -> str:
    """The matmul peak (``fp32`` | ``bf16``) that a mode of ``precision`` is compared with.

    int8 is compared with the bf16 peak where there is one (the fastest float path it has to beat), else
    with the fp32 peak.
    """
    if precision == "fp32" or not has_bf16_peak:
        return "fp32"
    return "bf16"


def matmul_gflops(dtype: torch.dtype, n: int, device: torch.device) -> Callable[[], float]:
    """A callable that times one ``n x n`` matmul in ``dtype`` and returns seconds (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run() -> float:
        _sync(device)
        t = _clock()
        torch.mm(a, b)
        _sync(device)
        return _clock() - t

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ RSS
def _rss_mib() -> tuple[float | None, float | None]:
    """``(current RSS, high-water mark)`` of this process in MiB from /proc (``None`` where unreadable)."""
    cur = hwm = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, hwm


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_probe(
    model_options: dict[str, Any], batch: int, size: tuple[int, int], precision: str, steps: int,
    threads: int | None, queue: Any,
) -> None:
    """Child process body for ``train_peak_rss``: a fresh interpreter running only the auto training path."""
    try:
        set_threads(threads)
        dev = torch.device("cpu")
        retain_freed_memory()
        flush_denormals()
        opts = dict(model_options)
        model = build_model(opts.pop("arch", "lab"), **opts).train()
        prepare_model_for_training(model, resolve_precision(precision, dev), dev)
        opt = _make_optimizer(model)
        step_fn, _ = _train_step_fn()
        cin = int(model.config["in_channels"])
        images = torch.rand(batch, cin, *size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out_hw = model.eval()(images[:1]).shape[-2:]
        model.train()
        masks = torch.randint(0, int(model.config["n_classes"]), (batch, *out_hw))
        before, _ = _rss_mib()
        for _ in range(steps):
            step_fn(model, opt, images, masks, resolve_precision(precision, dev), dev)
        _, hwm = _rss_mib()
        queue.put({"peak_rss_mib": hwm, "rss_before_training_mib": before, "steps": steps})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which carries on without the figure
        queue.put({"error": f"{type(e).__name__}: {e}"})


def train_peak_rss(
    model_options: dict[str, Any] | None = None,
    batch_size: int = 32,
    size: tuple[int, int] = (96, 128),
    precision: str = "auto",
    steps: int = 3,
    threads: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak RSS (MiB) of a fresh process that trains on the CPU's auto path for ``steps`` steps.

    Measured in a child process (``spawn``) because in the benchmark's own process the other modes'
    models and the retained heap (``retain_freed_memory``) make any high-water mark meaningless. Returns
    ``peak_rss_mib`` (the whole process: interpreter, torch, model, Adam state, activations and
    gradients at ``batch_size``) and ``rss_before_training_mib`` (after building model and optimizer).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_rss_probe,
        args=(model_options or {}, batch_size, tuple(size), precision, steps, threads, queue),
    )
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - queue.Empty on timeout, or a dead child
        result = {"error": f"no result from the RSS probe: {type(e).__name__}"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return result


# ------------------------------------------------------------------------------------------------ subjects
@dataclass
class Subject:
    """One execution path under test. Each callable runs one repetition and returns its seconds.

    ``train``: one training step on ``batch`` images; ``infer``: logits for ``batch`` images;
    ``latency``: logits for one image. Any may be ``None`` (not applicable). ``precision`` (``fp32`` |
    ``bf16`` | ``int8``) picks the matmul peak its GFLOP/s are compared with. ``info`` is copied to the
    report (compile seconds, decisions, ...). ``external`` subjects (the Keras script's workers) run in
    another process and time themselves, so this process's RSS says nothing about them.
    """

    name: str
    description: str
    precision: str
    train: Callable[[], float] | None = None
    infer: Callable[[], float] | None = None
    latency: Callable[[], float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    external: bool = False


#: ``--clock``: wall time, or this process's CPU time (all its threads). CPU time ignores the time the
#: process waits while other processes hold the cores, so on a busy shared machine ``--threads 1
#: --clock cpu`` still measures how much work each path needs; it is meaningless for GPU work.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        t = _clock()
        fn()
        _sync(device)
        return _clock() - t

    return run


def _train_step_fn() -> tuple[Callable[..., Any], str]:
    """The toolkit's own training step, so the benchmark times what training runs."""
    from .train import train_step

    return train_step, "unetseg.train.train_step"


def _make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Adam as the lab recipe builds it (lr 1e-3, Keras' epsilon 1e-7)."""
    from .train import make_optimizer

    return make_optimizer("adam", model, lr=1e-3)


def auto_decisions(
    device: torch.device,
    precision: str = "auto",
    compile: str = "auto",
    train_images: int = LAB_TRAIN_IMAGES,
    infer_images: int = LAB_INFER_IMAGES,
    eager_train_images_per_s: float = 19.0,
    eager_infer_images_per_s: float = 75.0,
) -> dict[str, Any]:
    """What the toolkit picks by itself for a run of ``train_images`` / ``infer_images`` images.

    ``eager_*_images_per_s`` are rough eager rates used only to estimate how long the run would take
    uncompiled (the lab model in bf16 on one AVX512-BF16 core, BENCHMARKS.md); compile is chosen when it
    saves at least twice its cost (``runtime.compile_pays_off``).
    """
    resolved = resolve_precision(precision, device)
    ok, why = compile_available(device)
    return {
        "precision": resolved,
        "memory_format": "channels_last" if memory_format(device) == torch.channels_last else "contiguous",
        "compile_train": resolve_compile(compile, "train", train_images / eager_train_images_per_s, device),
        "compile_infer": resolve_compile(compile, "infer", infer_images / eager_infer_images_per_s, device),
        "compile_available": ok,
        "compile_unavailable_reason": why,
        "assumed_train_images": train_images,
        "assumed_infer_images": infer_images,
    }


class _Setup:
    """Shared inputs and the base model every torch mode copies its weights from."""

    def __init__(
        self, model: nn.Module, batch: int, size: tuple[int, int], device: torch.device, n_classes: int, seed: int
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        cin = int(getattr(model, "config", {}).get("in_channels", 3))
        self.model, self.batch, self.size, self.device = model, batch, size, device
        # uint8 frames scaled to [0, 1], as the data pipeline feeds the model
        self.frames = torch.randint(0, 256, (batch, cin, *size), generator=g, dtype=torch.uint8)
        self.images = (self.frames.float() / 255).to(device)
        with torch.no_grad():
            out_hw = model.eval()(self.images[:1].cpu()).shape[-2:]
        self.masks = torch.randint(0, n_classes, (batch, *out_hw), generator=g).to(device)
        self.one = self.images[:1].clone()


def _torch_subject(name: str, s: _Setup, auto: dict[str, Any], parts: set[str]) -> Subject:
    """Build the subject for a torch mode; compiling happens lazily in the warm-up calls."""
    dev = s.device
    cl = name != "fp32"
    precision = {"fp32": "fp32", "fp32_cl": "fp32", "fp32_compile": "fp32"}.get(name, "bf16")
    compile_train = compile_infer = name.endswith("_compile")
    if name == "auto":
        precision, compile_train, compile_infer = auto["precision"], auto["compile_train"], auto["compile_infer"]
        cl = auto["memory_format"] == "channels_last"
    if (compile_train or compile_infer) and name != "auto":
        ok, why = compile_available(dev)
        if not ok:
            raise UnetsegError(f"torch.compile unavailable: {why}")
    if precision == "bf16" and dev.type == "cpu" and name != "auto":
        if not cpu_has_native_bf16():
            raise UnetsegError("this CPU has no native bf16 (AVX512-BF16/AMX); bf16 would be emulated")
    mf = torch.channels_last if cl else torch.contiguous_format
    desc = {
        "fp32": "eager fp32 NCHW (baseline)",
        "fp32_cl": "eager fp32 channels_last",
        "bf16": "eager bf16 autocast channels_last",
        "fp32_compile": "torch.compile fp32 channels_last (inference: frozen weights)",
        "bf16_compile": "torch.compile bf16 autocast channels_last (inference: frozen bf16 weights)",
        "auto": "the toolkit's own choice",
    }[name]
    subject = Subject(name, desc, precision, info={"precision": precision, "channels_last": cl})
    step_fn, step_name = _train_step_fn()
    if "train" in parts:
        model = copy.deepcopy(s.model).to(dev, memory_format=mf).train()
        if name == "auto" and not compile_train:  # as unetseg train prepares it; the others as written
            prepare_model_for_training(model, precision, dev)
        opt = _make_optimizer(model)
        runner = compile_for_training(model) if compile_train else model
        images = s.images.contiguous(memory_format=mf)

        def train() -> None:
            step_fn(runner, opt, images, s.masks, precision, dev)

        subject.train = _timed(train, dev)
        subject.info.update(train_step=step_name, compile_train=compile_train)
    if "infer" in parts or "latency" in parts:
        if name in ("fp32", "fp32_cl", "bf16"):
            # The plain eager paths, exactly as written: fp32 weights, autocast for bf16.
            net = copy.deepcopy(s.model).to(dev, memory_format=mf).eval()

            def forward(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode(), autocast(precision, dev):
                    return net(x.contiguous(memory_format=mf)).float()

        else:
            net = InferenceModel(s.model, precision, dev, compiled=compile_infer, batch_size=None)
            forward = net
            subject.info.update(compile_infer=compile_infer, inference="runtime.InferenceModel")
        batch, one = s.images, s.one
        subject.infer = _timed(lambda: forward(batch), dev) if "infer" in parts else None
        subject.latency = _timed(lambda: forward(one), dev) if "latency" in parts else None
    return subject


def _onnx_subject(name: str, s: _Setup, workdir: Path, parts: set[str], threads: int) -> Subject:
    from .export import OnnxPredictor, export_onnx, onnxruntime_available, quantize_int8

    if not onnxruntime_available():
        raise UnetsegError("onnxruntime is not installed (pip install 'unetseg[onnx]')")
    if s.device.type != "cpu":
        raise UnetsegError("the ONNX modes run on the CPU only")
    t = time.perf_counter()
    fp32 = workdir / "model.onnx"
    if not fp32.exists():
        export_onnx(s.model, fp32, input_size=s.size, batch=None, rewrite_transposed=True)
    path, desc = fp32, "ONNX Runtime fp32 (transposed convs as conv + pixel shuffle)"
    if name == "onnx_int8":
        # Calibrated on the benchmark's frames; speed does not depend on the calibration data.
        path = quantize_int8(fp32, s.frames, workdir / "model.int8.onnx")
        desc = "ONNX Runtime int8 static QDQ (u8 activations, per-channel 8-bit weights: s8, u8 on x86 without VNNI)"
    predictor = OnnxPredictor(path, threads=threads)
    prep_s = time.perf_counter() - t
    batch, one = s.images.cpu().numpy(), s.one.cpu().numpy()
    subject = Subject(name, desc, "int8" if name == "onnx_int8" else "fp32", info={"prepare_s": round(prep_s, 2)})
    if "infer" in parts:
        subject.infer = _timed(lambda: predictor.run_numpy(batch), s.device)
    if "latency" in parts:
        subject.latency = _timed(lambda: predictor.run_numpy(one), s.device)
    return subject


def _onednn_int8_subject(s: _Setup, parts: set[str]) -> Subject:
    from .int8 import quantize_model

    if s.device.type != "cpu":
        raise UnetsegError("the oneDNN int8 mode runs on the CPU only")
    t = time.perf_counter()
    # Calibrated on the benchmark's frames (equalized, as an export is); speed does not depend on them.
    net = quantize_model(s.model, s.frames)
    subject = Subject("onednn_int8", "int8 through oneDNN (u8 activations, per-channel s8 weights, fused requant)",
                      "int8", info={"prepare_s": round(time.perf_counter() - t, 2), "inference": "int8.Int8UNet"})
    batch, one = s.images.cpu(), s.one.cpu()
    if "infer" in parts:
        subject.infer = _timed(lambda: net(batch), s.device)
    if "latency" in parts:
        subject.latency = _timed(lambda: net(one), s.device)
    return subject


# ------------------------------------------------------------------------------------------------ runner
def interleaved_times(
    fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0, settle_s: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of each call of each callable, run round-robin (one call each per round) so that a machine whose
    speed drifts slows them alike; ``warmup`` untimed rounds first, ``settle_s`` untimed sleep before each
    call. For the A/B scripts in ``benchmarks/`` and ``experiments/``; ``run_benchmark`` does the same for
    its modes.

    >>> {name: len(ts) for name, ts in interleaved_times({"a": lambda: None, "b": lambda: None}, rounds=3).items()}
    {'a': 3, 'b': 3}
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            time.sleep(settle_s)
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0, settle_s: float = 0.0
) -> dict[str, float]:
    """Median seconds of each callable over ``interleaved_times``' rounds.

    >>> sorted(interleaved_medians({"a": lambda: None, "b": lambda: None}, rounds=3))
    ['a', 'b']
    """
    times = interleaved_times(fns, rounds, warmup, settle_s)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_benchmark(
    modes: Sequence[str] | None = None,
    batch_size: int = 32,
    size: tuple[int, int] = (96, 128),
    repeats: int | None = None,
    quick: bool = False,
    precision: str = "auto",
    compile: str = "auto",
    threads: int | None = None,
    device: str = "auto",
    model_options: dict[str, Any] | None = None,
    parts: Sequence[str] = ("train", "infer", "latency"),
    latency_calls: int | None = None,
    train_images: int = LAB_TRAIN_IMAGES,
    infer_images: int = LAB_INFER_IMAGES,
    extra_subjects: Sequence[Subject] = (),
    clock: str = "wall",
    measure_rss: bool = True,
    seed: int = 0,
    verbose: bool = True,
    settle_s: float | None = None,
) -> dict[str, Any]:
    """Time every mode side by side and return the figures (see the module docstring).

    Args:
        modes: subset of ``ALL_MODES`` (default: all). Unavailable modes are reported as skipped.
        batch_size: images per training step and per inference batch.
        size: ``(H, W)`` of the images.
        repeats: timed rounds (default 7, or 2 with ``quick``), after ``warmup`` rounds (2, or 1).
        quick: few rounds and a small matmul, for smoke tests.
        precision, compile: what the ``auto`` mode may use (``auto`` = the toolkit's own choice).
        threads: torch and ONNX Runtime intra-op threads (default: torch's, the physical cores).
        model_options: ``build_model("lab", **model_options)``; default the lab's model.
        parts: which of ``train``, ``infer``, ``latency`` to time.
        latency_calls: single-image calls per round (default 5, or 2 with ``quick``).
        train_images, infer_images: run lengths the ``auto`` compile decision assumes.
        extra_subjects: more paths to time in the same rounds (``benchmarks/keras_vs_unetseg.py`` adds
            the Keras model this way).
        clock: ``wall`` or ``cpu`` (see ``CLOCKS``).
        measure_rss: also run ``train_peak_rss`` (a child process, after the timing) for ``peak_rss_mib``.
        settle_s: untimed pause before each subject's turn and before the matmul peaks, so that one
            subject's spinning thread pool does not slow the next (default ``SETTLE_S``, 0.02 with ``quick``).

    Returns a dict: ``train_images_per_s``, ``infer_images_per_s``, ``latency_ms`` of the ``auto`` mode;
    ``peak_rss_mib``: peak RSS of a fresh process training on the auto path (``train_peak_rss``);
    ``infer_int8_images_per_s`` / ``latency_int8_ms`` where int8 ran; ``modes`` (one dict of figures per
    mode, in img/s, ms, GFLOP/s, % of peak, MiB); ``peaks`` (matmul GFLOP/s);
    ``gflop_per_image``; ``auto``; ``settings``; ``environment``.
    """
    modes = list(modes or DEFAULT_MODES)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise UnetsegError(f"unknown benchmark mode(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
    parts_set = set(parts)
    if not parts_set <= {"train", "infer", "latency"}:
        raise UnetsegError(f"parts must be among train, infer, latency, got {sorted(parts_set)}")
    if batch_size < 1:
        raise UnetsegError(f"--batch-size {batch_size} must be at least 1")
    repeats = repeats or (2 if quick else 7)
    if repeats < 1:
        raise UnetsegError(f"--repeats {repeats} must be at least 1")
    warmup = 1 if quick else 2
    if clock not in CLOCKS:
        raise UnetsegError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    global _clock
    _clock = CLOCKS[clock]
    latency_calls = latency_calls or (2 if quick else 5)
    settle_s = (0.02 if quick else SETTLE_S) if settle_s is None else settle_s
    if settle_s < 0:
        raise UnetsegError(f"settle_s {settle_s} must not be negative")
    n_threads = set_threads(threads)
    dev = pick_device(device)
    # What unetseg's commands do on a CPU (see runtime.retain_freed_memory); UNETSEG_MALLOC=default turns
    # it off to measure plain PyTorch. It is process-wide, so every mode gets it alike.
    malloc_retained = retain_freed_memory() if dev.type == "cpu" else False
    denormals_flushed = flush_denormals() if dev.type == "cpu" else False
    opts = dict(model_options or {})
    model = build_model(opts.pop("arch", "lab"), **opts).eval()
    n_classes = int(model.config["n_classes"])
    size = (int(size[0]), int(size[1]))
    from .model import output_size

    output_size(model, *size)  # raises a UnetsegError naming valid sizes when this one is not
    log: Callable[..., None] = print if verbose else (lambda *a, **k: None)

    auto = auto_decisions(dev, precision, compile, train_images, infer_images)
    setup = _Setup(model, batch_size, size, dev, n_classes, seed)
    flops = count_flops(model, size)
    result: dict[str, Any] = {
        "gflop_per_image": {"forward": flops / 1e9, "train_step": 3 * flops / 1e9},
        "settings": {
            "batch_size": batch_size, "size": list(size), "repeats": repeats, "warmup": warmup,
            "latency_calls": latency_calls, "quick": quick, "modes": modes, "parts": sorted(parts_set),
            "clock": clock, "settle_s": settle_s, "malloc_retained": malloc_retained,
            "denormals_flushed": denormals_flushed,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "model": model.config,
        },
        "environment": {**describe(dev, auto["precision"]), "threads": n_threads},
        "auto": auto,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }

    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="unetseg-bench-") as tmp:
        for name in modes:
            t = time.perf_counter()
            try:
                if name.startswith("onnx"):
                    subj = _onnx_subject(name, setup, Path(tmp), parts_set, n_threads)
                elif name == "onednn_int8":
                    subj = _onednn_int8_subject(setup, parts_set)
                else:
                    subj = _torch_subject(name, setup, auto, parts_set)
            except (UnetsegError, ImportError, RuntimeError) as e:
                skipped[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"  {name}: skipped ({skipped[name]})")
                continue
            subj.info["setup_s"] = round(time.perf_counter() - t, 2)
            subjects.append(subj)
        subjects.extend(extra_subjects)
        n = 1024 if quick else 2048
        peaks = {"fp32": matmul_gflops(torch.float32, n, dev)}
        # An emulated bf16 matmul is no peak (0.2 GFLOP/s on an AVX2-only CPU, ~90 s per round at n=2048).
        if resolve_precision("auto", dev) == "bf16":  # bf16 is native on this device
            peaks["bf16"] = matmul_gflops(torch.bfloat16, n, dev)
        times: dict[str, dict[str, list[float]]] = {s.name: {"train": [], "infer": [], "latency": []} for s in subjects}
        rss: dict[str, dict[str, float]] = {}
        peak_times: dict[str, list[float]] = {k: [] for k in peaks}

        def one_round(record: bool) -> None:
            time.sleep(settle_s)
            for k, fn in peaks.items():
                sec = fn()
                if record:
                    peak_times[k].append(sec)
            for subj in list(subjects):
                time.sleep(settle_s)
                try:
                    if subj.train is not None:
                        before, _ = _rss_mib()
                        can_reset = _reset_peak_rss()
                        sec = subj.train()
                        _, hwm = _rss_mib()
                        if record:
                            times[subj.name]["train"].append(sec)
                            if can_reset and not subj.external and before is not None and hwm is not None:
                                r = rss.setdefault(subj.name, {"peak_rss_mib": 0.0, "step_rss_rise_mib": 0.0})
                                r["peak_rss_mib"] = max(r["peak_rss_mib"], hwm)
                                r["step_rss_rise_mib"] = max(r["step_rss_rise_mib"], hwm - before)
                    if subj.infer is not None:
                        sec = subj.infer()
                        if record:
                            times[subj.name]["infer"].append(sec)
                    if subj.latency is not None:
                        for _ in range(latency_calls):
                            sec = subj.latency()
                            if record:
                                times[subj.name]["latency"].append(sec)
                except Exception as e:  # noqa: BLE001 - one broken path must not lose the others' figures
                    skipped[subj.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log(f"  {subj.name}: failed ({skipped[subj.name]})")
                    if os.environ.get("UNETSEG_DEBUG"):
                        traceback.print_exc()
                    subjects.remove(subj)

        for w in range(warmup):
            t = time.perf_counter()
            one_round(record=False)
            log(f"warm-up round {w + 1}/{warmup}: {time.perf_counter() - t:.1f} s (includes compiling)")
        for r in range(repeats):
            t = time.perf_counter()
            one_round(record=True)
            log(f"round {r + 1}/{repeats}: {time.perf_counter() - t:.1f} s")

    # A peak is a best case: the fastest round, not the median (other modes' figures are medians).
    peak_gflops = {k: 2 * n**3 / min(v) / 1e9 for k, v in peak_times.items() if v}
    result["peaks"] = {f"matmul_{k}_gflops": round(v, 1) for k, v in peak_gflops.items()}
    result["peaks"]["matmul_n"] = n
    fwd, trn = flops / 1e9, 3 * flops / 1e9
    table: dict[str, dict[str, Any]] = {}
    for subj in subjects:
        if subj.name in skipped:
            continue
        t = times[subj.name]
        row: dict[str, Any] = {"description": subj.description, "precision": subj.precision}
        ref = peak_reference(subj.precision, "bf16" in peak_gflops)
        peak = peak_gflops.get(ref)
        for part, per_img in (("train", trn), ("infer", fwd)):
            sec = _median(t[part])
            if sec is None:
                continue
            ips = batch_size / sec
            row[f"{part}_images_per_s"] = round(ips, 2)
            row[f"{part}_gflops"] = round(ips * per_img, 1)
            if peak:
                row[f"{part}_pct_of_{ref}_peak"] = round(100 * ips * per_img / peak, 1)
        lat = _median(t["latency"])
        if lat is not None:
            row["latency_ms"] = round(1000 * lat, 2)
        row.update(rss.get(subj.name, {}))
        row.update(subj.info)
        row["samples"] = {k: len(v) for k, v in t.items() if v}
        table[subj.name] = row
    result["modes"] = table
    result["skipped"] = skipped
    base = table.get("fp32", {})
    for row in table.values():
        for part in ("train", "infer"):
            if base.get(f"{part}_images_per_s") and row.get(f"{part}_images_per_s"):
                row[f"{part}_x_fp32"] = round(row[f"{part}_images_per_s"] / base[f"{part}_images_per_s"], 2)
    a = table.get("auto", {})
    for key in ("train_images_per_s", "infer_images_per_s", "latency_ms"):
        if key in a:
            result[key] = a[key]
    # The int8 figures are those of the int8 model an export serves on this CPU (export.prefer_onednn_int8).
    from .export import prefer_onednn_int8

    int8_mode = "onednn_int8" if prefer_onednn_int8() and "onednn_int8" in table else "onnx_int8"
    q = table.get(int8_mode, {})
    if q:
        result["int8_mode"] = int8_mode
    if "infer_images_per_s" in q:
        result["infer_int8_images_per_s"] = q["infer_images_per_s"]
    if "latency_ms" in q:
        result["latency_int8_ms"] = q["latency_ms"]
    if measure_rss and "train" in parts_set and dev.type == "cpu":
        probe = train_peak_rss(dict(model.config), batch_size, size, precision, 2 if quick else 3, threads)
        result["train_memory"] = probe
        if "peak_rss_mib" in probe:
            result["peak_rss_mib"] = round(probe["peak_rss_mib"], 1)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


# ------------------------------------------------------------------------------------------------ output
def _fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_report(result: dict[str, Any]) -> str:
    """The result as a plain-text table (one row per mode) with the auto path's headline figures."""
    pk = result.get("peaks", {})
    s = result["settings"]
    lines = [
        f"batch {s['batch_size']}, {s['size'][0]}x{s['size'][1]}, "
        f"{result['gflop_per_image']['forward']:.2f} GFLOP/image forward, {s['repeats']} rounds after "
        f"{s['warmup']} warm-up; threads {result['environment']['threads']}; matmul peak fp32 "
        f"{_fmt(pk.get('matmul_fp32_gflops'), 0)} / bf16 {_fmt(pk.get('matmul_bf16_gflops'), 0)} GFLOP/s",
        f"clock {s.get('clock', 'wall')}; OMP_WAIT_POLICY {s.get('omp_wait_policy')}; "
        f"load average at start {result.get('load_average_start')}, "
        f"end {result.get('load_average_end')}",
        "",
        f"{'mode':<16}{'train img/s':>12}{'GFLOP/s':>9}{'%peak':>7}{'infer img/s':>13}{'GFLOP/s':>9}{'%peak':>7}"
        f"{'latency ms':>12}{'peak RSS MiB':>14}",
    ]
    for name, r in result["modes"].items():
        ref = peak_reference(r["precision"], "matmul_bf16_gflops" in pk)
        lines.append(
            f"{name:<16}{_fmt(r.get('train_images_per_s')):>12}{_fmt(r.get('train_gflops'), 0):>9}"
            f"{_fmt(r.get(f'train_pct_of_{ref}_peak'), 0):>7}{_fmt(r.get('infer_images_per_s')):>13}"
            f"{_fmt(r.get('infer_gflops'), 0):>9}{_fmt(r.get(f'infer_pct_of_{ref}_peak'), 0):>7}"
            f"{_fmt(r.get('latency_ms'), 2):>12}{_fmt(r.get('peak_rss_mib'), 0):>14}"
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"{name:<16}skipped: {why}")
    mem = result.get("train_memory")
    if mem:
        lines.append("")
        lines.append(
            f"training memory (auto path, fresh process, batch {s['batch_size']}): peak RSS "
            f"{_fmt(mem.get('peak_rss_mib'), 0)} MiB, {_fmt(mem.get('rss_before_training_mib'), 0)} MiB before the "
            f"first step" if "error" not in mem else f"training memory probe failed: {mem['error']}"
        )
    a = result["auto"]
    int8_ref = peak_reference("int8", "matmul_bf16_gflops" in pk)
    lines += [
        "",
        f"auto path: precision {a['precision']}, {a['memory_format']}, compile train {a['compile_train']} / "
        f"inference {a['compile_infer']} (for {a['assumed_train_images']} training / {a['assumed_infer_images']} "
        f"inference images)",
        f"%peak: of the matmul peak in the mode's precision (int8 against {int8_ref}).",
    ]
    if result.get("int8_mode"):
        lines.append(f"int8 figures (infer_int8_images_per_s, latency_int8_ms): {result['int8_mode']}, the int8 "
                     "model an export serves on this CPU")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``benchmark`` options (shared by ``unetseg benchmark`` and ``python -m unetseg.bench``)."""
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--quick", action="store_true", help="few repetitions and a small matmul (smoke test)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", nargs=2, type=int, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, help="timed rounds (default 7; 2 with --quick)")
    p.add_argument("--modes", help=f"comma-separated subset of: {','.join(ALL_MODES)}")
    p.add_argument("--parts", default="train,infer,latency", help="what to time: train,infer,latency")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="for the auto mode")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="for the auto mode")
    p.add_argument("--threads", type=int)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time, or process CPU time (with --threads 1: robust on a busy machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--filters", type=int, help="base filters (lab 32): a smaller model for smoke tests")
    p.add_argument("--depth", type=int, help="poolings (lab 4)")
    p.add_argument("--classes", type=int, help="output classes (lab 23)")


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed CLI arguments; print the table, write ``--json``."""
    model_options = {
        key: value
        for key, value in (
            ("base_filters", getattr(args, "filters", None)),
            ("depth", getattr(args, "depth", None)),
            ("n_classes", getattr(args, "classes", None)),
        )
        if value is not None
    }
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if getattr(args, "modes", None) else None
    parts = [p.strip() for p in getattr(args, "parts", "train,infer,latency").split(",") if p.strip()]
    result = run_benchmark(
        modes=modes,
        batch_size=args.batch_size,
        size=tuple(args.size),
        repeats=args.repeats,
        quick=args.quick,
        precision=args.precision,
        compile=getattr(args, "compile", "auto"),
        threads=args.threads,
        device=getattr(args, "device", "auto"),
        model_options=model_options,
        parts=parts,
        clock=getattr(args, "clock", "wall"),
    )
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unetseg.bench [options]``: the same as ``unetseg benchmark``."""
    p = argparse.ArgumentParser(prog="python -m unetseg.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main_from_args(args)
    except UnetsegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
