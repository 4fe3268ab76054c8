"""An epoch's wall time against its pure step time, for the lab and default recipes (issue 5, item 5).

For each recipe the script runs the real trainer (``unetseg.train.train``) for a few epochs on the real
frames (or on generated scenes with ``--data ''``) and times, inside the loop, what each epoch spends:
the training steps (``train_step``), the wait for the next batch (frames are cached as tensors at load,
so a batch is only indexed, cropped and augmented), the rest of the loop (scheduler, weight average,
bookkeeping), the checkpoint writes and ``history.csv`` + ``curves.png`` (drawn when due: at most every
``train.CURVES_EVERY_S``, and on the first and last epoch). Between epochs it times the
same step alone on a batch of each shape the epoch used (plus the weight average where the recipe keeps
one), with no data thread running: an epoch's *pure step time* is its steps at those lone times, and
the ratio of the epoch's wall time to it is the figure the issue bounds (≤ 1.05).

``--data-thread both`` trains each recipe twice: batches made between the steps in the training thread,
then in a background thread a batch ahead (what ``train`` picks by itself: ``train.data_thread_pays``).

Epoch 1 (oneDNN creates its primitives) and the last epoch (the only one that validates here) are left
out of the medians; validation is reported on its own, per validation, because how often a recipe
validates is a setting (``val_every``: 1 for the lab recipe, 4 for the default).

Example:
    python benchmarks/epoch_overhead.py --data ../shared/data/carla --epochs 5 --data-thread both \
        --json benchmarks/results/epoch_overhead.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from unetseg.runtime import set_threads

trainer = importlib.import_module("unetseg.train")  # the module: the package's ``unetseg.train`` is the function


class _Clock:
    """Wraps the trainer's module-level functions to time them in place during one ``train()`` call.

    Between epochs (after ``history.csv`` is written) it also times ``repeats`` lone steps on the first
    batch of each shape it has seen, so that the pure step times interleave with the epochs they are
    compared with (machine noise hits both alike); that time is outside every epoch's wall time.
    """

    def __init__(self, repeats: int, data_thread: bool | None) -> None:
        self.repeats, self.data_thread = repeats, data_thread
        self.starts: list[float] = []  # per epoch: loop start
        self.ends: list[float] = []  # per epoch: after history.csv (and curves.png when due)
        self.steps: list[list[float]] = []  # per epoch: the duration of each train_step
        self.save: list[list[float]] = []
        self.write: list[float] = []  # history.csv (+ curves.png when due), per epoch
        self.validate: list[float] = []
        self.shapes: dict[tuple, tuple] = {}  # batch shape -> the arguments of the first step of that shape
        self.pure: dict[tuple, list[float]] = {}  # batch shape -> lone step times
        self.run: Any = None  # the trainer's run (model, optimizer, weight average), caught at _fit
        self._write_started = 0.0
        self._orig: dict[str, Any] = {}

    def _epoch_starts(self) -> None:
        self.starts.append(time.perf_counter())
        self.steps.append([])
        self.save.append([])

    def _time_lone_steps(self) -> None:
        step, ema = self._orig["train_step"], self.run.ema
        for shape, (args, kwargs) in self.shapes.items():
            times = self.pure.setdefault(shape, [])
            for _ in range(self.repeats):
                t = time.perf_counter()
                step(*args, **kwargs)
                if ema is not None:  # the recipe's weight average is part of its step
                    ema.update_parameters(args[0])
                times.append(time.perf_counter() - t)

    def install(self) -> None:
        for name in ("train_step", "validate", "save_checkpoint", "_write_history", "_tensorboard", "_fit",
                     "data_thread_pays"):
            self._orig[name] = getattr(trainer, name)
        o = self._orig

        def fit(run, *args, **kwargs):
            self.run = run
            return o["_fit"](run, *args, **kwargs)

        def data_thread_pays(device):
            return o["data_thread_pays"](device) if self.data_thread is None else self.data_thread

        def tensorboard(run_dir):
            out = o["_tensorboard"](run_dir)
            self._epoch_starts()
            return out

        def train_step(*args, **kwargs):
            t = time.perf_counter()
            out = o["train_step"](*args, **kwargs)
            self.steps[-1].append(time.perf_counter() - t)
            self.shapes.setdefault(tuple(args[2].shape), (args, kwargs))
            return out

        def validate(*args, **kwargs):
            t = time.perf_counter()
            out = o["validate"](*args, **kwargs)
            self.validate.append(time.perf_counter() - t)
            return out

        def save_checkpoint(*args, **kwargs):
            t = time.perf_counter()
            out = o["save_checkpoint"](*args, **kwargs)
            self.save[-1].append(time.perf_counter() - t)
            return out

        def write_history(*args, **kwargs):  # history.csv and, when due, curves.png: each epoch's last work
            started = time.perf_counter()
            out = o["_write_history"](*args, **kwargs)
            now = time.perf_counter()
            self.write.append(now - started)
            self.ends.append(now)
            self._time_lone_steps()
            self._epoch_starts()
            return out

        trainer.train_step, trainer.validate, trainer.save_checkpoint = train_step, validate, save_checkpoint
        trainer._fit, trainer.data_thread_pays = fit, data_thread_pays
        trainer._write_history, trainer._tensorboard = write_history, tensorboard

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            setattr(trainer, name, fn)


def measure(recipe: str, data: str | None, epochs: int, threads: int, repeats: int,
            data_thread: bool | None = None) -> dict[str, Any]:
    """One ``train()`` of ``recipe`` for ``epochs``; ``data_thread`` forces how batches are made (None: as
    ``train`` decides, ``train.data_thread_pays``)."""
    clock = _Clock(repeats, data_thread)
    clock.install()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = trainer.train(recipe=recipe, data=data, out=str(Path(tmp) / "run"), epochs=epochs,
                                    val_every=epochs, threads=threads, no_progress=True)
    finally:
        clock.uninstall()
    n = len(clock.ends)
    epoch_walls = [clock.ends[i] - clock.starts[i] for i in range(n)]
    # An epoch's pure step time: each of its steps at the median lone time of its batch shape (the lone
    # times after epoch 1 only: the first ones still create oneDNN primitives for the new shapes).
    lone = {shape: statistics.median(times[repeats:] or times) for shape, times in clock.pure.items()}
    shapes_per_epoch = list(clock.shapes)  # the full batch first, then a smaller last one, if any
    steps_per_epoch = len(clock.steps[0])
    counts = {shapes_per_epoch[0]: steps_per_epoch - (len(shapes_per_epoch) - 1)}
    counts.update({shape: 1 for shape in shapes_per_epoch[1:]})
    pure = sum(count * lone[shape] for shape, count in counts.items())
    # Epochs 2 .. E-1: warmed up, and without the validation the last epoch does.
    middle = range(1, n - 1)
    wall = statistics.median(epoch_walls[i] for i in middle)
    in_loop_steps = statistics.median(sum(clock.steps[i]) for i in middle)
    saves = statistics.median(sum(clock.save[i]) for i in middle)
    writes = statistics.median(clock.write[i] for i in middle)
    data_wait = statistics.median(summary["history"][i]["data_wait_seconds"] for i in middle)
    return {
        "recipe": recipe, "data_thread": clock.run.data_thread, "epochs": epochs, "threads": threads,
        "steps_per_epoch": steps_per_epoch,
        "epoch_wall_s": epoch_walls, "median_epoch_wall_s": wall,
        "pure_step_s": pure, "lone_step_s_by_batch_shape": {str(list(k)): v for k, v in lone.items()},
        "in_loop_train_step_s": in_loop_steps, "data_wait_s": data_wait,
        "checkpoint_writes_s": saves, "history_and_curves_s": writes,
        "rest_of_loop_s": wall - in_loop_steps - data_wait - saves - writes,
        "validation_s": clock.validate[-1] if clock.validate else None,
        "wall_over_pure_step": wall / pure,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "carla"
    ap.add_argument("--data", default=str(default_data) if default_data.is_dir() else None,
                    help="dataset folder (default: ../shared/data/carla when present; '' for generated scenes)")
    ap.add_argument("--recipes", nargs="+", default=["lab", "default"])
    ap.add_argument("--epochs", type=int, default=5, help="per recipe; at least 3 (first and last are left out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="lone steps per batch shape after each epoch")
    ap.add_argument("--data-thread", choices=["auto", "on", "off", "both"], default="auto",
                    help="make batches in a background thread (on), between the steps (off), as train() "
                         "decides (auto), or each recipe once each way (both: off, then on)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.epochs < 3:
        ap.error("--epochs must be at least 3: the first and the last epoch are not counted")
    set_threads(args.threads)
    args.data = args.data or None
    modes = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.data_thread]
    results = [measure(r, args.data, args.epochs, args.threads, args.repeats, m) for r in args.recipes for m in modes]
    print(f"\ndata: {args.data or 'generated scenes'}; {args.threads} threads; medians over epochs 2-{args.epochs - 1}")
    print("| recipe | data thread | steps/epoch | epoch wall (s) | pure step time (s) | **wall / pure** "
          "| steps in the loop (s) | data wait (s) | checkpoints (s) | history + curves (s) | rest of the loop (s) "
          "| one validation (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['recipe']} | {'yes' if r['data_thread'] else 'no'} | {r['steps_per_epoch']} | "
              f"{r['median_epoch_wall_s']:.2f} | {r['pure_step_s']:.2f} | "
              f"**{r['wall_over_pure_step']:.3f}** | {r['in_loop_train_step_s']:.2f} | {r['data_wait_s']:.2f} | "
              f"{r['checkpoint_writes_s']:.2f} | "
              f"{r['history_and_curves_s']:.2f} | {r['rest_of_loop_s']:.2f} | {r['validation_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
