"""The exact activation rescaling that makes a trained U-Net's tensors fit per-tensor int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from unetseg.equalize import equalize_activations
from unetseg.errors import UnetsegError
from unetseg.model import Concatenate, build_model

# (arch, input side, options): the lab U-Net with and without batch norm, and the paper's unpadded one.
MODELS = [("lab", 32, {}), ("lab", 32, {"batch_norm": True}), ("paper", 188, {})]


def _model(arch: str, side: int, options: dict) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = build_model(arch, base_filters=4, depth=2, n_classes=5, in_channels=3, **options)
    if options.get("batch_norm"):  # running statistics that are not the identity
        net.train()
        with torch.no_grad():
            net(torch.rand(4, 3, side, side) * 2)
    return net.eval(), torch.rand(4, 3, side, side)


def _concat_channel_maxima(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per concatenation, the channel maxima of |up| and of |skip| as they enter it."""
    maxima: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, i, _o: maxima.append(tuple(t.abs().amax((0, 2, 3)) for t in i)))
             for m in net.modules() if isinstance(m, Concatenate)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return maxima


@pytest.mark.parametrize("arch,side,options", MODELS, ids=["lab", "lab-bn", "paper"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_equalized_model_computes_the_same_logits(arch: str, side: int, options: dict, strength: float) -> None:
    net, x = _model(arch, side, options)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    eq = equalize_activations(net, x, strength=strength)
    with torch.no_grad():
        ref, out = net(x), eq(x)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(eq.state_dict().values(), before.values(), strict=True))
    for k, v in net.state_dict().items():  # the source model is left alone
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch,side,options", MODELS, ids=["lab", "lab-bn", "paper"])
def test_full_strength_gives_every_concatenated_channel_one_max(arch: str, side: int, options: dict) -> None:
    net, x = _model(arch, side, options)
    before = [torch.cat(pair) for pair in _concat_channel_maxima(net, x)]
    assert max((m[m > 0].max() / m[m > 0].min()).item() for m in before) > 2  # not even to begin with
    eq = equalize_activations(net, x, strength=1.0)
    for up, skip in _concat_channel_maxima(eq, x):
        top = torch.cat([up, skip]).max().item()
        live_up, live_skip = up[up > 1e-6 * top], skip[skip > 1e-6 * top]
        torch.testing.assert_close(live_up, torch.full_like(live_up, top), rtol=1e-4, atol=0)
        if arch == "paper":  # its skips are cropped before the concatenation: maxima of the whole tensor
            assert (live_skip <= top * (1 + 1e-4)).all()
        else:
            torch.testing.assert_close(live_skip, torch.full_like(live_skip, top), rtol=1e-4, atol=0)


def test_strength_zero_changes_nothing() -> None:
    net, x = _model("lab", 32, {})
    eq = equalize_activations(net, x, strength=0.0)
    for a, b in zip(eq.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_equalize_rejects_bad_input() -> None:
    net, x = _model("lab", 32, {})
    with pytest.raises(UnetsegError, match="strength"):
        equalize_activations(net, x, strength=1.5)
    with pytest.raises(UnetsegError, match=r"\(N, C, H, W\)"):
        equalize_activations(net, x[0])
    with pytest.raises(UnetsegError, match="lab and paper U-Nets"):
        equalize_activations(nn.Sequential(nn.Conv2d(3, 3, 1)), x)


def test_equalizing_rescues_int8_from_a_skewed_concatenation(tmp_path: Path) -> None:
    """The failure seen on the shipped recipe's checkpoint, built on purpose: the up-conv's output made
    300x larger than the skip it is concatenated with (and the next conv's weights 300x smaller, so the
    float model is unchanged). One int8 scale for the concatenation then wipes out the skip; after
    equalizing, the int8 logits are as close to fp32 as for an unskewed model."""
    pytest.importorskip("onnxruntime")
    from unetseg.export import OnnxPredictor, export_onnx, quantize_int8

    net, _ = _model("lab", 32, {})
    block = net.decoder[-1]
    with torch.no_grad():
        block.up.weight.mul_(300)
        block.up.bias.mul_(300)
        block.convs[0].weight[:, : block.up.out_channels].div_(300)
    frames = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = frames.float() / 255
    with torch.no_grad():
        ref = net(x)

    def int8_error(model: nn.Module, name: str) -> float:
        path = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(32, 32))
        q = quantize_int8(path, frames, tmp_path / f"{name}.int8.onnx", check_frames=0)
        return ((OnnxPredictor(q, threads=1)(x) - ref).abs().mean() / ref.abs().mean()).item()

    skewed, equalized = int8_error(net, "skewed"), int8_error(equalize_activations(net, frames), "equalized")
    assert equalized < skewed / 2, (equalized, skewed)
