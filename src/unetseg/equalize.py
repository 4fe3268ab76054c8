"""Exact rescaling of a trained U-Net's activations so that per-tensor int8 can hold them.

Static int8 (``export.quantize_int8``) gives each activation tensor one uint8 scale. A trained U-Net's
decoder strains that in two ways (measured on 16 training frames of a default-recipe checkpoint, run
``s7d0`` of BENCHMARKS.md, session 7):

* **Concatenation.** ``cat([up, skip])`` joins the transposed conv's output with an encoder ReLU output
  of a much smaller range (max 47.9 against 5.0 at the 1/4 level, 3-10x at the four levels): one scale
  for both leaves the skip on a few dozen of the 256 levels.
* **Channels.** Within one tensor, channel maxima differ widely (a decoder ReLU output's top channel
  reaches 92.6 where the median channel's max is 2.45; 3-38x across the decoder).

Both are fixed without changing what the network computes: ReLU, max-pooling and dropout commute with
a positive per-channel scale, so dividing the output channel ``c`` of the layer that produces a tensor
(conv weight and bias, or batch-norm affine) by ``s_c`` and multiplying the input channel ``c`` of every
layer that reads it by ``s_c`` leaves the logits unchanged (to float rounding), while the tensor's
channel ``c`` now peaks at ``max_c / s_c``. ``equalize_activations`` picks
``s_c = (max_c / M) ** strength`` with ``M`` the largest channel max among the tensors that one
concatenation joins (or of the tensor itself): ``strength=1`` (the default) gives every channel the same
max, ``0.5`` meets halfway, which leaves the consumer's per-output-channel int8 weights less uneven (the
scale moves from the activations into those weights; Nagel et al. 2019, "Data-free quantization",
balance the two the same way). On that checkpoint int8 lost 2.39 mIoU points as exported, 0.21-0.25
after equalizing at strength 1 (MinMax, percentile or entropy calibration) and 0.28 at 0.5 (percentile;
``experiments/int8_variants.py``).

Example:
    >>> import torch
    >>> from unetseg.model import build_model
    >>> from unetseg.equalize import equalize_activations
    >>> net = build_model("lab", base_filters=4, depth=2, n_classes=5).eval()
    >>> frames = torch.rand(4, 3, 32, 32)
    >>> eq = equalize_activations(net, frames)
    >>> torch.allclose(eq(frames), net(frames), atol=1e-4)
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnetsegError

__all__ = ["equalize_activations"]


@dataclass
class _Link:
    """One activation tensor: the module whose output it is, the layer whose output channels scale it,
    and ``(layer, first input channel)`` for every layer that reads it."""

    source: nn.Module
    producer: nn.Module
    consumers: list[tuple[nn.Module, int]] = field(default_factory=list)
    group: int = -1


def _relu_links(convs: nn.Sequential) -> list[_Link]:
    """The two ReLU outputs of a double conv (``conv, [bn], relu, conv, [bn], relu``), the first read by
    the second conv."""
    layers = list(convs)
    relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    second_conv = next(m for m in layers[relus[0] :] if isinstance(m, nn.Conv2d))
    inner = _Link(layers[relus[0]], layers[relus[0] - 1], [(second_conv, 0)])
    return [inner, _Link(layers[relus[1]], layers[relus[1] - 1])]


def _first_conv(convs: nn.Sequential) -> nn.Conv2d:
    return next(m for m in convs if isinstance(m, nn.Conv2d))


def _unet_links(model: nn.Module) -> list[_Link]:
    """Every rescalable activation of ``UNet`` (lab) or ``PaperUNet``, with concatenation groups."""
    arch = getattr(model, "arch", None)
    if arch == "lab":
        ups = [b.up for b in model.decoder]
        decoder_convs = [b.convs for b in model.decoder]
        last, last_relu_reader = model.conv9, [(model.conv10, 0)]
    elif arch == "paper":
        ups, decoder_convs = list(model.ups), list(model.decoder)
        last, last_relu_reader = model.head, []
    else:
        raise UnetsegError(f"equalize_activations supports the lab and paper U-Nets, not {type(model).__name__}")
    encoder = list(model.encoder)
    depth = len(ups)
    links: list[_Link] = []
    outputs: list[_Link] = []
    for block in encoder:
        inner, out = _relu_links(block.convs)
        links += [inner, out]
        outputs.append(out)
    for i, out in enumerate(outputs[:-1]):  # each encoder output feeds the next block (through the pool)
        out.consumers.append((_first_conv(encoder[i + 1].convs), 0))
    outputs[-1].consumers.append((ups[0], 0))  # the bottleneck feeds the first up-conv
    group = 0
    for j, (up, convs) in enumerate(zip(ups, decoder_convs, strict=True)):
        skip = outputs[depth - 1 - j]
        first = _first_conv(convs)
        up_link = _Link(up, up, [(first, 0)], group=group)
        skip.consumers.append((first, up.out_channels))  # cat([up, skip]): the skip's channels come second
        skip.group = group
        group += 1
        inner, out = _relu_links(convs)
        out.consumers.append((ups[j + 1], 0) if j + 1 < depth else (last, 0))
        links += [up_link, inner, out]
    if arch == "lab":
        links.append(_Link(model.relu9, model.conv9, last_relu_reader))
    for link in links:
        if link.group < 0:
            link.group, group = group, group + 1
    return links


def _scale_producer(layer: nn.Module, s: torch.Tensor) -> None:
    """Divide ``layer``'s output channels by ``s``."""
    if isinstance(layer, nn.ConvTranspose2d):  # weight (in, out, kh, kw)
        layer.weight.div_(s.view(1, -1, 1, 1))
    elif isinstance(layer, nn.Conv2d):  # weight (out, in, kh, kw)
        layer.weight.div_(s.view(-1, 1, 1, 1))
    elif isinstance(layer, nn.BatchNorm2d):
        layer.weight.div_(s)
    else:
        raise UnetsegError(f"cannot rescale the output of {type(layer).__name__}")
    if layer.bias is not None:
        layer.bias.div_(s)


def _scale_consumer(layer: nn.Module, first: int, s: torch.Tensor) -> None:
    """Multiply ``layer``'s input channels ``first .. first + len(s)`` by ``s``."""
    sl = slice(first, first + len(s))
    if isinstance(layer, nn.ConvTranspose2d):
        layer.weight[sl].mul_(s.view(-1, 1, 1, 1))
    else:
        layer.weight[:, sl].mul_(s.view(1, -1, 1, 1))


@torch.no_grad()
def equalize_activations(
    model: nn.Module, frames: torch.Tensor, strength: float = 1.0, batch_size: int = 8
) -> nn.Module:
    """A rescaled copy of a lab or paper U-Net with the same logits and more even activation ranges.

    Args:
        model: a trained ``UNet`` or ``PaperUNet`` (left unchanged).
        frames: calibration images ``(N, C, H, W)``, uint8 (scaled by 1/255 here) or float in ``[0, 1]``.
        strength: 0 changes nothing, 1 gives every channel of a tensor (and of the tensors one
            concatenation joins) the same max on ``frames``; in between meets halfway on a log scale.
        batch_size: frames per forward pass while measuring.

    Returns:
        the copy, in eval mode; its outputs match ``model``'s to float rounding (~1e-5 relative).
    """
    if not 0 <= strength <= 1:
        raise UnetsegError(f"strength {strength} must be between 0 and 1")
    if frames.ndim != 4 or len(frames) == 0:
        raise UnetsegError(f"frames must be (N, C, H, W) with N >= 1, got shape {tuple(frames.shape)}")
    model = copy.deepcopy(model).eval().float()
    links = _unet_links(model)
    maxima: dict[int, torch.Tensor] = {}

    def record(k: int):  # noqa: ANN202 - a forward hook
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            m = out.detach().abs().amax((0, 2, 3)).float()
            maxima[k] = torch.maximum(maxima[k], m) if k in maxima else m

        return hook

    handles = [link.source.register_forward_hook(record(k)) for k, link in enumerate(links)]
    try:
        for i in range(0, len(frames), batch_size):
            x = frames[i : i + batch_size]
            model(x.float() / 255 if x.dtype == torch.uint8 else x.float())
    finally:
        for h in handles:
            h.remove()
    group_max: dict[int, float] = {}
    for k, link in enumerate(links):
        group_max[link.group] = max(group_max.get(link.group, 0.0), maxima[k].max().item())
    for k, link in enumerate(links):
        top = group_max[link.group]
        cmax = maxima[k]
        # Dead channels (max 0) keep scale 1; the floor keeps weights of near-dead ones finite.
        s = torch.where(cmax > 0, (cmax / max(top, 1e-12)).clamp_min(1e-3) ** strength, torch.ones_like(cmax))
        _scale_producer(link.producer, s)
        for layer, first in link.consumers:
            _scale_consumer(layer, first, s)
    return model
