"""The main job in one call: train, evaluate on the held-out frames, write predictions.

Without ``data`` it generates driving scenes first, so it runs end to end on a fresh machine; point
``data`` at the lab's CARLA folder (``CameraRGB/`` + ``CameraMask/``) or any images/masks folder to use
real frames.

Example:
    >>> from unetseg.quickstart import quickstart
    >>> quickstart(out="runs/quickstart", epochs=3)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import resolve_config
from .evaluate import evaluate, format_report
from .predict import predict
from .train import train


def quickstart(
    data: str | Path | None = None, out: str | Path = "runs/quickstart", recipe: str = "default",
    epochs: int | None = None, synth_count: int = 200, show: int = 8, **settings: Any,
) -> dict[str, Any]:
    """Train ``recipe`` on ``data`` (or generated scenes), evaluate on its validation split, predict ``show`` frames.

    ``epochs=None`` keeps the recipe's epochs on real data and uses 10 on generated scenes (a few minutes).
    Further ``settings`` override the recipe (as ``unetseg train`` flags do). Returns the evaluation metrics.
    """
    out = Path(out)
    if epochs is None and data is None:
        epochs = 10
    cfg = resolve_config(recipe=recipe, overrides={
        **settings, "data": str(data) if data else None, "out": str(out), "epochs": epochs,
        "synth_count": synth_count,
    })
    summary = train(cfg)
    data_dir = Path(cfg.data) if cfg.data else out / "scenes"
    best = out / "best.pt"
    print(f"\n== evaluation of {best} ({summary['epochs']} epochs) on the held-out validation frames")
    metrics = evaluate(best, data_dir, out_dir=out / "evaluation", split="val")
    print(format_report(metrics))
    from .checkpoint import load_checkpoint
    from .data import find_pairs

    val = set(load_checkpoint(best)["val_names"])
    pairs, _ = find_pairs(data_dir)
    frames = [str(p.image) for p in pairs if p.name in val][:show]
    predict(best, frames, out / "predictions")
    print(f"\nrun files:    {out}/ (config.yaml, history.csv, curves.png, best.pt, last.pt)")
    print(f"evaluation:   {out}/evaluation/ (metrics.json, confusion.png)")
    print(f"predictions:  {out}/predictions/ (triplet/ shows input | true mask | predicted mask)")
    return metrics
