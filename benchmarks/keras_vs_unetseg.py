"""The lab's own Keras model against unetseg's execution paths, timed side by side in one run.

The Keras side is the DeepLearning.AI U-Net lab's code as the lab writes it (``conv_block``,
``upsampling_block``, ``unet_model``; ``model.compile(optimizer='adam',
loss=SparseCategoricalCrossentropy(from_logits=True), metrics=['accuracy'])``), run twice: as written
(fp32) and with Keras' ``mixed_bfloat16`` global policy set before the model is built. Each runs in its
own worker process (a Keras dtype policy is process-global, and TensorFlow and torch are kept out of
each other's process), started with a Python that has TensorFlow; the workers wait on a pipe while the
other subjects run, so exactly one thing runs at a time. All subjects — unetseg's modes, the two Keras
workers and the matmul peaks — are timed round-robin by ``unetseg.bench.run_benchmark``: one
repetition each per round, medians over rounds after warm-up, so load on a shared machine hits all
alike. The script then prints our ratios against each Keras figure.

With ``--check-weights`` it also copies the Keras fp32 model's weights into unetseg's ``unet_model`` and
reports the largest logit difference on the same input (TF's 'same' transposed-conv alignment is
reproduced, so it should be ~1e-5).

TensorFlow is an optional extra (``pip install unetseg[keras]``), never needed by the tests. Keep it in
its own virtual environment so it cannot change the torch install:

    python3 -m venv /work/kvenv && /work/kvenv/bin/pip install tensorflow-cpu

Example:
    python benchmarks/keras_vs_unetseg.py --keras-python /work/kvenv/bin/python --json keras.json
    python benchmarks/keras_vs_unetseg.py --keras-python /work/kvenv/bin/python --quick \\
        --modes fp32,auto --check-weights
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------------------
# Worker side: runs under a Python with TensorFlow; imports nothing from unetseg or torch.
# ------------------------------------------------------------------------------------------------------------


def _lab_keras_model(input_size: tuple[int, int, int], n_filters: int = 32, n_classes: int = 23) -> Any:
    """The lab's Exercise 1-3 code, unchanged apart from the imports."""
    import tensorflow as tf
    from tensorflow.keras.layers import Conv2D, Conv2DTranspose, Dropout, Input, MaxPooling2D, concatenate

    def conv_block(inputs=None, n_filters=32, dropout_prob=0, max_pooling=True):
        conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(inputs)
        conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(conv)
        if dropout_prob > 0:
            conv = Dropout(dropout_prob)(conv)
        if max_pooling:
            next_layer = MaxPooling2D(pool_size=(2, 2))(conv)
        else:
            next_layer = conv
        skip_connection = conv
        return next_layer, skip_connection

    def upsampling_block(expansive_input, contractive_input, n_filters=32):
        up = Conv2DTranspose(n_filters, 3, strides=(2, 2), padding="same")(expansive_input)
        merge = concatenate([up, contractive_input], axis=3)
        conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(merge)
        conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(conv)
        return conv

    def unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23):
        inputs = Input(input_size)
        cblock1 = conv_block(inputs, n_filters)
        cblock2 = conv_block(cblock1[0], n_filters * 2)
        cblock3 = conv_block(cblock2[0], n_filters * 4)
        cblock4 = conv_block(cblock3[0], n_filters * 8, dropout_prob=0.3)
        cblock5 = conv_block(cblock4[0], n_filters * 16, dropout_prob=0.3, max_pooling=False)
        ublock6 = upsampling_block(cblock5[1], cblock4[1], n_filters * 8)
        ublock7 = upsampling_block(ublock6, cblock3[1], n_filters * 4)
        ublock8 = upsampling_block(ublock7, cblock2[1], n_filters * 2)
        ublock9 = upsampling_block(ublock8, cblock1[1], n_filters)
        conv9 = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(ublock9)
        conv10 = Conv2D(n_classes, 1, padding="same")(conv9)
        model = tf.keras.Model(inputs=inputs, outputs=conv10)
        return model

    return unet_model(input_size, n_filters, n_classes)


def worker(
    policy: str, batch: int, height: int, width: int, n_filters: int, n_classes: int, seed: int,
    threads: int | None = None, clock: str = "wall",
) -> None:
    """Serve timing requests on stdin/stdout, one JSON object per line: ``{"cmd": ...}`` → ``{"s": seconds}``.

    Commands: ``train`` (one ``train_on_batch``), ``infer`` (logits for the batch), ``latency`` (one
    image), ``dump`` (weights and logits to an ``.npz``: ``{"cmd": "dump", "path": ...}``), ``quit``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    out = sys.stdout
    sys.stdout = sys.stderr  # Keras prints progress; keep the protocol channel clean
    if threads:
        # As --threads does for torch: that many threads for an op, and ops one at a time.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    now = time.process_time if clock == "cpu" else time.perf_counter
    if policy != "float32":
        tf.keras.mixed_precision.set_global_policy(policy)
    tf.keras.utils.set_random_seed(seed)
    model = _lab_keras_model((height, width, 3), n_filters, n_classes)
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(seed)
    # uint8 frames converted as the lab's tf.image.convert_image_dtype does; masks (N, H, W, 1) as the lab's
    x = tf.constant(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8).astype(np.float32) / 255)
    y = tf.constant(rng.integers(0, n_classes, (batch, height, width, 1), dtype=np.int64).astype(np.uint8))
    one = x[:1]
    forward = tf.function(lambda t: model(t, training=False), reduce_retracing=True)

    def timed(fn: Any) -> float:
        t = now()
        fn()
        return now() - t

    info = {"tensorflow": tf.__version__, "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else "",
            "policy": policy, "params": int(model.count_params()),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}
    out.write(json.dumps({"ready": True, "info": info}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        if cmd == "train":
            reply: dict[str, Any] = {"s": timed(lambda: model.train_on_batch(x, y))}
        elif cmd == "infer":
            reply = {"s": timed(lambda: forward(x))}
        elif cmd == "latency":
            reply = {"s": timed(lambda: forward(one))}
        elif cmd == "dump":
            layers = [lyr for lyr in model.layers if lyr.__class__.__name__ in ("Conv2D", "Conv2DTranspose")]
            arrays = {}
            for i, lyr in enumerate(layers):
                kernel, bias = lyr.get_weights()
                arrays[f"{i:02d}_{lyr.__class__.__name__}_kernel"] = kernel
                arrays[f"{i:02d}_{lyr.__class__.__name__}_bias"] = bias
            arrays["input"] = x.numpy()[:2]
            arrays["logits"] = np.asarray(model(x[:2], training=False), dtype=np.float32)
            np.savez(req["path"], **arrays)
            reply = {"s": 0.0}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------------------------------
# Orchestrator side: runs under unetseg's Python (torch).
# ------------------------------------------------------------------------------------------------------------


class KerasWorker:
    """A worker process for one Keras dtype policy, driven over a pipe."""

    def __init__(self, python: str, policy: str, batch: int, size: tuple[int, int], n_filters: int,
                 n_classes: int, seed: int = 0, threads: int | None = None, clock: str = "wall") -> None:
        cmd = [python, os.path.abspath(__file__), "--worker", policy, "--batch-size", str(batch),
               "--size", str(size[0]), str(size[1]), "--filters", str(n_filters), "--classes", str(n_classes),
               "--seed", str(seed), "--clock", clock]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"Keras worker failed to start: {hello}")
        self.info = hello["info"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"Keras worker exited (status {self.proc.poll()}); see its messages above")
        return json.loads(line)

    def call(self, cmd: str, **kw: Any) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return float(reply["s"])

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, AssertionError):
            self.proc.kill()


def check_weights(worker: KerasWorker, n_filters: int, n_classes: int, size: tuple[int, int]) -> dict[str, float]:
    """Copy the Keras model's weights into unetseg's ``unet_model`` and compare logits on the same input."""
    import tempfile

    import numpy as np
    import torch
    from torch import nn

    from unetseg.model import unet_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keras.npz"
        worker.call("dump", path=str(path))
        data = dict(np.load(path))
    net = unet_model((size[0], size[1], 3), n_filters, n_classes).eval()
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    kernels = sorted(k for k in data if k.endswith("_kernel"))
    if len(kernels) != len(convs):
        raise RuntimeError(f"{len(kernels)} Keras conv layers but {len(convs)} unetseg ones")
    with torch.no_grad():
        for key, conv in zip(kernels, convs, strict=True):
            kernel = torch.from_numpy(data[key])
            # Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw);
            # Conv2DTranspose kernel (kh, kw, out, in) -> ConvTranspose2d weight (in, out, kh, kw): same permute.
            w = kernel.permute(3, 2, 0, 1)
            if w.shape != conv.weight.shape:
                raise RuntimeError(f"{key}: shape {tuple(w.shape)} vs {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            conv.bias.copy_(torch.from_numpy(data[key.replace("_kernel", "_bias")]))
        x = torch.from_numpy(data["input"]).permute(0, 3, 1, 2).contiguous()
        ours = net(x).permute(0, 2, 3, 1).numpy()
    theirs = data["logits"]
    return {
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "max_abs_logit": float(np.abs(theirs).max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }


def _keras_subject(worker: KerasWorker, name: str, desc: str, precision: str, parts: set[str]) -> Any:
    from unetseg.bench import Subject

    return Subject(
        name, desc, precision,
        train=(lambda: worker.call("train")) if "train" in parts else None,
        infer=(lambda: worker.call("infer")) if "infer" in parts else None,
        latency=(lambda: worker.call("latency")) if "latency" in parts else None,
        info=dict(worker.info),
        external=True,
    )


def _ratios(result: dict[str, Any]) -> list[tuple[str, str, str, float | None, float | None, float | None]]:
    """``(ours, keras, figure, our value, keras value, ratio)``; for latency the ratio is keras/ours (>1 = faster)."""
    modes = result["modes"]
    rows = []
    ours_names = [n for n in modes if not n.startswith("keras")]
    for ours in ours_names:
        for k in ("keras_fp32", "keras_mixed_bf16"):
            if k not in modes:
                continue
            for fig in ("train_images_per_s", "infer_images_per_s", "latency_ms"):
                a, b = modes[ours].get(fig), modes[k].get(fig)
                ratio = None
                if a and b:
                    ratio = b / a if fig == "latency_ms" else a / b
                rows.append((ours, k, fig, a, b, ratio))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--keras-python", default=os.environ.get("UNETSEG_KERAS_PYTHON", sys.executable),
                   help="a Python with TensorFlow (default $UNETSEG_KERAS_PYTHON or this one)")
    p.add_argument("--modes", default="fp32,bf16,bf16_compile,onnx_fp32,onnx_int8,onednn_int8,auto",
                   help="unetseg modes to time beside Keras (see unetseg benchmark --help)")
    p.add_argument("--keras", default="fp32,mixed_bfloat16", help="Keras policies: fp32, mixed_bfloat16")
    p.add_argument("--parts", default="train,infer,latency")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", nargs=2, type=int, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--classes", type=int, default=23)
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, help="threads for torch, ONNX Runtime and TensorFlow (intra-op)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see unetseg benchmark --help")
    p.add_argument("--check-weights", action="store_true", help="copy Keras weights into unetseg and compare")
    p.add_argument("--json", help="write all figures as JSON")
    args = p.parse_args(argv)

    if args.worker:
        worker(args.worker, args.batch_size, args.size[0], args.size[1], args.filters, args.classes, args.seed,
               args.threads, args.clock)
        return 0

    # As `unetseg benchmark` does (see its _cmd_benchmark): OpenMP reads this once, when torch loads it.
    # unetseg.cpuload is torch-free, but importing it through the package would load torch: load the file.
    spec = importlib.util.find_spec("unetseg")
    cpuload_spec = importlib.util.spec_from_file_location("_cpuload", Path(spec.origin).with_name("cpuload.py"))
    cpuload = importlib.util.module_from_spec(cpuload_spec)
    cpuload_spec.loader.exec_module(cpuload)
    if "torch" not in sys.modules and cpuload.machine_is_busy():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from unetseg.bench import format_report, run_benchmark

    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    size = (args.size[0], args.size[1])
    policies = {"fp32": ("float32", "keras_fp32"), "mixed_bfloat16": ("mixed_bfloat16", "keras_mixed_bf16")}
    workers: list[tuple[str, KerasWorker]] = []
    subjects = []
    extra: dict[str, Any] = {}
    try:
        for key in [s.strip() for s in args.keras.split(",") if s.strip()]:
            policy, name = policies[key]
            t = time.perf_counter()
            w = KerasWorker(args.keras_python, policy, args.batch_size, size, args.filters, args.classes,
                            threads=args.threads, clock=args.clock)
            print(f"started Keras worker {name} ({policy}) in {time.perf_counter() - t:.1f} s: {w.info}")
            workers.append((name, w))
            desc = f"the lab's Keras code, TF {w.info['tensorflow']}, policy {policy}"
            subjects.append(_keras_subject(w, name, desc, "fp32" if policy == "float32" else "bf16", parts))
        if args.check_weights and workers:
            fp32 = dict(workers).get("keras_fp32", workers[0][1])
            extra["weight_check"] = check_weights(fp32, args.filters, args.classes, size)
            print(f"Keras weights in unetseg's unet_model: {extra['weight_check']}")
        result = run_benchmark(
            modes=[m.strip() for m in args.modes.split(",") if m.strip()],
            batch_size=args.batch_size, size=size, repeats=args.repeats, quick=args.quick,
            threads=args.threads, model_options=dict(base_filters=args.filters, n_classes=args.classes),
            parts=sorted(parts), extra_subjects=subjects, clock=args.clock,
        )
    finally:
        for _, w in workers:
            w.close()
    result.update(extra)
    result["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print()
    print(format_report(result))
    print()
    print(f"{'ours':<16}{'vs':<18}{'figure':<20}{'ours':>10}{'keras':>10}{'ratio':>8}")
    rows = _ratios(result)
    for ours, k, fig, a, b, r in rows:
        print(f"{ours:<16}{k:<18}{fig:<20}{_f(a):>10}{_f(b):>10}{_f(r, 2):>8}")
    print("ratio > 1: ours is faster (for latency: keras ms / our ms)")
    result["ratios"] = [dict(ours=o, keras=k, figure=f, ours_value=a, keras_value=b, ratio=r)
                        for o, k, f, a, b, r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


if __name__ == "__main__":
    sys.exit(main())
