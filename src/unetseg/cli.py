"""The ``unetseg`` command: argument parsing only; every command calls one library function.

User mistakes (``UnetsegError``) print ``error: <message>`` and exit with status 2; ``--debug`` shows the
traceback. Examples::

    unetseg quickstart                               # train, evaluate, predict on generated scenes
    unetseg summary                                  # the lab model's Keras-style table
    unetseg summary --arch paper --input-size 572 572 1
    unetseg data synth --out scenes --count 200 --seed 0
    unetseg data check ../shared/data/carla
    unetseg train --data scenes --out runs/demo --epochs 5
    unetseg evaluate --checkpoint runs/demo/best.pt --data scenes --json
    unetseg predict --checkpoint runs/demo/best.pt scenes/CameraRGB --out preds
    unetseg export --checkpoint runs/demo/best.pt --out deploy --int8 --data scenes
    unetseg benchmark --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import UnetsegError

LAYOUTS = ("auto", "carla", "lyft", "generic")


def _cmd_summary(args: argparse.Namespace) -> int:
    from .model import build_model
    from .summary import model_summary

    arch = args.arch
    h, w, c = args.input_size or ((96, 128, 3) if arch == "lab" else (572, 572, 1))
    classes = args.classes or (23 if arch == "lab" else 2)
    options = {"in_channels": c, "n_classes": classes}
    if args.filters:
        options["base_filters"] = args.filters
    if args.depth:
        options["depth"] = args.depth
    import torch

    with torch.device("meta"):  # shapes and counts only: skip allocating and initialising the weights
        model = build_model(arch, **options)
    print(model_summary(model, (h, w, c)))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import check_folder

    # Default plots folder in the working directory, not beside DIR: datasets are often read-only.
    out = args.out if args.out is not None else f"{Path(args.dir).resolve().name or 'data'}_check"
    report = check_folder(
        args.dir, n_classes=args.classes, layout=args.layout, palette=args.palette,
        class_names=args.class_names, out_dir=out, samples=args.samples,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.text())
    return 0 if report.ok else 1


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synth import synth_dataset

    names = synth_dataset(args.out, count=args.count, seed=args.seed, size=tuple(args.size))
    print(f"wrote {len(names)} CARLA-layout frames to {args.out}/CameraRGB and {args.out}/CameraMask")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import config_from_args
    from .train import resume, train

    if args.resume:
        resume(args.resume, epochs=args.epochs)
        return 0
    if not args.out:
        raise UnetsegError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    train(config_from_args(args))
    return 0


TTA_HELP = "also predict the mirror image and average the logits (2x the time, slightly better masks)"
SCALES_HELP = ("predict each frame at these multiples of the training frame size and average the class "
               "probabilities (default: the checkpoint's; the default recipe's are 0.6 1.0; 1 = one pass)")
COMPILE_HELP = ("torch.compile the model (4-8 %% faster on a CPU after ~20 s of compiling); auto: only when "
                "there are enough images to pay that back (thousands of 240x320 frames)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_report

    result = evaluate(
        args.checkpoint, args.data, out_dir=args.out, batch_size=args.batch_size, precision=args.precision,
        layout=args.layout, threads=args.threads, split=args.split, palette=args.palette, tta=args.tta,
        compile=args.compile, scales=args.scales,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    written = predict(
        args.checkpoint, args.inputs, args.out, masks=args.masks, batch_size=args.batch_size,
        precision=args.precision, threads=args.threads, tta=args.tta, compile=args.compile, scales=args.scales,
    )
    print(f"wrote predictions for {len(written)} images to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint
    from .runtime import set_threads

    set_threads(args.threads)
    info = export_checkpoint(args.checkpoint, args.out, int8=args.int8, data=args.data,
                             calibration=args.calibration, method=args.calibration_method, layout=args.layout,
                             scales=args.scales)
    names = [*info["files"].values()] + [n for f in info["scale_files"].values() for k, n in f.items() if k != "size"]
    print(f"wrote {', '.join(f'{args.out}/{n}' for n in names)} and {args.out}/model.json")
    scales = " + ".join(f"{v:g}x" for v in info["predict_scales"])
    h, w = info["input"]["size"]
    print(f"predicts {h}x{w} frames at {scales}" + (", averaged (as the checkpoint does)"
                                                    if len(info["predict_scales"]) > 1 else ""))
    if "int8" in info:
        q = info["int8"]
        by_scale = q["agreement_with_fp32_by_scale"]
        shown = ", ".join(f"{a:.2%} at {k}x" for k, a in by_scale.items()) if len(by_scale) > 1 else \
            f"{q['agreement_with_fp32']:.2%}"
        print(f"int8: classes agree with fp32 on {shown} of the pixels of {q['agreement_frames']} {q['agreement_on']}")
    if "int8_onednn" in info:
        from .export import prefer_onednn_int8

        by_scale = info["int8_onednn"]["agreement_with_fp32_by_scale"]
        shown = ", ".join(f"{a:.2%} at {k}x" for k, a in by_scale.items())
        print(f"int8 through oneDNN ({info['files']['int8_onednn']}, all scales): classes agree with fp32 on {shown}; "
              + ("the folder runs it on this CPU (AMX)" if prefer_onednn_int8() else
                 "the folder runs the ONNX int8 model on this CPU (no AMX); pass the file to run it"))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(data=args.data, out=args.out, recipe=args.recipe, epochs=args.epochs)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import os

    from .cpuload import machine_is_busy

    # On a busy machine torch's spinning OpenMP threads starve the one doing the work (BENCHMARKS.md).
    # OpenMP reads OMP_WAIT_POLICY when torch loads, and `import unetseg` has loaded torch by now, so say it.
    if machine_is_busy() and "OMP_WAIT_POLICY" not in os.environ and (args.threads or os.cpu_count() or 1) > 1:
        print("note: this machine is busy; run as `OMP_WAIT_POLICY=PASSIVE unetseg benchmark ...` (or with "
              "--threads 1 --clock cpu) so torch's OpenMP threads are not measured fighting for cores",
              file=sys.stderr)
    from .bench import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unetseg", description="U-Net semantic segmentation: train, evaluate, predict.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="print a Keras-style layer table")
    s.add_argument("--arch", choices=("lab", "paper"), default="lab")
    s.add_argument("--input-size", nargs=3, type=int, metavar=("H", "W", "C"))
    s.add_argument("--classes", type=int)
    s.add_argument("--filters", type=int, help="base filters (lab 32, paper 64)")
    s.add_argument("--depth", type=int, help="number of poolings (4)")
    s.set_defaults(func=_cmd_summary)

    d = sub.add_parser("data", help="inspect or generate datasets").add_subparsers(dest="data_command", required=True)
    c = d.add_parser("check", help="counts, sizes, labels, class shares and sample pairs of a dataset folder")
    c.add_argument("dir")
    c.add_argument("--classes", type=int, help="number of classes (labels must be below it)")
    c.add_argument("--layout", choices=LAYOUTS, default="auto")
    c.add_argument("--palette", help="JSON/CSV name -> RGB for colour masks")
    c.add_argument("--class-names", help="file naming the classes, one per line or JSON")
    c.add_argument("--out", help="folder for class_shares.png and samples.png (default: ./NAME_check, NAME "
                   "being DIR's folder name)")
    c.add_argument("--samples", type=int, default=4)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_data_check)
    y = d.add_parser("synth", help="generate driving scenes in the CARLA layout")
    y.add_argument("--out", required=True)
    y.add_argument("--count", type=int, default=200)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--size", nargs=2, type=int, default=(240, 320), metavar=("H", "W"))
    y.set_defaults(func=_cmd_data_synth)

    t = sub.add_parser("train", help="train a U-Net; writes config, split, history, curves, checkpoints")
    t.add_argument("--data", help="dataset folder (CARLA or images/masks layout)")
    t.add_argument("--out", help="run directory")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed epoch")
    t.add_argument("--config", help="YAML file of settings; flags override it")
    t.add_argument("--recipe", choices=("lab", "default"))
    t.add_argument("--arch", choices=("lab", "paper"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--lr", type=float)
    t.add_argument("--size", nargs=2, type=int, metavar=("H", "W"))
    t.add_argument("--dropout", type=float)
    t.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="train with batch norm after each 3x3 conv; checkpoints serve the network without it "
                        "(each batch norm folded into its conv)")
    t.add_argument("--val-fraction", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--deterministic", action="store_true", default=None)
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    t.add_argument("--threads", type=int)
    t.add_argument("--device")
    t.add_argument("--classes", type=int, help="number of classes (default: from the dataset)")
    t.add_argument("--layout", choices=LAYOUTS)
    t.add_argument("--palette", help="JSON/CSV name -> RGB for colour masks")
    t.add_argument("--class-names", help="file naming the classes, one per line or JSON")
    t.add_argument("--cache-dir", help="keep decoded frames here so the next run decodes nothing")
    t.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="fit training into MINUTES: after epoch 1 the run plans the epochs that fit, its "
                   "learning-rate schedule fitted to them, and it stops after any epoch that passes the budget")
    t.add_argument("--no-progress", action="store_true", default=None)
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("quickstart", help="train, evaluate on held-out frames and write predictions, in one go")
    q.add_argument("--data", help="dataset folder (default: generate driving scenes)")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--recipe", choices=("lab", "default"), default="default")
    q.add_argument("--epochs", type=int, help="default: the recipe's, or 10 on generated scenes")
    q.set_defaults(func=_cmd_quickstart)

    e = sub.add_parser("evaluate", help="score a checkpoint on a labelled folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", help="folder for confusion.png and metrics.json")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    e.add_argument("--threads", type=int)
    e.add_argument("--layout", choices=LAYOUTS, default="auto")
    e.add_argument("--split", choices=("val", "train"),
                   help="score only the frames the run held out for validation (val), or only the others "
                        "(train: the run's training frames, to compare the fit with held-out frames)")
    e.add_argument("--palette", help="JSON/CSV name -> RGB for colour masks")
    e.add_argument("--tta", action="store_true", help=TTA_HELP)
    e.add_argument("--scales", type=float, nargs="+", metavar="S", help=SCALES_HELP)
    e.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help=COMPILE_HELP)
    e.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("predict", help="segment images: index PNG, colour mask, overlay (and triplet)")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("inputs", nargs="+", help="image files, folders or globs")
    r.add_argument("--out", required=True)
    r.add_argument("--masks", help="folder of true masks (same file names) for the lab's triplet figure")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    r.add_argument("--threads", type=int)
    r.add_argument("--tta", action="store_true", help=TTA_HELP)
    r.add_argument("--scales", type=float, nargs="+", metavar="S", help=SCALES_HELP)
    r.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help=COMPILE_HELP)
    r.set_defaults(func=_cmd_predict)

    x = sub.add_parser("export", help="write a checkpoint as ONNX models (fp32; int8 with --int8) to serve")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="folder for model.onnx, model.int8.onnx, model.int8.pt and model.json")
    x.add_argument("--int8", action="store_true", help="also write an int8 model (needs --data to calibrate on)")
    x.add_argument("--data", help="the training data folder: int8 ranges are calibrated on its frames that the "
                   "run did not validate on")
    x.add_argument("--calibration", type=int, default=64, metavar="N", help="frames to calibrate on (64)")
    x.add_argument("--calibration-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="how activation ranges are set (after equalization all three scored alike on CARLA; "
                   "minmax is the quickest)")
    x.add_argument("--scales", type=float, nargs="+", metavar="S",
                   help="prediction scales to write graphs for (default: the checkpoint's, 0.6 1.0 for the "
                        "default recipe; each scale but 1 adds model.xS.onnx; 1 = one graph, one pass)")
    x.add_argument("--layout", choices=LAYOUTS, default="auto")
    x.add_argument("--threads", type=int)
    x.set_defaults(func=_cmd_export)

    b = sub.add_parser("benchmark", help="training and inference speed of every execution path, side by side")
    # The same options as unetseg.bench.add_arguments, spelled out so `unetseg --help` needs no torch import.
    b.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    b.add_argument("--quick", action="store_true", help="few repetitions and a small matmul (smoke test)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--size", nargs=2, type=int, default=(96, 128), metavar=("H", "W"))
    b.add_argument("--repeats", type=int, help="timed rounds (default 7; 2 with --quick)")
    b.add_argument("--modes", help="comma-separated subset of: fp32,fp32_cl,bf16,fp32_compile,bf16_compile,"
                   "onnx_fp32,onnx_int8,onednn_int8,auto (default: all)")
    b.add_argument("--parts", default="train,infer,latency", help="what to time: train,infer,latency")
    b.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="for the auto mode")
    b.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="for the auto mode")
    b.add_argument("--threads", type=int)
    b.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (with --threads 1: robust on a busy machine)")
    b.add_argument("--device", default="auto")
    b.add_argument("--filters", type=int, help="base filters (lab 32): a smaller model for smoke tests")
    b.add_argument("--depth", type=int, help="poolings (lab 4)")
    b.add_argument("--classes", type=int, help="output classes (lab 23)")
    b.set_defaults(func=_cmd_benchmark)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UnetsegError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `unetseg ... | head` closed the pipe: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
