"""Deep supervision: class heads on the decoder's inner stages, used while training only.

Lee et al. (2015, "Deeply-supervised nets") give hidden layers a classifier of their own so that each
gets a direct training signal; for U-Nets the classifiers sit on the decoder's coarser stages (as in
UNet++, Zhou et al. 2018). Here every decoder stage but the last (which feeds the network's own head)
gets a 1x1 conv to class logits. Those logits are upsampled bilinearly by the stage's stride to the
output's resolution, centre-cropped to the output for the paper U-Net (whose output is smaller than the
stage it is computed from), and scored with the run's own loss against the full-resolution labels; the
run's loss becomes ``main + weight * mean(auxiliary losses)`` (``deep_supervision: weight``).

The heads live beside the model, not in it: they read the decoder stages through forward hooks, so the
checkpoint's ``model``, evaluation, prediction and export are the unchanged network (the lab's 8,640,471
parameters). The optimizer trains them with the model, and ``last.pt`` keeps them for ``--resume``.
Features are kept only from forwards that train (module in training mode, gradients on): validation and
the weight average's forwards pass untouched.

Example:
    >>> import torch
    >>> from unetseg.model import build_model
    >>> from unetseg.deep_supervision import DeepSupervision
    >>> model = build_model("lab", n_classes=5, base_filters=4, depth=3)
    >>> heads = DeepSupervision(model, n_classes=5)
    >>> logits = model(torch.rand(2, 3, 32, 48))              # (2, 5, 32, 48)
    >>> [tuple(a.shape) for a in heads.pop_logits(tuple(logits.shape[-2:]))]   # strides 4 and 2
    [(2, 5, 32, 48), (2, 5, 32, 48)]
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnetsegError
from .model import crop_like

__all__ = ["DeepSupervision"]


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UnetsegError(f"deep supervision: decoder stage {type(stage).__name__} has no conv to read")
    return convs[-1].out_channels


class DeepSupervision(nn.Module):
    """1x1 class heads on ``model.decoder[:-1]`` (the lab and paper U-Nets both name their stages so).

    ``model`` must have at least two decoder stages (``depth`` >= 2). Its forward hooks keep the stages'
    outputs; :meth:`pop_logits` turns them into logits ``(N, n_classes, H', W')`` at the output's size.
    """

    def __init__(self, model: nn.Module, n_classes: int) -> None:
        super().__init__()
        decoder = getattr(model, "decoder", None)
        if decoder is None or len(decoder) < 2:
            raise UnetsegError("deep_supervision needs a U-Net with depth >= 2 (one decoder stage besides the "
                               "last); use depth: 2 or more, or deep_supervision: 0")
        stages = list(decoder)[:-1]
        # Stage i (of len(decoder)) sits 2**(len(decoder) - 1 - i) below the output's resolution.
        self.strides = [2 ** (len(decoder) - 1 - i) for i in range(len(stages))]
        self.heads = nn.ModuleList(nn.Conv2d(_out_channels(s), n_classes, 1) for s in stages)
        for head in self.heads:  # initialised as the network's own 1x1 head (conv10): Glorot-uniform, zero bias
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        self._features: list[torch.Tensor | None] = [None] * len(stages)
        self._hooks = [s.register_forward_hook(functools.partial(self._keep, i)) for i, s in enumerate(stages)]

    def _keep(self, i: int, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._features[i] = output

    def pop_logits(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """Each head's logits ``(N, n_classes, *size)`` from the last training forward; forgets its features.

        ``size`` is the network output's ``(H', W')``. Call it inside the same autocast as the forward.
        """
        if any(f is None for f in self._features):
            raise UnetsegError("deep supervision: no decoder features kept; run the model in training mode "
                               "with gradients on before pop_logits")
        features, self._features = self._features, [None] * len(self._features)
        out = []
        for feature, head, stride in zip(features, self.heads, self.strides, strict=True):
            logits = head(feature)
            if stride > 1:
                logits = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)
            out.append(crop_like(logits, size))
        return out

    def remove_hooks(self) -> None:
        """Detach the heads from the model (they stop seeing its forwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
