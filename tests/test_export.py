"""ONNX export, the exact transposed-conv rewrite, int8 quantization and the ONNX Runtime predictor.

The rewrite tests need only torch; everything that runs a model in ONNX Runtime skips cleanly where
``onnxruntime`` (the ``onnx`` extra) is not installed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.export import ConvTransposeAsConvShuffle, rewrite_transposed_convs
from unetseg.model import ConvTranspose2dSame, build_model


def _native_same(t: ConvTranspose2dSame, x: torch.Tensor) -> torch.Tensor:
    """The reference: PyTorch's own transposed conv, cropped to 2H x 2W (TF 'same' alignment)."""
    h, w = x.shape[-2:]
    return nn.ConvTranspose2d.forward(t, x)[..., : 2 * h, : 2 * w]


@pytest.mark.parametrize("cin,cout,h,w", [(3, 5, 4, 6), (16, 8, 6, 8), (1, 1, 3, 3)])
def test_rewrite_equals_transposed_conv_same(cin: int, cout: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    t = ConvTranspose2dSame(cin, cout)
    nn.init.normal_(t.bias)
    x = torch.randn(2, cin, h, w)
    with torch.no_grad():
        ref = _native_same(t, x)
        out = ConvTransposeAsConvShuffle(t)(x)
    assert out.shape == (2, cout, 2 * h, 2 * w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rewrite_equals_paper_up_convolution() -> None:
    # The paper's 2x2 stride-2 up-conv has no overlap: the rewrite is a 1x1 conv + pixel shuffle.
    torch.manual_seed(0)
    t = nn.ConvTranspose2d(6, 4, 2, stride=2)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(ConvTransposeAsConvShuffle(t)(x), t(x), atol=1e-5, rtol=1e-5)


def test_rewrite_refuses_what_it_cannot_do_exactly() -> None:
    with pytest.raises(UnetsegError, match="cannot rewrite"):
        ConvTransposeAsConvShuffle(nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1))
    with pytest.raises(UnetsegError, match="larger than stride"):
        ConvTransposeAsConvShuffle(nn.ConvTranspose2d(2, 2, 3, stride=2))  # output 2H+1, not 2H


@pytest.mark.parametrize("arch,size", [("lab", (32, 48)), ("paper", (44, 44))])
def test_rewritten_model_matches_and_leaves_original_alone(arch: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = build_model(arch, base_filters=4, depth=2, n_classes=5).eval()
    rewritten = rewrite_transposed_convs(net)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in rewritten.modules())
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules()) == 2  # untouched
    x = torch.rand(2, net.config["in_channels"], *size)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), net(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ ONNX Runtime
@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lab", base_filters=4, depth=2, n_classes=5).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from unetseg.export import export_onnx

    return export_onnx(tiny, tmp_path_factory.mktemp("onnx") / "tiny.onnx", input_size=(32, 32))


def test_onnx_fp32_matches_torch(tiny: nn.Module, tiny_onnx: Path) -> None:
    import onnx

    from unetseg.export import OnnxPredictor

    ops = {n.op_type for n in onnx.load(str(tiny_onnx)).graph.node}
    assert "ConvTranspose" not in ops and "Conv" in ops  # rewritten: every conv is a Conv
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = tiny(x)
    pred = OnnxPredictor(tiny_onnx, threads=1)
    out = pred(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5, 32, 32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    as_np = pred(x.numpy())
    assert isinstance(as_np, np.ndarray)
    # uint8 frames are scaled by 1/255, as the data pipeline does
    frames = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(pred(frames), pred(frames.float() / 255), atol=1e-6, rtol=0)


def test_onnx_fixed_batch_pads_last_chunk(tiny: nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from unetseg.export import OnnxPredictor, export_onnx

    path = export_onnx(tiny, tmp_path / "b4.onnx", input_size=(32, 32), batch=4, rewrite_transposed=False)
    pred = OnnxPredictor(path, threads=1)
    assert pred.batch == 4
    x = torch.rand(6, 3, 32, 32)  # one full chunk and a padded one
    with torch.no_grad():
        torch.testing.assert_close(pred(x), tiny(x), atol=1e-4, rtol=1e-4)


def test_int8_quantization_is_static_qdq_per_channel(tiny: nn.Module, tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from unetseg.export import OnnxPredictor, quantize_int8

    frames = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    q = quantize_int8(tiny_onnx, frames, tmp_path / "tiny.int8.onnx")
    graph = onnx.load(str(q)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "ConvTranspose" not in ops
    inits = {i.name: i for i in graph.initializer}
    # Per-channel weights: a weight DequantizeLinear has one scale per output channel (a vector).
    # (signed weights, or unsigned ones on an x86 CPU without VNNI: int8_weights)
    quantized = {name for name, t in inits.items() if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    weight_scales = [
        numpy_helper.to_array(inits[n.input[1]])
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    ]
    assert weight_scales and all(s.ndim == 1 and s.size > 1 for s in weight_scales)
    x = frames[:4].float() / 255
    with torch.no_grad():
        ref = tiny(x)
    out = OnnxPredictor(q, threads=1)(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # Random weights give near-ties everywhere, so only closeness of the logits is checked here; the
    # quality on real frames with trained weights is measured by benchmarks/int8_quality.py.
    err = (out - ref).abs().mean() / ref.abs().mean()
    assert err < 0.1


def test_int8_quantization_warns_when_its_classes_stray_from_fp32(tiny_onnx: Path, tmp_path: Path) -> None:
    from unetseg.export import int8_agreement, quantize_int8

    frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="agree with the fp32 model's on only"):
        q = quantize_int8(tiny_onnx, frames, tmp_path / "q.onnx", min_agreement=1.01)  # cannot be met
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_int8(tiny_onnx, frames, tmp_path / "q2.onnx", check_frames=0, min_agreement=1.01)
    assert int8_agreement(tiny_onnx, tiny_onnx, frames[:2]) == 1.0
    assert 0.5 < int8_agreement(tiny_onnx, q, frames) < 1.0  # near-ties of random weights flip some pixels


def test_int8_weights_describe_how_they_were_quantized(tiny_onnx: Path, tmp_path: Path) -> None:
    from unetseg.export import int8_weights, quantize_int8
    from unetseg.runtime import int8_may_saturate

    frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def made(name: str, **kw: object) -> dict:
        return int8_weights(quantize_int8(tiny_onnx, frames, tmp_path / name, check_frames=0, **kw))

    assert made("s8.onnx", weight_type="int8") == {"type": "int8", "bits": 8}
    assert made("s7.onnx", weight_type="int8", reduce_range=True) == {"type": "int8", "bits": 7}
    assert made("u8.onnx", weight_type="uint8") == {"type": "uint8", "bits": 8}
    # By default: unsigned weights where signed ones would saturate (x86 without VNNI), signed elsewhere.
    assert made("auto.onnx")["type"] == ("uint8" if int8_may_saturate() else "int8")
    with pytest.raises(UnetsegError, match="weight type 'int4'"):
        made("bad.onnx", weight_type="int4")
    with pytest.raises(UnetsegError, match="no quantized weights"):
        int8_weights(tiny_onnx)


def _fake_export(folder: Path, fp32: Path, int8: Path) -> Path:
    """A minimal export folder (what load_exported reads) around the given graphs."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(fp32.read_bytes())
    (folder / "model.int8.onnx").write_bytes(int8.read_bytes())
    info = {"files": {"fp32": "model.onnx", "int8": "model.int8.onnx"},
            "input": {"size": [32, 32], "resize_mode": "default"},
            "classes": {"names": [f"c{i}" for i in range(5)]}, "model_config": {"n_classes": 5}}
    (folder / "model.json").write_text(json.dumps(info))
    return folder


def test_8bit_int8_export_is_not_run_where_it_saturates(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model with signed 8-bit weights (made on a VNNI CPU) on an x86 CPU without VNNI: ONNX Runtime's u8 x s8
    # kernels there add pairs of products in saturating int16 (a lab checkpoint lost 0.97 mIoU point),
    # so the folder runs its fp32 model instead, and naming the int8 file runs it with a warning.
    import unetseg.export as export
    from unetseg.export import load_exported, quantize_int8

    frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s8 = quantize_int8(tiny_onnx, frames, tmp_path / "s8.onnx", check_frames=0, weight_type="int8")
    u8 = quantize_int8(tiny_onnx, frames, tmp_path / "u8.onnx", check_frames=0, weight_type="uint8")
    s7 = quantize_int8(tiny_onnx, frames, tmp_path / "s7.onnx", check_frames=0, weight_type="int8", reduce_range=True)
    full = _fake_export(tmp_path / "full", tiny_onnx, s8)

    monkeypatch.setattr(export, "int8_may_saturate", lambda: True)
    with pytest.warns(UserWarning, match="signed 8-bit weights.*Running .*model.onnx instead"):
        state = load_exported(full)
    assert state["precision"] == "fp32" and state["onnx"] == full / "model.onnx"
    with pytest.warns(UserWarning, match="signed 8-bit weights.*pass model.onnx"):
        state = load_exported(full / "model.int8.onnx")
    assert state["precision"] == "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, q in (("unsigned", u8), ("seven_bit", s7)):  # neither saturates
            assert load_exported(_fake_export(tmp_path / name, tiny_onnx, q))["precision"] == "int8"

        monkeypatch.setattr(export, "int8_may_saturate", lambda: False)  # a VNNI (or ARM) CPU
        state = load_exported(full)
    assert state["precision"] == "int8" and state["onnx"] == full / "model.int8.onnx"


def test_quantize_rejects_bad_inputs(tiny_onnx: Path, tmp_path: Path) -> None:
    from unetseg.export import quantize_int8

    with pytest.raises(UnetsegError, match="calibration images"):
        quantize_int8(tiny_onnx, torch.zeros(3, 32, 32), tmp_path / "q.onnx")
    with pytest.raises(UnetsegError, match="calibration method"):
        quantize_int8(tiny_onnx, torch.zeros(1, 3, 32, 32), tmp_path / "q.onnx", method="magic")
    with pytest.raises(UnetsegError, match="check_frames"):
        quantize_int8(tiny_onnx, torch.zeros(1, 3, 32, 32), tmp_path / "q.onnx", check_frames=-1)


def test_predictor_missing_file(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from unetseg.export import OnnxPredictor

    with pytest.raises(UnetsegError, match="no such ONNX model"):
        OnnxPredictor(tmp_path / "nope.onnx")


def test_float_levels_leave_a_decoder_level_unquantized(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    from unetseg.export import OnnxPredictor, decoder_level_nodes, quantize_int8

    model = onnx.load(str(tiny_onnx))
    ops = {n.name: n.op_type for n in model.graph.node}
    level0 = decoder_level_nodes(model, 0)
    # the up-conv, the concatenation and the two convs after it (plus the shuffle and ReLUs between)
    assert [ops[n] for n in level0].count("Conv") == 3 and [ops[n] for n in level0].count("Concat") == 1
    assert set(level0).isdisjoint(decoder_level_nodes(model, 1))
    with pytest.raises(UnetsegError, match="decoder level 2 does not exist"):
        decoder_level_nodes(model, 2)

    frames = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def float_convs(path: Path) -> int:
        graph = onnx.load(str(path)).graph
        floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        return sum(n.op_type == "Conv" and n.input[1] in floats for n in graph.node)

    all_int8 = quantize_int8(tiny_onnx, frames, tmp_path / "all.onnx", check_frames=0)
    level0_float = quantize_int8(tiny_onnx, frames, tmp_path / "l0.onnx", float_levels=[0], check_frames=0)
    assert float_convs(all_int8) == 1  # the logits conv
    assert float_convs(level0_float) == 1 + 3
    x = frames[:2].float() / 255
    assert OnnxPredictor(level0_float, threads=1)(x).shape == (2, 5, 32, 32)


def _activation_scales(path: Path) -> dict[str, float]:
    """The uint8 scale of every quantized activation (QuantizeLinear of a float tensor, not a weight)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_percentile_calibration_runs_batch_by_batch_and_clips_the_tails(tiny_onnx: Path, tmp_path: Path) -> None:
    from unetseg.export import OnnxPredictor, quantize_int8

    frames = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    minmax = _activation_scales(quantize_int8(tiny_onnx, frames, tmp_path / "mm.onnx", check_frames=0))
    # 12 frames in batches of 2: six separate collections merged into one histogram per tensor
    q = quantize_int8(tiny_onnx, frames, tmp_path / "pc.onnx", method="percentile", percentile=99.0,
                      calibration_batch=2, check_frames=0)
    pct = _activation_scales(q)
    assert pct.keys() == minmax.keys() and len(pct) > 5
    assert all(pct[k] <= minmax[k] * (1 + 1e-6) for k in pct)  # a percentile range lies inside the min-max
    assert sum(pct[k] < 0.9 * minmax[k] for k in pct) >= len(pct) // 2  # and clips most tensors' tails
    x = frames[:4].float() / 255
    assert torch.isfinite(OnnxPredictor(q, threads=1)(x)).all()
    # Every batch counts, not only the last: the brightest input is in the first batch of six.
    dim = frames // 3
    dim[0, :, :8, :8] = 255
    full = _activation_scales(quantize_int8(tiny_onnx, dim, tmp_path / "p100.onnx", method="percentile",
                                            percentile=100.0, calibration_batch=2, check_frames=0))
    assert full["images"] == pytest.approx(1 / 255, rel=0.02)  # the range [0, 1] over 255 steps


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lab", "paper"])
def test_export_command_writes_models_that_evaluate_and_predict_run(
    scenes: Path, tmp_path: Path, arch: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    from conftest import TINY_TRAIN

    from unetseg.checkpoint import load_checkpoint
    from unetseg.cli import main
    from unetseg.evaluate import evaluate
    from unetseg.export import OnnxPredictor, calibration_frames
    from unetseg.model import forward_full, model_from_checkpoint
    from unetseg.predict import predict
    from unetseg.train import train

    run = tmp_path / "run"
    size = [32, 48] if arch == "lab" else [60, 92]  # paper: its unpadded convs need a valid size
    train(**{**TINY_TRAIN, "arch": arch, "size": size, "epochs": 1, "predict_scales": [0.5, 1.0]}, data=str(scenes),
          out=str(run))
    ckpt = run / "best.pt"
    state = load_checkpoint(ckpt)
    out = tmp_path / "deploy"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--data", str(scenes),
                 "--calibration", "8"]) == 0
    info = json.loads((out / "model.json").read_text())
    from unetseg.int8 import onednn_int8_available

    onednn = onednn_int8_available()  # x86 with VNNI: the export also writes the oneDNN int8 model
    assert info["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"} | (
        {"int8_onednn": "model.int8.pt"} if onednn else {})
    # Each graph has one input size: the checkpoint's 0.5x scale gets graphs of its own, at half the size.
    assert state["preprocess"]["predict_scales"] == [0.5, 1.0]
    assert info["predict_scales"] == [0.5, 1.0] and info["checkpoint_predict_scales"] == [0.5, 1.0]
    half = [round(size[0] * 0.5), round(size[1] * 0.5)]
    assert info["scale_files"] == {"0.5": {"size": half, "fp32": "model.x0.5.onnx", "int8": "model.int8.x0.5.onnx"}}
    assert f"predicts {size[0]}x{size[1]} frames at 0.5x + 1x, averaged" in capsys.readouterr().out
    assert info["input"]["size"] == size and info["output"]["n_classes"] == len(state["classes"]["names"])
    assert info["classes"] == state["classes"] and info["val_names"] == state["val_names"]
    q = info["int8"]
    assert q["calibration_frames"] == 8 and q["method"] == "minmax" and q["equalized"]
    assert q["agreement_on"] == "validation frames" and q["agreement_frames"] == min(16, len(state["val_names"]))
    assert 0.5 < q["agreement_with_fp32"] <= 1.0 and set(q["agreement_with_fp32_by_scale"]) == {"0.5", "1"}
    assert q["agreement_with_fp32_by_scale"]["1"] == q["agreement_with_fp32"]
    from unetseg.runtime import int8_may_saturate

    assert q["weights"] == {"type": "uint8" if int8_may_saturate() else "int8", "bits": 8}
    assert not list(out.glob(".export-*"))  # the staging folder is gone
    import onnx

    assert [d.dim_value for d in onnx.load(out / "model.x0.5.onnx").graph.input[0].type.tensor_type.shape.dim][2:] \
        == half

    # The fp32 model maps frames to logits of the same size, as the checkpoint's model does in predict.
    frames = calibration_frames(state, scenes, count=4)
    assert frames.shape == (4, 3, *size) and frames.dtype == torch.uint8
    x = frames.float() / 255
    with torch.no_grad():
        ref = forward_full(model_from_checkpoint(state).eval(), x)
    assert ref.shape[-2:] == tuple(size)
    torch.testing.assert_close(OnnxPredictor(out / "model.onnx", threads=1)(x), ref, atol=1e-4, rtol=1e-4)

    # evaluate and predict take the export in place of the checkpoint: the fp32 file scores as the checkpoint
    # does in fp32, at both scales by default or at the one asked for; the folder runs the int8 models
    # (ONNX Runtime's here: the oneDNN model is checked below).
    import unetseg.export as export

    monkeypatch.setattr(export, "prefer_onednn_int8", lambda: False)
    kw = dict(split="val", progress=False, threads=1)
    for scales in (None, [1.0], [0.5]):
        from_ckpt = evaluate(ckpt, scenes, precision="fp32", scales=scales, **kw)
        from_fp32 = evaluate(out / "model.onnx", scenes, scales=scales, **kw)
        assert from_fp32["precision"] == "fp32 (ONNX Runtime)" and from_fp32["frames"] == from_ckpt["frames"]
        assert from_fp32["scales"] == from_ckpt["scales"] == (scales or [0.5, 1.0])
        cm_a, cm_b = np.array(from_ckpt["confusion_matrix"]), np.array(from_fp32["confusion_matrix"])
        assert np.abs(cm_a - cm_b).sum() <= 1e-3 * cm_a.sum()  # float rounding may flip a near-tie or two
    from_int8 = evaluate(out, scenes, **kw)
    assert from_int8["precision"] == "int8 (ONNX Runtime)" and 0 <= from_int8["mean_iou"] <= 1
    assert from_int8["scales"] == [0.5, 1.0]
    written = predict(out, [scenes / "CameraRGB"], tmp_path / "preds", progress=False, threads=1)
    assert len(written) == 40 and (tmp_path / "preds" / "triplet").is_dir()
    with pytest.raises(UnetsegError, match="is the export's int8 model"):
        evaluate(out, scenes, precision="bf16", **kw)
    with pytest.raises(UnetsegError, match="graphs for scales 0.5 1 only, so it cannot predict at scales \\[0.7\\]"):
        evaluate(out, scenes, scales=[0.7, 1.0], **kw)
    with pytest.raises(UnetsegError, match="one scale's graph of a multi-scale export"):
        evaluate(out / "model.int8.x0.5.onnx", scenes, **kw)

    if onednn:
        # One oneDNN int8 model serves both scales; the folder runs it on an AMX CPU, its file runs anywhere
        # it can, and it scores close to the checkpoint's own fp32 path.
        o = info["int8_onednn"]
        assert o["calibration_frames"] == 8 and o["equalized"]
        assert set(o["agreement_with_fp32_by_scale"]) == {"0.5", "1"}
        assert 0.5 < o["agreement_with_fp32"] <= 1.0
        monkeypatch.setattr(export, "prefer_onednn_int8", lambda: True)
        from_onednn = evaluate(out, scenes, **kw)
        assert from_onednn["precision"] == "int8 (oneDNN)" and from_onednn["scales"] == [0.5, 1.0]
        ref = evaluate(ckpt, scenes, precision="fp32", **kw)
        assert abs(from_onednn["pixel_accuracy"] - ref["pixel_accuracy"]) < 0.05
        monkeypatch.setattr(export, "prefer_onednn_int8", lambda: False)
        named = evaluate(out / "model.int8.pt", scenes, scales=[1.0], **kw)
        assert named["precision"] == "int8 (oneDNN)" and named["scales"] == [1.0]
        with pytest.raises(UnetsegError, match="is the export's int8 model"):
            evaluate(out / "model.int8.pt", scenes, precision="fp32", **kw)

    # A failed export leaves what an earlier one wrote.
    before = (out / "model.onnx").read_bytes()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--int8"]) == 2
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert (out / "model.onnx").read_bytes() == before and (out / "model.int8.onnx").is_file()
    with pytest.raises(UnetsegError, match="no model.json beside it"):
        evaluate(tmp_path / "elsewhere.onnx", scenes, **kw)
    # A later fp32-only export replaces the pair: no stale int8 model is left to be picked up; one at a single
    # scale leaves no graph of the other.
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert not (out / "model.int8.onnx").exists() and not (out / "model.int8.x0.5.onnx").exists()
    assert not (out / "model.int8.pt").exists()
    assert evaluate(out, scenes, **kw)["precision"] == "fp32 (ONNX Runtime)"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--scales", "1"]) == 0
    assert sorted(f.name for f in out.glob("*.onnx")) == ["model.onnx"]
    one = evaluate(out, scenes, **kw)
    assert one["scales"] == [1.0] and json.loads((out / "model.json").read_text())["scale_files"] == {}
