"""int8 inference through oneDNN (``unetseg.int8``): the same logits as fp32 within int8's rounding, for both
architectures, saved and loaded unchanged, and clear errors where it cannot run.

Everything that runs the int8 kernels skips where ``onednn_int8_available()`` is false (non-x86, no VNNI).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.int8 import (
    Int8UNet,
    calibrate_ranges,
    load_int8,
    max_pool2x2_uint8,
    onednn_int8_available,
    quantize_model,
    save_int8,
)
from unetseg.model import build_model, forward_full

needs_onednn = pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 here (needs x86 with VNNI)")

# (arch, model options, calibration/input size)
MODELS = {
    "lab": ("lab", dict(base_filters=8, depth=2, n_classes=5), (32, 48)),
    "lab_bn": ("lab", dict(base_filters=8, depth=2, n_classes=5, batch_norm=True), (32, 48)),
    "paper": ("paper", dict(base_filters=8, depth=2, in_channels=3, n_classes=4), (44, 60)),
}


def _model(key: str) -> tuple[nn.Module, torch.Tensor]:
    arch, options, size = MODELS[key]
    torch.manual_seed(0)
    model = build_model(arch, **options).eval()
    for m in model.modules():  # batch norm with statistics of its own, so that folding it matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    frames = torch.randint(0, 256, (8, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return model, frames


@pytest.mark.parametrize("h,w", [(8, 12), (9, 7), (2, 2)])
def test_uint8_max_pool_equals_max_pool2d(h: int, w: int) -> None:
    x = torch.randint(0, 256, (2, 5, h, w), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    got = max_pool2x2_uint8(x)
    assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.float(), nn.functional.max_pool2d(x.float(), 2))


@needs_onednn
@pytest.mark.parametrize("key", list(MODELS))
def test_int8_logits_follow_fp32(key: str) -> None:
    model, frames = _model(key)
    q = quantize_model(model.train(), frames)
    assert model.training  # left in the mode it was in
    model.eval()
    x = frames.float() / 255
    with torch.no_grad():
        ref = model(x)
    out = q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # One uint8 step per tensor over ~8 layers: a few % of the logits' size. A wrong pixel-shuffle order, skip
    # order, zero point or requantization scale gives errors of the logits' own size.
    err = (out - ref).abs().mean() / ref.abs().mean()
    assert err < 0.08, f"relative error {err:.3f}"
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert torch.equal(q(frames), out)  # uint8 frames in: the same as uint8 / 255
    # the source model is untouched (equalizing and folding work on copies)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@needs_onednn
def test_each_concatenation_reads_one_range() -> None:
    model, frames = _model("lab")
    ranges = calibrate_ranges(model, frames)
    assert set(ranges) == {"enc0.a", "enc0.b", "enc1.a", "enc1.b", "enc2.a", "enc2.b",
                           "dec0.up", "dec0.a", "dec0.b", "dec1.up", "dec1.a", "dec1.b", "tail0"}
    assert all(lo >= 0 for name, (lo, _) in ranges.items() if not name.endswith(".up"))  # ReLU outputs
    used = Int8UNet(model, {(32, 48): ranges}).calibrations[(32, 48)]
    # cat([up, skip]) is one uint8 tensor: the deepest up output and the skip it meets share their range
    assert used["dec0.up"] == used["enc1.b"] == [min(ranges["dec0.up"][0], ranges["enc1.b"][0]),
                                                 max(ranges["dec0.up"][1], ranges["enc1.b"][1])]
    with pytest.raises(UnetsegError, match="int8 ranges lack dec1.b, tail0"):
        Int8UNet(model, {(32, 48): {k: v for k, v in ranges.items() if k not in ("dec1.b", "tail0")}})
    with pytest.raises(UnetsegError, match="at least one calibration"):
        Int8UNet(model, {})


@needs_onednn
def test_each_input_size_runs_with_the_ranges_measured_nearest_to_it(tmp_path: Path) -> None:
    # Ranges measured at one scale fit that scale: a default-recipe checkpoint calibrated on 1x and 0.6x frames
    # at once lost 0.94 mIoU point at 1x, 0.05 calibrated on 1x alone (BENCHMARKS.md, session 16).
    model, frames = _model("lab")
    half = nn.functional.interpolate(frames.float(), scale_factor=0.5, mode="nearest").to(torch.uint8)
    q = quantize_model(model, [frames, half])
    assert set(q.calibrations) == {(32, 48), (16, 24)}
    assert q.calibrations[(32, 48)] != q.calibrations[(16, 24)]
    assert q._net_for(16, 24) is q._nets[(16, 24)] and q._net_for(20, 28) is q._nets[(16, 24)]
    assert q._net_for(32, 48) is q._nets[(32, 48)] and q._net_for(64, 96) is q._nets[(32, 48)]
    back = load_int8(save_int8(q, tmp_path / "two.int8.pt"))
    assert back.calibrations == q.calibrations
    for x in (frames, half):
        assert torch.equal(back(x), q(x))


@needs_onednn
@pytest.mark.parametrize("key", ["lab", "paper"])
def test_int8_model_predicts_frames_of_any_size(key: str) -> None:
    model, frames = _model(key)
    q = quantize_model(model, frames)
    x = torch.rand(3, 3, 37, 53)
    with torch.no_grad():
        ref = forward_full(model, x)
    out = forward_full(q, x)
    assert out.shape == ref.shape == (3, model.config["n_classes"], 37, 53)
    assert (out - ref).abs().mean() / ref.abs().mean() < 0.1
    assert q(frames[:1]).shape[0] == 1  # one image (prepacked weights take any batch)
    with pytest.raises(UnetsegError, match="not divisible by 4" if key == "lab" else "does not fit the unpadded U-Net"):
        q(x)  # as the float model, it takes only the sizes the network takes (forward_full pads to them)


@needs_onednn
def test_int8_model_saves_and_loads_unchanged(tmp_path: Path) -> None:
    model, frames = _model("lab_bn")
    q = quantize_model(model, frames)
    path = save_int8(q, tmp_path / "m.int8.pt", extra={"note": "x"})
    payload = torch.load(path, weights_only=True)  # plain tensors and numbers: safe to load
    assert payload["format"] == "unetseg-int8-onednn-1" and payload["note"] == "x"
    assert [c["size"] for c in payload["calibrations"]] == [[32, 48]]
    back = load_int8(path)
    x = frames.float() / 255
    assert torch.equal(back(x), q(x))
    assert back.config == model.config and back.arch == "lab" and back.precision == "int8"
    assert not list(tmp_path.glob("*.tmp*"))

    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(UnetsegError, match="not an int8 model of `unetseg export`"):
        load_int8(tmp_path / "other.pt")
    torch.save({**payload, "calibrations": [{"size": [32]}]}, tmp_path / "partial.pt")
    with pytest.raises(UnetsegError, match="partial.pt: an incomplete int8 model"):
        load_int8(tmp_path / "partial.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(UnetsegError, match="broken.pt: cannot read an int8 model"):
        load_int8(tmp_path / "broken.pt")


@needs_onednn
def test_int8_rejects_what_it_cannot_run() -> None:
    with pytest.raises(UnetsegError, match="takes a unetseg UNet or PaperUNet, not Sequential"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 3, 3)), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), equalize=False)
    model, _ = _model("lab")
    with pytest.raises(UnetsegError, match=r"\(N, C, H, W\) with N >= 1"):
        calibrate_ranges(model, torch.zeros(0, 3, 32, 48, dtype=torch.uint8))


def test_int8_says_what_to_use_where_onednn_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import unetseg.int8 as int8

    monkeypatch.setattr(int8, "onednn_int8_available", lambda: False)
    model, frames = _model("lab")
    with pytest.raises(UnetsegError, match="needs an x86 CPU with VNNI or AMX.*ONNX int8 model of `unetseg export"):
        int8.quantize_model(model, frames)


@needs_onednn
def test_benchmark_times_the_onednn_int8_mode(tmp_path: Path) -> None:
    from unetseg.bench import main
    from unetseg.export import prefer_onednn_int8

    out = tmp_path / "bench.json"
    assert main(["--quick", "--size", "32", "32", "--batch-size", "4", "--filters", "4", "--depth", "2",
                 "--classes", "5", "--threads", "1", "--modes", "fp32,onednn_int8", "--parts", "infer,latency",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    row = r["modes"]["onednn_int8"]
    assert row["precision"] == "int8" and row["infer_images_per_s"] > 0 and row["latency_ms"] > 0
    if prefer_onednn_int8():  # an AMX CPU: exports serve this model, so its figures are the int8 ones
        assert r["int8_mode"] == "onednn_int8" and r["infer_int8_images_per_s"] == row["infer_images_per_s"]
    else:
        assert "infer_int8_images_per_s" not in r  # no onnx_int8 mode in this run
