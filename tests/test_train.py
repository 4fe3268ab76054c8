"""Training: config resolution, run files, learning, NaN stop, atomic writes, kill-and-resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TRAIN

from unetseg import runtime
from unetseg.checkpoint import load_checkpoint, save_checkpoint
from unetseg.config import load_run_config, resolve_config
from unetseg.data import load_dataset
from unetseg.errors import UnetsegError
from unetseg.losses import cross_entropy
from unetseg.model import build_model, forward_full
from unetseg.train import (
    crop_for_epoch,
    epoch_order,
    plan_epochs,
    projected_seconds,
    resume,
    run_balanced_weights,
    train,
    train_step,
)


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ config (fast)


def test_lab_recipe_is_the_lab() -> None:
    cfg = resolve_config(recipe="lab")
    assert (cfg.size, cfg.resize_mode, cfg.optimizer, cfg.lr, cfg.loss, cfg.batch_size, cfg.epochs) == (
        [96, 128], "lab", "adam", 1e-3, "ce", 32, 40
    )
    assert not cfg.augment and cfg.crop is None and cfg.schedule == "constant" and cfg.class_weighting == "none"
    assert cfg.deep_supervision == 0 and not cfg.batch_norm and cfg.ema == 0  # nothing the lab does not train


def test_a_run_saved_before_a_recipe_setting_resumes_without_it(tmp_path: Path) -> None:
    # deep_supervision joined the default recipe in session 30: a run whose config.yaml predates the key
    # trained without heads, and its last.pt has none, so resume must not take the recipe's value.
    assert resolve_config(recipe="default").deep_supervision > 0
    settings = {k: v for k, v in dataclasses.asdict(resolve_config(recipe="default")).items()
                if k != "deep_supervision"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"settings": settings}), encoding="utf-8")
    cfg = load_run_config(tmp_path)
    assert cfg.deep_supervision == 0 and cfg.recipe == "default" and cfg.batch_norm


def test_default_recipe_predicts_at_two_scales() -> None:
    assert resolve_config(recipe="default").predict_scales == [0.6, 1.0]
    assert resolve_config(recipe="lab").predict_scales == [1.0]  # the lab predicts once, at 96x128


def test_batch_norm_flag_overrides_the_recipe() -> None:
    from unetseg.cli import build_parser
    from unetseg.config import config_from_args

    assert resolve_config(recipe="default").batch_norm and not resolve_config(recipe="lab").batch_norm
    parse = build_parser().parse_args
    assert not config_from_args(parse(["train", "--recipe", "default", "--no-batch-norm"])).batch_norm
    assert config_from_args(parse(["train", "--recipe", "lab", "--batch-norm"])).batch_norm
    assert config_from_args(parse(["train", "--recipe", "default"])).batch_norm  # no flag: the recipe's


def test_flags_override_yaml_override_recipe(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recipe: lab\nepochs: 7\nlr: 0.01\n")
    cfg = resolve_config(config_file=f, overrides={"lr": 0.5, "epochs": None})
    assert (cfg.recipe, cfg.epochs, cfg.lr, cfg.batch_size) == ("lab", 7, 0.5, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [({"epochs": 0}, "--epochs 0"), ({"lr": -1.0}, "--lr"), ({"wings": 3}, "unknown setting"),
     ({"recipe": "fast"}, "unknown recipe"), ({"val_fraction": 1.0}, "--val-fraction"),
     ({"prior_correction": 1.5}, "prior_correction"), ({"class_weight_clip": 0.5}, "class_weight_clip"),
     ({"loss": "focal"}, "ce, ce\\+dice, ce\\+lovasz"), ({"lovasz_from": 1.0}, "lovasz_from 1.0"),
     ({"predict_scales": []}, "predict_scales"), ({"predict_scales": [0.6, 0]}, "predict_scales"),
     ({"predict_scales": 0.6}, "predict_scales \\S+ must be a list"), ({"class_mix": 1.5}, "class_mix 1.5"),
     ({"rare_paste": 1.5}, "rare_paste 1.5"), ({"rare_paste_below": 0}, "rare_paste_below 0 must be in \\(0, 1\\)"),
     ({"run_balance": -0.5}, "run_balance -0.5 must be in \\[0, 1\\]"),
     ({"optimizer": "lamb"}, "optimizer 'lamb' must be adam, adamw or sgd"), ({"momentum": 1.0}, "momentum 1.0"),
     ({"hard_pixels": 0}, "hard_pixels 0 must be in \\(0, 1\\]"),
     ({"label_smoothing": 1.0}, "label_smoothing 1.0 must be in \\[0, 1\\)"),
     ({"deep_supervision": -0.1}, "deep_supervision -0.1 must be >= 0"),
     ({"deep_supervision": 0.4, "depth": 1}, "deep_supervision needs depth >= 2"),
     ({"recipe": "lab", "early_crop": [64, 96]}, "early_crop needs crop"),
     ({"early_crop_fraction": 1.0}, "early_crop_fraction 1.0 must be in \\[0, 1\\)"),
     ({"early_crop": [96]}, "early_crop \\[96\\] must be two positive integers")],
)
def test_bad_settings_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(UnetsegError, match=message):
        resolve_config(overrides=overrides)


def test_run_balance_gives_each_sequence_its_share() -> None:
    # one run of 1 frame, one of 3, one of 12 (frame numbers more than max_gap apart)
    names = ["000001"] + [f"{n:06d}" for n in range(100, 103)] + [f"{n:06d}" for n in range(500, 512)]
    run = torch.tensor([0] + [1] * 3 + [2] * 12)
    shares = {}
    for power in (0.0, 0.5, 1.0):
        w = run_balanced_weights(names, power, max_gap=20)
        order = torch.cat([epoch_order(len(names), w, torch.Generator().manual_seed(e)) for e in range(2000)])
        shares[power] = torch.bincount(run[order], minlength=3).double() / len(order)
    expected = {0.0: [1 / 16, 3 / 16, 12 / 16], 1.0: [1 / 3] * 3,
                0.5: [v / (1 + 3**0.5 + 12**0.5) for v in (1, 3**0.5, 12**0.5)]}
    for power, share in shares.items():
        assert torch.allclose(share, torch.tensor(expected[power], dtype=torch.double), atol=0.01), (power, share)
    # off: every frame exactly once per epoch, as before
    assert sorted(epoch_order(16, None, torch.Generator().manual_seed(0)).tolist()) == list(range(16))


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("epochs: [1,\n")
    with pytest.raises(UnetsegError, match="bad.yaml: not valid YAML"):
        resolve_config(config_file=f)


def test_forward_full_handles_any_size() -> None:
    torch.manual_seed(0)
    lab = build_model("lab", base_filters=4, depth=2, n_classes=3).eval()
    assert forward_full(lab, torch.rand(1, 3, 30, 45)).shape == (1, 3, 30, 45)
    x = torch.rand(1, 3, 32, 48)
    assert torch.allclose(forward_full(lab, x), lab(x))  # valid sizes are untouched
    paper = build_model("paper", base_filters=4, depth=2, n_classes=3, in_channels=3).eval()
    assert forward_full(paper, torch.rand(1, 3, 30, 45)).shape == (1, 3, 30, 45)


# ----------------------------------------------------------------------------------------- training (slow)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lab", "paper"])
def test_short_training_learns_and_writes_run_files(scenes: Path, tmp_path: Path, arch: str) -> None:
    size = [32, 48] if arch == "lab" else [60, 92]  # paper: outputs 20x52 after its unpadded convs
    out = tmp_path / "run"
    epochs = 6 if arch == "lab" else 20  # the unpadded net (no batch norm) starts slower
    summary = train(
        **{**TINY_TRAIN, "data": str(scenes), "out": str(out), "arch": arch, "size": size, "epochs": epochs,
           "lr": 3e-3, "dropout": 0.0}
    )
    for name in ("config.yaml", "split.json", "history.csv", "curves.png", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert list(rows[0])[:7] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_miou",
                                 "seconds"]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    # Beat chance: the best constant guess (every pixel the majority class) scores that class's share
    # divided by the number of classes present in the validation masks.
    split = json.loads((out / "split.json").read_text())
    data = load_dataset(scenes, size=tuple(size), resize_mode="lab", progress=False)
    val_masks = data.subset(split["val_idx"]).masks
    counts = torch.bincount(val_masks.reshape(-1).long(), minlength=23)
    chance = (counts.max() / counts.sum()).item() / int((counts > 0).sum())
    assert summary["best_miou"] > 1.5 * chance
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["settings"]["arch"] == arch and cfg["environment"]["threads"] == 1
    # Trained on the fused conv + ReLU path wherever this CPU's oneDNN has it (runtime.fuse_conv_relu).
    env = cfg["environment"]
    fusable = runtime._fused_conv_runs(torch.float32) and (
        env["precision"] != "bf16" or runtime._fused_conv_runs(torch.bfloat16))
    convs = sum(type(m) is torch.nn.Conv2d for m in build_model(arch, depth=2).modules())
    assert env["fused_conv_relu"] == (convs - 1) * fusable  # all but the 1x1 logits conv
    assert "torch" in cfg["environment"] and cfg["data"]["val_frames"] > 0
    state = torch.load(out / "best.pt", weights_only=True)
    assert state["model_config"]["arch"] == arch and len(state["classes"]["names"]) == 23
    assert state["preprocess"]["size"] == size and state["preprocess"]["predict_scales"] == [1.0]


@pytest.mark.slow
def test_sgd_with_one_cycle_and_batch_norm_learns(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 4, "optimizer": "sgd", "lr": 0.05,
             "schedule": "onecycle", "batch_norm": True, "dropout": 0.0})
    group = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"][0]
    assert group["nesterov"] and 0.94 < group["momentum"] <= 0.95  # cycled back up by the schedule, not 0.9
    losses = [float(r["train_loss"]) for r in _history(out)]
    assert losses[-1] < 0.8 * losses[0]


def test_plan_epochs_fits_the_budget_with_its_validations() -> None:
    # 1 epoch done in 120 s; 100 s per epoch, 25 s per validation (every 4th and the last), 56 min:
    # 31 epochs take 120 + 30 * 100 + 8 * 25 = 3320 s, 32 would take 3420 s.
    assert plan_epochs(40, 4, done=1, elapsed_s=120, epoch_s=100, val_s=25, budget_s=56 * 60) == 31
    assert plan_epochs(40, 1, done=1, elapsed_s=120, epoch_s=100, val_s=25, budget_s=56 * 60) == 26
    assert plan_epochs(40, 4, done=1, elapsed_s=120, epoch_s=100, val_s=25, budget_s=10_000) == 40  # all fit
    assert plan_epochs(40, 4, done=1, elapsed_s=120, epoch_s=100, val_s=25, budget_s=200) == 1  # none more


def test_plan_epochs_prices_the_full_crop_epochs_after_the_early_ones() -> None:
    # Epoch 1 on early crops took 60 s, 86 s with its validation; full-crop epochs cost 100 s, later
    # validations 25 s; the first 60 % of a run's epochs are early. 40 epochs: 86 + 23 * 60 + 16 * 100 +
    # 10 * 25 = 3316 s; priced all at 60 s they would seem to take 2676 s, all at 100 s 4236 s.
    kw = dict(done=1, elapsed_s=86, epoch_s=60, val_s=25)
    assert projected_seconds(40, 4, **kw, early_fraction=0.6, late_epoch_s=100) == 3316
    assert projected_seconds(40, 4, **kw) == 86 + 39 * 60 + 10 * 25
    assert plan_epochs(40, 4, **kw, budget_s=3316, early_fraction=0.6, late_epoch_s=100) == 40
    assert plan_epochs(40, 4, **kw, budget_s=3315, early_fraction=0.6, late_epoch_s=100) == 39
    # 30 epochs: 18 early (2-18: 17 x 60), 12 full, 8 validations: 86 + 1020 + 1200 + 200 = 2506 s
    assert plan_epochs(40, 4, **kw, budget_s=2506, early_fraction=0.6, late_epoch_s=100) == 30


def test_early_crop_gives_way_to_the_crop_after_its_share_of_the_epochs() -> None:
    cfg = resolve_config(recipe="default", overrides={"early_crop": [96, 128], "early_crop_fraction": 0.6})
    crops = [crop_for_epoch(cfg, e) for e in range(1, cfg.epochs + 1)]
    assert crops == [(96, 128)] * 24 + [(128, 160)] * 16
    assert {crop_for_epoch(resolve_config(recipe="default"), e) for e in (1, 40)} == {(128, 160)}  # off by default
    assert crop_for_epoch(resolve_config(recipe="lab"), 1) is None  # whole frames


def _one_cycle_lrs(max_lr: float, total_steps: int, pct_start: float) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)
    lrs = []
    for _ in range(total_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
def test_time_budget_replans_the_epochs_and_their_schedule(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    train_module = sys.modules["unetseg.train"]  # `unetseg.train` the attribute is the function
    seen: dict = {}

    def plan(epochs, val_every, done, elapsed_s, epoch_s, val_s, budget_s, early_fraction, late_epoch_s):
        seen.update(epochs=epochs, done=done, epoch_s=epoch_s, val_s=val_s, budget_s=budget_s,
                    late_epoch_s=late_epoch_s)
        return 2  # as if 2 of the 4 epochs fitted

    monkeypatch.setattr(train_module, "plan_epochs", plan)
    out = tmp_path / "run"
    settings = {**TINY_TRAIN, "epochs": 4, "optimizer": "sgd", "lr": 0.05, "schedule": "onecycle",
                "warmup_fraction": 0.3, "val_every": 4, "time_budget": 600}
    summary = train(**settings, data=str(scenes), out=str(out))
    assert seen["epochs"] == 4 and seen["done"] == 1 and seen["budget_s"] == 36_000
    assert seen["epoch_s"] > 0 and seen["val_s"] > 0  # epoch 1 validated to time a validation
    assert seen["late_epoch_s"] is None  # no early crops: every epoch costs what epoch 1 did
    assert summary["epochs"] == 2 and not summary["stopped_early"]
    history = _history(out)
    assert len(history) == 2 and all(r["val_miou"] != "nan" for r in history)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["settings"]["epochs"] == 2
    assert saved["time_budget_plan"]["planned_epochs"] == 4 and saved["time_budget_plan"]["epochs"] == 2
    # From epoch 2 on the run follows the one-cycle schedule of a 2-epoch plan, and ends it annealed.
    steps = -(-len(json.loads((out / "split.json").read_text())["train_idx"]) // TINY_TRAIN["batch_size"])
    planned_for_two = _one_cycle_lrs(0.05, 2 * steps, 0.3)
    assert float(history[0]["lr"]) == pytest.approx(planned_for_two[steps - 1], rel=1e-5)
    assert float(history[1]["lr"]) == pytest.approx(planned_for_two[-1], rel=1e-5)
    floor = 0.05 / 25 / 1e4  # OneCycleLR's default div_factor and final_div_factor
    assert planned_for_two[-2] == pytest.approx(floor)  # what the last step trained at
    assert _one_cycle_lrs(0.05, 4 * steps, 0.3)[2 * steps - 2] > 100 * floor  # the 4-epoch plan, mid-way
    assert load_checkpoint(out / "last.pt")["scheduler"]["total_steps"] == 2 * steps
    assert resume(out)["epochs"] == 2  # the plan is what --resume continues: nothing left to train


@pytest.mark.slow
def test_time_budget_spent_by_epoch_one_ends_the_run_annealed(scenes: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    summary = train(**{**TINY_TRAIN, "epochs": 3, "optimizer": "sgd", "lr": 0.05, "schedule": "onecycle",
                       "time_budget": 1e-6}, data=str(scenes), out=str(out))
    assert summary["epochs"] == 1 and len(_history(out)) == 1
    assert "planning 1 epoch (about" in capsys.readouterr().out
    steps = -(-len(json.loads((out / "split.json").read_text())["train_idx"]) // TINY_TRAIN["batch_size"])
    # the one-epoch schedule, run through to its end, not the first epoch of the three-epoch one
    assert float(_history(out)[0]["lr"]) == pytest.approx(_one_cycle_lrs(0.05, steps, 0.1)[-1], rel=1e-5)
    assert _one_cycle_lrs(0.05, steps, 0.1)[-2] < 0.05 / 1000 < _one_cycle_lrs(0.05, 3 * steps, 0.1)[steps - 1]


@pytest.mark.slow
def test_early_crops_train_the_early_epochs_and_price_the_budget(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    train_module = sys.modules["unetseg.train"]
    shapes: dict[int, set] = {}
    step, plan = train_module.train_step, train_module.plan_epochs
    epoch = {"now": 0}

    def spy_step(model, opt, x, y, *args, **kwargs):
        shapes.setdefault(epoch["now"], set()).add(tuple(x.shape[-2:]))
        assert tuple(y.shape[-2:]) == tuple(x.shape[-2:])
        return step(model, opt, x, y, *args, **kwargs)

    seen: dict = {}

    def spy_plan(*args):
        seen["args"] = args
        return plan(*args)

    batches = train_module._batches

    def spy_batches(run, e):
        epoch["now"] = e
        return batches(run, e)

    monkeypatch.setattr(train_module, "train_step", spy_step)
    monkeypatch.setattr(train_module, "plan_epochs", spy_plan)
    monkeypatch.setattr(train_module, "_batches", spy_batches)
    settings = {**TINY_TRAIN, "epochs": 4, "crop": [24, 32], "early_crop": [16, 24], "early_crop_fraction": 0.5,
                "time_budget": 600}
    summary = train(**settings, data=str(scenes), out=str(tmp_path / "run"))
    assert summary["epochs"] == 4  # 10 h fit four tiny epochs
    assert shapes == {1: {(16, 24)}, 2: {(16, 24)}, 3: {(24, 32)}, 4: {(24, 32)}}
    epoch_s, early_fraction, late_epoch_s = seen["args"][4], seen["args"][7], seen["args"][8]
    assert early_fraction == 0.5 and late_epoch_s == pytest.approx(epoch_s * (24 * 32) / (16 * 24))


@pytest.mark.parametrize("early_crop, message", [([18, 24], "18"), ([48, 48], "early_crop \\[48, 48\\] is larger")])
def test_bad_early_crop_is_named_before_training(scenes: Path, tmp_path: Path, early_crop, message) -> None:
    settings = {**TINY_TRAIN, "crop": [24, 32], "early_crop": early_crop, "early_crop_fraction": 0.5}
    with pytest.raises(UnetsegError, match=message):
        train(**settings, data=str(scenes), out=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_weighted_run_stores_its_prior_correction(scenes: Path, tmp_path: Path) -> None:
    from unetseg.losses import class_weights

    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 1, "class_weighting": "sqrt_inverse",
             "prior_correction": 0.5})
    state = load_checkpoint(out / "last.pt")
    split = json.loads((out / "split.json").read_text())
    data = load_dataset(scenes, size=tuple(state["preprocess"]["size"]), resize_mode="lab", progress=False)
    w = class_weights(data.subset(split["train_idx"]).masks, 23, "sqrt_inverse")
    expected = torch.where(w > 0, -0.5 * w.clamp(min=1e-12).log(), torch.zeros(23))
    torch.testing.assert_close(torch.tensor(state["logit_bias"]), expected)
    assert expected.min() < 0 < expected.max()  # common classes pushed up, rare ones down
    unweighted = tmp_path / "plain"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(unweighted), "epochs": 1, "prior_correction": 0.5})
    assert "logit_bias" not in load_checkpoint(unweighted / "last.pt")  # nothing to correct without weights


@pytest.mark.slow
def test_lovasz_term_joins_after_its_share_of_the_epochs(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    import unetseg.losses as losses

    calls: list[int] = []
    lovasz = losses.lovasz_softmax
    monkeypatch.setattr(losses, "lovasz_softmax", lambda logits, target: calls.append(1) or lovasz(logits, target))

    out = tmp_path / "run"
    summary = train(**{**TINY_TRAIN, "loss": "ce+dice+lovasz", "lovasz_from": 0.5, "epochs": 2},
                    data=str(scenes), out=str(out))
    history = _history(out)
    assert summary["epochs"] == 2 and all(float(r["train_loss"]) > 0 for r in history)
    n_steps = -(-len(json.loads((out / "split.json").read_text())["train_idx"]) // TINY_TRAIN["batch_size"])
    assert len(calls) == n_steps  # epoch 1 of 2 trains without the term, epoch 2 with it at every step


@pytest.mark.slow
def test_run_balance_reaches_the_epoch_order(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    train_module = sys.modules["unetseg.train"]  # `unetseg.train` the attribute is the function

    seen: list[torch.Tensor | None] = []
    order = train_module.epoch_order

    def spy(n, weights, generator):
        seen.append(weights)
        return order(n, weights, generator)

    monkeypatch.setattr(train_module, "epoch_order", spy)
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "run_balance": 1.0, "epochs": 1}, data=str(scenes), out=str(out))
    n_train = len(json.loads((out / "split.json").read_text())["train_idx"])
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (n_train,)
    assert yaml.safe_load((out / "config.yaml").read_text())["settings"]["run_balance"] == 1.0
    seen.clear()
    train(**{**TINY_TRAIN, "epochs": 1}, data=str(scenes), out=str(tmp_path / "plain"))
    assert seen == [None]  # off by default


@pytest.mark.slow
def test_class_mix_runs_on_every_training_batch(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    import unetseg.data as data

    calls: list[tuple[int, float]] = []
    mix = data.class_mix

    def spy(images, masks, probability, generator=None):
        calls.append((images.shape[0], probability))
        out = mix(images, masks, probability, generator=generator)
        assert out[0].shape == images.shape and out[1].shape == masks.shape
        return out

    monkeypatch.setattr(data, "class_mix", spy)
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "class_mix": 0.5, "epochs": 1}, data=str(scenes), out=str(out))
    n_train = len(json.loads((out / "split.json").read_text())["train_idx"])
    assert sum(b for b, _ in calls) == n_train and {p for _, p in calls} == {0.5}
    assert yaml.safe_load((out / "config.yaml").read_text())["settings"]["class_mix"] == 0.5
    calls.clear()
    train(**{**TINY_TRAIN, "epochs": 1}, data=str(scenes), out=str(tmp_path / "plain"))
    assert calls == []  # off by default


def test_data_thread_only_where_cores_are_spare(monkeypatch) -> None:
    from unetseg.train import data_thread_pays

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not data_thread_pays(torch.device("cpu"))  # both cores run the step: batches between steps
    assert data_thread_pays(torch.device("cuda"))  # a GPU step leaves the CPU free
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert data_thread_pays(torch.device("cpu"))


@pytest.mark.slow
def test_data_thread_or_not_trains_the_same_weights(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    train_module = sys.modules["unetseg.train"]
    settings = {**TINY_TRAIN, "epochs": 2, "size": [48, 64], "crop": [32, 48], "augment": True,
                "deterministic": True}
    weights = []
    for thread in (True, False):
        monkeypatch.setattr(train_module, "data_thread_pays", lambda device, thread=thread: thread)
        out = tmp_path / f"thread_{thread}"
        train(**settings, data=str(scenes), out=str(out))
        assert yaml.safe_load((out / "config.yaml").read_text())["environment"]["data_thread"] is thread
        weights.append(load_checkpoint(out / "last.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_grad_clip_bounds_the_step() -> None:
    torch.manual_seed(0)
    model = build_model("lab", n_classes=3, base_filters=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    train_step(model, sgd, x, y, "fp32", torch.device("cpu"), grad_clip=1e-3)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert 0 < moved <= 1e-3 * 1.001  # SGD at lr 1 moves the weights by exactly the clipped gradient


@pytest.mark.slow
def test_batch_norm_run_with_ema_serves_the_plain_network(scenes: Path, tmp_path: Path, capsys) -> None:
    from unetseg.model import model_from_checkpoint, model_from_config

    out = tmp_path / "bn"
    train(**{**TINY_TRAIN, "batch_norm": True, "ema": 0.9}, data=str(scenes), out=str(out))
    plain = sum(p.numel() for p in build_model("lab", base_filters=8, depth=2).parameters())
    assert f"checkpoints serve {plain:,}" in capsys.readouterr().out
    state = load_checkpoint(out / "best.pt")
    assert state["model_config"]["batch_norm"]  # the checkpoint holds what was trained (and resumes it)
    trained = model_from_config(state["model_config"])
    trained.load_state_dict(state["model"])
    served = model_from_checkpoint({**state, "logit_bias": None})
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())
    assert sum(p.numel() for p in served.parameters()) == sum(
        p.numel() for p in build_model("lab", base_filters=8, depth=2).parameters())
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        expected, got = trained.eval()(x), served(x)
    assert torch.allclose(expected, got, atol=1e-4 * expected.abs().max().item())


@pytest.mark.slow
def test_ema_run_validates_and_saves_the_average(scenes: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ema"
    summary = train(**{**TINY_TRAIN, "ema": 0.5, "split_seed": 3, "seed": 1}, data=str(scenes), out=str(out))
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert "train_model" not in best and "train_model" in last
    assert last["ema_updates"] > 1
    # The average lags the trained weights, and best.pt (what evaluate/predict load) holds the average.
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])
    assert summary["best_miou"] == best["best_miou"]
    # split_seed fixes the split whatever the training seed.
    other = train(**{**TINY_TRAIN, "epochs": 1, "split_seed": 3, "seed": 2, "ema": 0.999}, data=str(scenes),
                  out=str(tmp_path / "other"))
    assert "note: ema 0.999 is not reached" in capsys.readouterr().out
    split = lambda run: json.loads((Path(run) / "split.json").read_text())  # noqa: E731
    assert split(out) == split(other["run_dir"])


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 1})
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UnetsegError, match="already holds a training run"):
        train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 1})
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_curves_are_drawn_first_last_and_at_most_every_interval(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    t = sys.modules["unetseg.train"]
    drawn, draw = [], t._plot

    def counting_plot(run_dir: Path, history: list) -> None:
        drawn.append(len(history))
        draw(run_dir, history)

    monkeypatch.setattr(t, "_plot", counting_plot)
    monkeypatch.setattr(t, "CURVES_EVERY_S", 1e9)
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 4})
    assert drawn == [1, 4] and (out / "curves.png").is_file()  # the first epoch, then the last
    drawn.clear()
    monkeypatch.setattr(t, "CURVES_EVERY_S", 0.0)
    resume(out, epochs=6)
    assert drawn == [5, 6]  # every epoch once the interval has passed


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(out), "epochs": 1})
    good = load_checkpoint(out / "last.pt")
    t = sys.modules["unetseg.train"]

    def exploding(logits, target, weight=None):
        return cross_entropy(logits, target, weight) * float("nan")

    monkeypatch.setattr(t, "make_loss", lambda name, n, weight=None, hard_pixels=1.0, label_smoothing=0.0: exploding)
    with pytest.raises(UnetsegError, match="loss became nan at epoch 2"):
        resume(out, epochs=3)
    after = load_checkpoint(out / "last.pt")
    assert after["epoch"] == 1
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "model": {}, "model_config": {}}, path)
    original = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not mkstemp's owner-only 0o600

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "model": {}, "model_config": {}}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UnetsegError, match="best.pt: not a readable unetseg checkpoint"):
        load_checkpoint(bad)


def _train_cmd(data: Path, out: Path, cfg: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "unetseg", "train", "--data", str(data), "--out", str(out), "--config", str(cfg),
            "--epochs", str(epochs), "--deterministic", "--threads", "1", "--no-progress"]


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(scenes: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    # Augmentation and dropout on: resuming must restore both their random streams; the weight average
    # (ema) and batch norm's running statistics must come back too.
    cfg.write_text(yaml.safe_dump({
        "recipe": "default", "base_filters": 8, "depth": 2, "size": [48, 64], "crop": [32, 48],
        "batch_size": 4, "precision": "fp32", "dropout": 0.3, "lr": 0.002, "ema": 0.9, "grad_clip": 1.0,
        "batch_norm": True, "deep_supervision": 0.4,
    }))
    epochs = 8
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(scenes, straight, cfg, epochs), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(scenes, killed, cfg, epochs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "history.csv").exists() and len(_history(killed)) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = load_checkpoint(killed / "last.pt")["epoch"]
    assert 2 <= done < epochs, "the kill must land mid-run"

    subprocess.run([sys.executable, "-m", "unetseg", "train", "--resume", str(killed)], check=True,
                   capture_output=True)
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert a["epoch"] == b["epoch"] == epochs
    # The weight average, the weights being trained and the deep-supervision heads.
    for key in ("model", "train_model", "aux_heads"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert len(_history(killed)) == epochs


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_predicts(scenes: Path, tmp_path: Path) -> None:
    from unetseg.quickstart import quickstart

    out = tmp_path / "qs"
    settings = {k: v for k, v in TINY_TRAIN.items() if k not in ("recipe", "epochs")}
    metrics = quickstart(data=scenes, out=out, recipe="lab", epochs=1, show=3, **settings)
    assert 0 <= metrics["mean_iou"] <= 1 and metrics["split"] == "val"
    assert (out / "evaluation" / "confusion.png").is_file()
    assert len(list((out / "predictions" / "triplet").glob("*.png"))) == 3


@pytest.mark.slow
def test_colour_masks_with_a_palette_train_and_evaluate(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from unetseg.evaluate import evaluate

    palette = {"background": [0, 0, 0], "road": [128, 64, 128], "car": [0, 0, 142]}
    (tmp_path / "palette.json").write_text(json.dumps(palette))
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        ids = np.zeros((32, 48), np.uint8)
        ids[16:] = 1
        ids[18:24, 5 + i : 15 + i] = 2
        colours = np.array(list(palette.values()), np.uint8)[ids]
        image = (colours * 0.8 + rng.integers(0, 40, colours.shape)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"f{i:02d}.jpg")
        Image.fromarray(colours).save(tmp_path / "data" / "masks" / f"f{i:02d}.png")
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "data": str(tmp_path / "data"), "out": str(out), "epochs": 2,
             "palette": str(tmp_path / "palette.json"), "val_fraction": 0.25})
    state = load_checkpoint(out / "best.pt")
    assert state["classes"]["names"] == ["background", "road", "car"]
    r = evaluate(out / "best.pt", tmp_path / "data", palette=tmp_path / "palette.json", progress=False)
    assert r["frames"] == 12 and set(r["classes_present"]) == {"background", "road", "car"}


@pytest.mark.slow
def test_training_decodes_each_file_once(scenes: Path, tmp_path: Path) -> None:
    from unetseg.data import layouts

    before = layouts.DECODE_COUNT
    train(**{**TINY_TRAIN, "data": str(scenes), "out": str(tmp_path / "run"), "epochs": 3})
    # 40 images + 40 masks, decoded once at load; epochs 2 and 3 read only the in-memory tensors.
    assert layouts.DECODE_COUNT - before == 80


def test_ema_decay_warms_up() -> None:
    from unetseg.train import _ema_update

    update = _ema_update(0.99)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update(avg, cur, torch.tensor(1))  # after 1 update: decay (1+1)/(10+1) = 0.18, not 0.99
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - 2 / 11))
    avg = [torch.zeros(3)]
    update(avg, cur, torch.tensor(10_000))  # long after: the full decay
    torch.testing.assert_close(avg[0], torch.full((3,), 0.01))


def test_ema_settings_above_the_warm_up_train_the_same_average(capsys) -> None:
    from unetseg.train import _ema_update, ema_decay_at

    assert ema_decay_at(0.997, 2989) < 0.997 == ema_decay_at(0.997, 2990)  # reached after 2,990 updates
    torch.manual_seed(0)
    steps = [torch.randn(4) for _ in range(500)]
    averages = []
    for decay in (0.99, 0.997, 0.999):
        update, avg = _ema_update(decay), [torch.zeros(4)]
        for n, w in enumerate(steps):
            update(avg, [w], torch.tensor(n))
        averages.append(avg[0])
    # 500 updates end at decay 500/509 = 0.982: 0.997 and 0.999 are never reached, so they are one average.
    assert torch.equal(averages[1], averages[2]) and torch.equal(averages[0], averages[1])


def test_debiased_ema_is_the_exact_exponential_average_from_the_first_update() -> None:
    from unetseg.train import _ema_update, ema_decay_at

    torch.manual_seed(0)
    steps = [torch.randn(4, dtype=torch.float64) for _ in range(300)]
    for decay in (0.9, 0.99):
        update, avg = _ema_update(decay, "debiased"), [steps[0].clone()]  # AveragedModel copies the first
        for n, w in enumerate(steps[1:], start=1):
            update(avg, [w], torch.tensor(n))
        ages = torch.arange(len(steps) - 1, -1, -1, dtype=torch.float64)
        expected = (decay**ages[:, None] * torch.stack(steps)).sum(0) / (decay**ages).sum()
        torch.testing.assert_close(avg[0], expected)
    # unlike the "tf" rule, the setting matters in a short run: 300 updates at 0.99 and 0.999 differ
    assert ema_decay_at(0.999, 299, "debiased") > ema_decay_at(0.99, 299, "debiased") > 0.98
    assert ema_decay_at(0.999, 0, "debiased") == 0.0


def test_ema_warmup_reaches_the_average_and_only_the_average(scenes: Path, tmp_path: Path) -> None:
    runs = {warmup: train(**{**TINY_TRAIN, "epochs": 1, "ema": 0.9, "ema_warmup": warmup}, data=str(scenes),
                          out=str(tmp_path / warmup)) for warmup in ("tf", "debiased")}
    tf, debiased = (load_checkpoint(Path(runs[w]["run_dir"]) / "last.pt") for w in ("tf", "debiased"))
    assert all(torch.equal(tf["train_model"][k], debiased["train_model"][k]) for k in tf["train_model"])
    assert any(not torch.equal(tf["model"][k], debiased["model"][k]) for k in tf["model"])


def test_ema_warmup_is_checked() -> None:
    from unetseg.config import resolve_config

    with pytest.raises(UnetsegError, match="ema_warmup 'swa' must be one of tf, debiased"):
        resolve_config(overrides={"ema_warmup": "swa"})


@pytest.mark.slow
def test_rare_paste_runs_on_every_training_batch_with_the_runs_rare_classes(scenes: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    import unetseg.data as data

    calls: list[tuple[int, float, list[int]]] = []
    paste = data.rare_paste

    def spy(images, masks, probability, rare, generator=None):
        calls.append((images.shape[0], probability, torch.nonzero(rare).flatten().tolist()))
        out = paste(images, masks, probability, rare, generator=generator)
        assert out[0].shape == images.shape and out[1].shape == masks.shape
        return out

    monkeypatch.setattr(data, "rare_paste", spy)
    out = tmp_path / "run"
    train(**{**TINY_TRAIN, "rare_paste": 0.5, "rare_paste_below": 0.05, "epochs": 1}, data=str(scenes), out=str(out))
    split = json.loads((out / "split.json").read_text())
    assert sum(b for b, _, _ in calls) == len(split["train_idx"]) and {p for _, p, _ in calls} == {0.5}
    # the rare classes are those with under 5 % of the training pixels
    from unetseg.data import find_pairs, read_mask

    pairs, layout = find_pairs(scenes, "auto")
    counts = torch.zeros(256, dtype=torch.long)
    for k in split["train_idx"]:
        counts += torch.bincount(torch.from_numpy(read_mask(pairs[k].mask, layout).astype("int64")).flatten(),
                                 minlength=256)
    # (shares at the frames' own size; training resizes them, nearest, which moves shares a little)
    share = counts.double() / counts.sum()
    rare = calls[0][2]
    assert rare and all(0 < share[c] < 0.06 for c in rare)  # the generated scenes have rare classes
    assert all(share[c] > 0.04 for c in torch.nonzero(share).flatten().tolist() if c not in rare)
    calls.clear()
    train(**{**TINY_TRAIN, "epochs": 1}, data=str(scenes), out=str(tmp_path / "plain"))
    assert calls == []  # off by default
