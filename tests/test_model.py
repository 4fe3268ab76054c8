"""The lab's U-Net and the paper's U-Net: structure, parameter counts, init, sizes, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import unetseg
from unetseg import model as model_module
from unetseg.errors import UnetsegError
from unetseg.model import (
    ConvTranspose2dSame,
    Dropout,
    build_model,
    check_lab_size,
    conv_block,
    count_conv_layers,
    count_parameters,
    fold_batch_norm,
    he_normal_,
    model_from_config,
    output_size,
    paper_output_size,
    unet_model,
    upsampling_block,
    valid_paper_sizes,
)

# Tiny versions of both architectures: the same code paths in milliseconds.
TINY = {
    "lab": dict(base_filters=4, depth=2, n_classes=5, in_channels=3),
    "paper": dict(base_filters=4, depth=2, n_classes=5, in_channels=3),
}
TINY_SIZE = {"lab": (32, 48), "paper": (44, 60)}


@pytest.fixture(params=["lab", "paper"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def _params(m: nn.Module) -> list[int]:
    return [p.numel() for p in m.parameters()]


def test_lab_model_total_parameters() -> None:
    assert count_parameters(unet_model()) == 8_640_471
    assert count_parameters(unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23)) == 8_640_471


def test_conv_block_parameters_match_lab_tables() -> None:
    # Block 1 of the lab's test: 96x128x3, 32 filters -> 896, 9248 (weights + biases).
    b1 = conv_block(3, 32)
    convs = [m for m in b1.modules() if isinstance(m, nn.Conv2d)]
    assert [count_parameters(c) for c in convs] == [896, 9248]
    # Block 2: 1024 filters, dropout 0.1 -> 28672, 9438208.
    b2 = conv_block(3, 1024, dropout_prob=0.1)
    assert [count_parameters(c) for c in b2.modules() if isinstance(c, nn.Conv2d)] == [28672, 9438208]
    assert b2.dropout.p == pytest.approx(0.1)


def test_upsampling_block_parameters_match_lab_table() -> None:
    up = upsampling_block(256, 128, 32)
    layers = [m for m in up.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [count_parameters(m) for m in layers] == [73760, 46112, 9248]
    out = up(torch.zeros(1, 256, 12, 16), torch.zeros(1, 128, 24, 32))
    assert out.shape == (1, 32, 24, 32)


def test_conv_block_returns_next_and_skip_as_the_lab_defines() -> None:
    torch.manual_seed(0)
    block = conv_block(3, 8, dropout_prob=0.5, max_pooling=True).train()
    x = torch.randn(2, 3, 16, 16)
    nxt, skip = block(x)
    assert skip.shape == (2, 8, 16, 16) and nxt.shape == (2, 8, 8, 8)
    # The skip is taken after dropout (zeros where dropped), and next is the pooled skip.
    assert (skip == 0).float().mean() > 0.3
    assert torch.equal(nxt, nn.functional.max_pool2d(skip, 2))
    no_pool = conv_block(3, 8, max_pooling=False)
    a, b = no_pool(x)
    assert a is b


def test_lab_model_wiring() -> None:
    net = unet_model()
    filters = [blk.convs[0].out_channels for blk in net.encoder]
    assert filters == [32, 64, 128, 256, 512]
    assert [blk.dropout.p if blk.dropout else 0.0 for blk in net.encoder] == [0, 0, 0, 0.3, 0.3]
    assert [blk.pool is not None for blk in net.encoder] == [True, True, True, True, False]
    assert [blk.up.out_channels for blk in net.decoder] == [256, 128, 64, 32]
    assert net.conv9.kernel_size == (3, 3) and net.conv10.kernel_size == (1, 1)
    assert net.conv10.out_channels == 23
    assert net(torch.zeros(1, 3, 96, 128)).shape == (1, 23, 96, 128)


def test_concatenation_order_is_up_then_skip() -> None:
    up = upsampling_block(4, 3, 2)
    seen = {}
    up.merge.register_forward_hook(lambda m, i, o: seen.update(out=o))
    e, s = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 8, 8)
    up(e, s)
    assert torch.equal(seen["out"][:, 2:], s)  # the skip comes second
    assert torch.equal(seen["out"][:, :2], up.up(e))


def test_transposed_conv_matches_tensorflow_same_alignment() -> None:
    # TF 'same' for k=3, s=2: out[o] gathers in[i] through tap k where o = 2i + k.
    t = ConvTranspose2dSame(1, 1, 3)
    with torch.no_grad():
        t.weight.zero_()
        t.bias.zero_()
        t.weight[0, 0, 0, 0] = 1.0  # tap (0, 0)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    y = t(x)
    assert y.shape == (1, 1, 6, 6)
    assert y[0, 0, 2, 2] == 1.0 and y.abs().sum() == 1.0  # o = 2*1 + 0


def _reference_transposed_conv(t: ConvTranspose2dSame, x: torch.Tensor) -> torch.Tensor:
    """The op through autograd's own backward (what ``ConvTranspose2dSame`` does off CPU / in inference)."""
    h, w = x.shape[-2:]
    return nn.functional.conv_transpose2d(x, t.weight, t.bias, stride=2, output_padding=1)[..., : 2 * h, : 2 * w]


@pytest.fixture(params=["taps", "onednn"])
def wgrad(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the CPU backward computes the weight gradient (``model.wgrad_onednn_min_taps_bytes``)."""
    limit = 0.0 if request.param == "onednn" else math.inf
    monkeypatch.setattr(model_module, "wgrad_onednn_min_taps_bytes", lambda: limit)
    return request.param


@pytest.mark.parametrize("channels_last", [False, True])
def test_transposed_conv_cpu_backward_equals_autograd(channels_last: bool, wgrad: str) -> None:
    torch.manual_seed(0)
    t = ConvTranspose2dSame(6, 4).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for fn in (t, lambda v: _reference_transposed_conv(t, v)):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        grads.append((y.detach(), *torch.autograd.grad(y, (xi, t.weight, t.bias), g)))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda v, w, b: model_module._TransposedConvSameCPU.apply(v, w, b),
        (x[:1, :, :3, :4].clone().requires_grad_(True), t.weight.detach().clone().requires_grad_(True),
         t.bias.detach().clone().requires_grad_(True)),
    )


def test_transposed_conv_cpu_backward_under_bf16_autocast(wgrad: str) -> None:
    torch.manual_seed(0)
    t = ConvTranspose2dSame(32, 16)
    x = torch.randn(4, 32, 6, 8).contiguous(memory_format=torch.channels_last)
    results = []
    for fn in (t, lambda v: _reference_transposed_conv(t, v)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            y = fn(xi)
        assert y.dtype == torch.bfloat16
        gx, gw, gb = torch.autograd.grad(y.float().square().sum(), (xi, t.weight, t.bias))
        assert gx.dtype == gw.dtype == torch.float32  # flows back through autocast's casts to the fp32 leaves
        results.append((y.float(), gx, gw, gb))
    for ours, ref in zip(*results, strict=True):  # bf16 outputs: equal up to the accumulation order
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_dropout_keeps_the_rate_and_scale_and_masks_the_gradient() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(200, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows exactly where the value was kept
    drop.eval()
    assert torch.equal(drop(x), x)
    assert isinstance(unet_model().encoder[-1].dropout, Dropout)  # the lab's dropout 0.3 blocks use it


@pytest.mark.parametrize("shape", [(64, 27, 3, 3), (256, 128, 3, 3), (512, 512, 3, 3)])
def test_he_normal_statistics(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w = he_normal_(torch.empty(shape))
    fan_in = shape[1] * shape[2] * shape[3]
    target = math.sqrt(2.0 / fan_in)
    assert w.std().item() == pytest.approx(target, rel=0.03)
    assert abs(w.mean().item()) < 0.05 * target
    # Truncated at two (pre-correction) standard deviations, as Keras does.
    assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-7
    assert w.abs().max().item() > 1.8 * target


def test_model_init_he_normal_and_zero_bias() -> None:
    torch.manual_seed(1)
    net = unet_model()
    conv = net.encoder[3].convs[2]  # 256 -> 256, fan_in 2304
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.02)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            assert torch.count_nonzero(m.bias) == 0
    # conv10 has no kernel_initializer in the lab, so it is Keras' default Glorot-uniform.
    w = net.conv10.weight
    limit = math.sqrt(6 / (32 + 23))
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit


@pytest.mark.parametrize("hw", [(96, 128), (16, 16), (240, 320), (48, 176)])
def test_lab_accepts_sizes_divisible_by_16(hw: tuple[int, int]) -> None:
    net = build_model("lab", base_filters=2, n_classes=3)
    assert net(torch.zeros(1, 3, *hw)).shape == (1, 3, *hw)


@pytest.mark.parametrize(
    "hw, message",
    [((100, 128), "height 100 is not divisible by 16; use 96 or 112"),
     ((96, 130), "width 130 is not divisible by 16; use 128 or 144")],
)
def test_lab_rejects_other_sizes_naming_the_nearest(hw: tuple[int, int], message: str) -> None:
    net = build_model("lab", base_filters=2, n_classes=3)
    with pytest.raises(UnetsegError) as e:
        net(torch.zeros(1, 3, *hw))
    text = str(e.value)
    for part in message.split("; "):
        assert part.split(" is")[0] in text and part.split("; ")[-1].split(" ", 1)[-1] in text
    with pytest.raises(UnetsegError, match="use 96 or 112"):
        unet_model(input_size=(100, 128, 3))


def test_paper_unet_572_gives_388_and_23_convs() -> None:
    net = build_model("paper")
    assert count_conv_layers(net) == 23
    assert net.encoder[0].convs[0].in_channels == 1 and net.encoder[0].convs[0].out_channels == 64
    assert paper_output_size(572) == 388
    assert output_size(net, 572, 572) == (388, 388)
    assert all(m.padding == (0, 0) for m in net.modules() if isinstance(m, nn.Conv2d))
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [u.kernel_size for u in ups] == [(2, 2)] * 4


def test_paper_valid_sizes_helper() -> None:
    assert 572 in valid_paper_sizes(572)
    assert valid_paper_sizes(570, count=1) == [556, 572]
    with pytest.raises(UnetsegError, match="use 556 .* or 572 .*388"):
        paper_output_size(570)


def test_lab_size_error_has_no_smaller_option_below_16() -> None:
    with pytest.raises(UnetsegError, match="use 16$"):
        check_lab_size(8, 16)


def test_build_model_rejects_unknown_arch_and_options() -> None:
    with pytest.raises(UnetsegError, match="unknown architecture"):
        build_model("resnet")
    with pytest.raises(UnetsegError, match="bad model option"):
        build_model("lab", wings=2)


def test_batch_norm_option(arch: str) -> None:
    net = build_model(arch, batch_norm=True, **TINY[arch])
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model(arch, **TINY[arch]).modules())


def test_fold_batch_norm_gives_the_plain_network_with_the_same_outputs(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(arch, batch_norm=True, **TINY[arch])
    with torch.no_grad():  # statistics of its own, far from the identity, so that folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.3, 3)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    net.eval()
    folded = fold_batch_norm(net)
    plain = build_model(arch, **TINY[arch])
    assert folded.config == plain.config and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert _params(folded) == _params(plain)
    x = torch.rand(2, 3, *TINY_SIZE[arch])
    with torch.no_grad():
        expected, got = net(x), folded(x)
    assert (expected - got).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the trained model is left as it was
    assert fold_batch_norm(plain) is plain


def test_forward_backward_tiny_batch(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(arch, **TINY[arch])
    h, w = TINY_SIZE[arch]
    x = torch.randn(2, 3, h, w)
    logits = net(x)
    oh, ow = output_size(net, h, w)
    assert logits.shape == (2, 5, oh, ow)
    target = torch.randint(0, 5, (2, oh, ow))
    loss = nn.functional.cross_entropy(logits, target)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_model_config_roundtrip(arch: str) -> None:
    net = build_model(arch, **TINY[arch])
    again = model_from_config(net.config)
    assert _params(again) == _params(net)
    again.load_state_dict(net.state_dict())


def test_public_api_exports() -> None:
    assert unetseg.unet_model is unet_model
    assert count_parameters(unetseg.build_model("lab")) == 8_640_471
