"""evaluate and predict from a checkpoint alone: hand-computed metrics, output files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unetseg.checkpoint import save_checkpoint
from unetseg.classes import CARLA, generic_classes
from unetseg.cli import main
from unetseg.errors import UnetsegError
from unetseg.evaluate import evaluate
from unetseg.model import build_model
from unetseg.predict import Predictor, expand_inputs, predict


def constant_checkpoint(path: Path, cls: int, n_classes: int = 23, size: list[int] | None = None) -> Path:
    """A checkpoint whose model predicts class ``cls`` everywhere: conv10 weights 0, bias one-hot."""
    model = build_model("lab", base_filters=4, depth=2, n_classes=n_classes)
    with torch.no_grad():
        model.conv10.weight.zero_()
        model.conv10.bias.zero_()
        model.conv10.bias[cls] = 5.0
    save_checkpoint({
        "model": model.state_dict(), "model_config": model.config,
        "classes": (CARLA if n_classes == 23 else generic_classes(n_classes)).to_dict(),
        "preprocess": {"size": size, "resize_mode": "default", "scale": 1 / 255, "layout": "carla"},
        "epoch": 1, "val_names": ["b"],
    }, path)
    return path


def random_checkpoint(path: Path) -> Path:
    """A checkpoint of a small, randomly initialised (seed 0) 3-class lab U-Net for images of any size."""
    torch.manual_seed(0)
    model = build_model("lab", base_filters=4, depth=2, n_classes=3)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config,
                     "classes": generic_classes(3).to_dict(), "preprocess": {"size": None}}, path)
    return path


def write_carla(root: Path, masks: dict[str, np.ndarray]) -> Path:
    (root / "CameraRGB").mkdir(parents=True)
    (root / "CameraMask").mkdir()
    rng = np.random.default_rng(0)
    for name, m in masks.items():
        h, w = m.shape
        Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8)).save(root / "CameraRGB" / f"{name}.png")
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., 0], rgba[..., 3] = m, 255
        Image.fromarray(rgba).save(root / "CameraMask" / f"{name}.png")
    return root


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    a = np.full((30, 40), 7, np.uint8)
    a[:10] = 13  # 400 sky, 800 road
    b = np.full((30, 40), 7, np.uint8)
    b[:, :10] = 1  # 300 building, 900 road
    return write_carla(tmp_path / "data", {"a": a, "b": b})


def test_evaluate_matches_hand_computed_confusion_matrix(labelled: Path, tmp_path: Path) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7, size=[32, 48])
    r = evaluate(ckpt, labelled, out_dir=tmp_path / "eval", progress=False)
    cm = np.zeros((23, 23), int)
    cm[7, 7], cm[13, 7], cm[1, 7] = 1700, 400, 300  # every pixel predicted Road
    assert r["confusion_matrix"] == cm.tolist()
    assert r["pixel_accuracy"] == pytest.approx(1700 / 2400)
    assert r["per_class_iou"]["Road"] == pytest.approx(1700 / 2400)
    assert r["per_class_iou"]["Sky"] == 0.0 and r["per_class_iou"]["Building"] == 0.0
    assert r["per_class_iou"]["Water"] is None
    assert r["mean_iou"] == pytest.approx(1700 / 2400 / 3)
    assert sorted(r["classes_present"]) == ["Building", "Road", "Sky"]
    assert r["frames"] == 2 and r["pixels"] == 2400  # the labels' own 30x40 resolution, not 32x48
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean_iou"] == pytest.approx(r["mean_iou"])


def test_evaluate_split_val_and_train_use_the_runs_frames(labelled: Path, tmp_path: Path) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7)
    r = evaluate(ckpt, labelled, split="val", progress=False)
    assert r["frames"] == 1 and r["pixels"] == 1200 and r["pixel_accuracy"] == pytest.approx(0.75)
    t = evaluate(ckpt, labelled, split="train", progress=False)  # frame "a": 800 road of 1200
    assert t["frames"] == 1 and t["split"] == "train" and t["pixel_accuracy"] == pytest.approx(800 / 1200)
    only_val = write_carla(tmp_path / "only_b", {"b": np.full((30, 40), 7, np.uint8)})
    with pytest.raises(UnetsegError, match="every frame here is one of the checkpoint's validation frames"):
        evaluate(ckpt, only_val, split="train", progress=False)
    with pytest.raises(UnetsegError, match="none of the checkpoint's 1 validation frames"):
        evaluate(ckpt, write_carla(tmp_path / "only_a", {"a": np.full((30, 40), 7, np.uint8)}), split="val",
                 progress=False)


def test_evaluate_cli_json(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(labelled), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"pixel_accuracy", "mean_iou", "per_class_iou"} <= set(out)


def test_evaluate_cli_report_names_the_split_and_classes(labelled: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(labelled), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "frames: 1 (train split)" in out and "pixel accuracy: 0.6667" in out
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines() if line[:3].strip().isdigit()}
    assert rows == {"Road": "0.6667", "Sky": "0.0000"}  # frame "a": 800 road, 400 sky, all predicted road


def test_evaluate_names_a_mask_outside_the_classes(tmp_path: Path) -> None:
    bad = np.full((16, 16), 7, np.uint8)
    bad[0, 0] = 5
    root = write_carla(tmp_path / "d", {"x": bad})
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=0, n_classes=5)
    with pytest.raises(UnetsegError, match=r"x\.png"):
        evaluate(ckpt, root, progress=False)


def test_predict_writes_outputs_at_the_inputs_own_size(labelled: Path, tmp_path: Path) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=13, size=[32, 48])
    odd = tmp_path / "odd.jpg"
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(odd)
    out = tmp_path / "pred"
    written = predict(ckpt, [str(labelled / "CameraRGB"), str(odd)], out, progress=False)
    assert [p.name for p in written] == ["a.png", "b.png", "odd.png"]
    m = Image.open(out / "masks" / "odd.png")
    assert m.mode == "L" and m.size == (53, 37)
    assert np.unique(np.asarray(m)).tolist() == [13]
    assert Image.open(out / "color" / "a.png").size == (40, 30)
    assert Image.open(out / "overlay" / "a.png").mode == "RGB"
    # a true mask sits beside the CARLA frames: the lab's triplet figure; none for the loose JPEG
    assert (out / "triplet" / "a.png").is_file() and not (out / "triplet" / "odd.png").exists()


def test_predict_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnetsegError, match="nothing.png: no such file"):
        expand_inputs([str(tmp_path / "nothing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnetsegError, match="empty: no images found"):
        expand_inputs([str(tmp_path / "empty")])
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / d / "same.png")
    with pytest.raises(UnetsegError, match="share the name 'same'"):
        expand_inputs([str(tmp_path / "x"), str(tmp_path / "y")])


def test_predictor_batches_mixed_sizes_in_order(tmp_path: Path) -> None:
    p = Predictor(constant_checkpoint(tmp_path / "c.pt", cls=9), batch_size=2)
    images = [np.zeros((h, 20, 3), np.uint8) for h in (16, 16, 16, 24, 16)]
    masks = p.predict(images)
    assert [m.shape for m in masks] == [(16, 20)] * 3 + [(24, 20), (16, 20)]
    assert all((m == 9).all() for m in masks)


def test_checkpoint_logit_bias_is_applied_by_every_consumer(labelled: Path, tmp_path: Path) -> None:
    # The model says Road (bias 5); a logit_bias of -6 on Road and +0 elsewhere must flip it to class 0 ...
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7)
    state = torch.load(ckpt, weights_only=True)
    bias = [0.0] * 23
    bias[7], bias[1] = -6.0, 0.5  # ... and then to Building, the largest remaining logit
    state["logit_bias"] = bias
    save_checkpoint(state, tmp_path / "biased.pt")
    p = Predictor(tmp_path / "biased.pt")
    assert (p.predict([np.zeros((16, 20, 3), np.uint8)])[0] == 1).all()
    r = evaluate(tmp_path / "biased.pt", labelled, progress=False)
    assert r["per_class_iou"]["Building"] == pytest.approx(300 / 2400)
    state["logit_bias"] = [0.0] * 5
    save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(UnetsegError, match="logit_bias has 5 values for 23 classes"):
        Predictor(tmp_path / "bad.pt")


def test_tta_averages_the_logits_of_the_mirror_image(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "m.pt")
    image = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    plain = Predictor(tmp_path / "m.pt", precision="fp32")
    tta = Predictor(tmp_path / "m.pt", precision="fp32", tta=True)
    mirrored = plain.logits([image[:, ::-1].copy()], (16, 24)).flip(-1)
    expected = (plain.logits([image], (16, 24)) + mirrored) / 2
    assert not torch.allclose(plain.logits([image], (16, 24)), expected, atol=1e-4)  # the mirror differs
    torch.testing.assert_close(tta.logits([image], (16, 24)), expected, atol=1e-5, rtol=1e-5)


def test_cli_tta_flag_reaches_evaluate(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(labelled), "--json", "--tta"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] is True and out["pixel_accuracy"] == pytest.approx(1700 / 2400)


def test_predictor_compiles_only_when_it_pays_off(tmp_path: Path) -> None:
    from unetseg.runtime import compile_available

    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7, size=[240, 320])
    assert not Predictor(ckpt, compile="auto", n_images=50).model.compiled  # 50 frames: compiling costs more
    assert not Predictor(ckpt, compile="off", n_images=10**6).model.compiled
    if compile_available(torch.device("cpu"))[0]:
        assert Predictor(ckpt, compile="auto", n_images=10**6).model.compiled
    # Without a fixed input size every new image size would compile again: auto stays eager.
    any_size = constant_checkpoint(tmp_path / "any.pt", cls=7, size=None)
    assert not Predictor(any_size, compile="auto", n_images=10**6).model.compiled


@pytest.mark.slow
def test_compiled_predictor_matches_eager(tmp_path: Path) -> None:
    from unetseg.runtime import compile_available

    if not compile_available(torch.device("cpu"))[0]:
        pytest.skip("torch.compile (inductor) unavailable here")
    random_checkpoint(tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, 24, 3), dtype=np.uint8) for h in (16, 16, 16, 32)]  # 3 + 1: padded
    eager = Predictor(tmp_path / "m.pt", precision="fp32", batch_size=4)
    compiled = Predictor(tmp_path / "m.pt", precision="fp32", batch_size=4, compile="on")
    assert compiled.model.compiled and not eager.model.compiled
    for a, b in zip(eager.predict(images), compiled.predict(images), strict=True):
        assert a.shape == b.shape and (a == b).mean() >= 0.999
    torch.testing.assert_close(compiled.logits(images[:3], (16, 24)), eager.logits(images[:3], (16, 24)),
                               atol=1e-4, rtol=1e-4)


def test_scales_average_the_class_probabilities_of_each_resized_copy(tmp_path: Path) -> None:
    import torch.nn.functional as F

    from unetseg.data import resize_image

    random_checkpoint(tmp_path / "m.pt")
    image = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    plain = Predictor(tmp_path / "m.pt", precision="fp32")
    multi = Predictor(tmp_path / "m.pt", precision="fp32", scales=[0.5, 1.0])
    assert plain.scales == [1.0] and multi.scales == [0.5, 1.0]
    # By hand: the logits of the half-size copy, resized up to the full copy's size, softmaxed, averaged.
    half = plain.logits([resize_image(image, (16, 24))], (16, 24))
    half = F.interpolate(half, size=(32, 48), mode="bilinear", align_corners=False)
    full = plain.logits([image], (32, 48))
    expected = ((half.softmax(1) + full.softmax(1)) / 2).log()
    got = multi.logits([image], (32, 48))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) != full.argmax(1)).any()  # the half-size copy changes some pixels
    assert multi.predict([image])[0].shape == (32, 48)


def test_checkpoint_predict_scales_are_the_default_and_flags_override(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = constant_checkpoint(tmp_path / "c.pt", cls=7, size=[16, 20])
    state = torch.load(ckpt, weights_only=True)
    state["preprocess"]["predict_scales"] = [0.5, 1.0]
    save_checkpoint(state, tmp_path / "ms.pt")
    assert Predictor(tmp_path / "ms.pt").scales == [0.5, 1.0]
    assert Predictor(tmp_path / "ms.pt", scales=[1]).scales == [1.0]
    assert Predictor(ckpt).scales == [1.0]  # a checkpoint from before predict_scales: one pass
    # A constant model predicts Road at every scale, so the scores stay those of one pass.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ms.pt"), "--data", str(labelled), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scales"] == [0.5, 1.0] and out["pixel_accuracy"] == pytest.approx(1700 / 2400)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ms.pt"), "--data", str(labelled), "--json",
                 "--scales", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["scales"] == [1.0]
    assert main(["predict", "--checkpoint", str(tmp_path / "ms.pt"), str(labelled / "CameraRGB"),
                 "--out", str(tmp_path / "p"), "--scales", "0.75", "1.25"]) == 0
    masks = sorted((tmp_path / "p" / "masks").glob("*.png"))
    assert masks and all((np.asarray(Image.open(m)) == 7).all() for m in masks)


@pytest.mark.parametrize("scales", [[], [0], [-1.0], [5.0], ["big"]])
def test_bad_scales_are_rejected_with_the_rule(tmp_path: Path, scales: list) -> None:
    with pytest.raises(UnetsegError, match="scales"):
        Predictor(constant_checkpoint(tmp_path / "c.pt", cls=7), scales=scales)
