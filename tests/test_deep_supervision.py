"""Deep supervision: training-only heads on the decoder's inner stages, for both architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN

from unetseg.checkpoint import load_checkpoint
from unetseg.deep_supervision import DeepSupervision
from unetseg.errors import UnetsegError
from unetseg.losses import make_loss
from unetseg.model import build_model, count_parameters, model_from_checkpoint, output_size
from unetseg.train import train, train_step

CPU = torch.device("cpu")
# Small networks and their smallest convenient inputs: the paper U-Net at depth 2 takes 44 -> 4.
ARCHS = {
    "lab": (dict(base_filters=4, depth=3), (32, 48)),
    "paper": (dict(base_filters=4, depth=2), (60, 76)),
}


def _model(arch: str, n_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)  # no dropout: two forwards of the same weights are the same function
    return build_model(arch, in_channels=3, n_classes=n_classes, dropout=0.0, **ARCHS[arch][0])


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_give_logits_at_the_output_size_one_per_inner_stage(arch: str) -> None:
    model = _model(arch)
    n_params = count_parameters(model)
    keys = set(model.state_dict())
    heads = DeepSupervision(model, n_classes=5)
    assert len(heads.heads) == model.depth - 1
    logits = model.train()(torch.rand(2, 3, *ARCHS[arch][1]))
    aux = heads.pop_logits(tuple(logits.shape[-2:]))
    assert [a.shape for a in aux] == [logits.shape] * (model.depth - 1)
    # The heads are not part of the network that checkpoints hold and serve.
    assert count_parameters(model) == n_params and set(model.state_dict()) == keys


@pytest.mark.parametrize("arch", ARCHS)
def test_auxiliary_loss_trains_the_stages_below_the_heads_only(arch: str) -> None:
    model = _model(arch)
    heads = DeepSupervision(model, n_classes=5)
    x = torch.rand(2, 3, *ARCHS[arch][1])
    logits = model.train()(x)
    y = torch.randint(0, 5, (2, *logits.shape[-2:]))
    sum(F.cross_entropy(a, y) for a in heads.pop_logits(tuple(logits.shape[-2:]))).backward()
    own_head = model.conv10 if arch == "lab" else model.head
    last_stage = model.decoder[-1]
    assert all(p.grad is None for p in [*own_head.parameters(), *last_stage.parameters()])
    for stage in (model.encoder[0], model.decoder[0]):  # reached through the hooked stages
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


def test_lab_heads_upsample_each_stage_by_its_stride() -> None:
    model = _model("lab")
    heads = DeepSupervision(model, n_classes=5)
    kept: list[torch.Tensor] = []
    hooks = [s.register_forward_hook(lambda m, i, o: kept.append(o.detach())) for s in model.decoder[:-1]]
    logits = model.train()(torch.rand(1, 3, 32, 48))
    for h in hooks:
        h.remove()
    aux = heads.pop_logits(tuple(logits.shape[-2:]))
    assert [tuple(f.shape[-2:]) for f in kept] == [(8, 12), (16, 24)]
    for feature, head, got in zip(kept, heads.heads, aux, strict=True):
        expected = F.interpolate(head(feature), size=(32, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got, expected)


def test_features_are_kept_only_from_training_forwards() -> None:
    model = _model("lab")
    heads = DeepSupervision(model, n_classes=5)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    with pytest.raises(UnetsegError, match="no decoder features kept"):
        heads.pop_logits((32, 48))
    model.train()(x)
    heads.pop_logits((32, 48))
    with pytest.raises(UnetsegError, match="no decoder features kept"):  # each forward's features are used once
        heads.pop_logits((32, 48))
    heads.remove_hooks()
    model.train()(x)
    with pytest.raises(UnetsegError, match="no decoder features kept"):
        heads.pop_logits((32, 48))


def test_one_stage_decoder_is_refused() -> None:
    with pytest.raises(UnetsegError, match="depth >= 2"):
        DeepSupervision(build_model("lab", n_classes=3, base_filters=4, depth=1), n_classes=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_adds_the_weighted_auxiliary_loss_and_reports_the_networks_own(arch: str) -> None:
    x = torch.rand(2, 3, *ARCHS[arch][1])
    y = torch.randint(0, 5, (2, *output_size(_model(arch), *ARCHS[arch][1])))
    loss_fn = make_loss("ce+dice", 5)
    results = {}
    for weight in (None, 0.0, 0.5):
        model = _model(arch)
        heads = None if weight is None else DeepSupervision(model, n_classes=5)
        params = [*model.parameters(), *(heads.parameters() if heads is not None else ())]
        opt = torch.optim.SGD(params, lr=0.1)
        loss, _, _ = train_step(model, opt, x, y, "fp32", CPU, loss_fn, aux=heads, aux_weight=weight or 0.0)
        results[weight] = (loss, [p.detach().clone() for p in model.parameters()])
    # The same reported loss (the network's own) whatever the weight: the auxiliary term is added to what
    # is minimised, not to what is reported.
    assert results[None][0] == results[0.0][0] == results[0.5][0]
    # Weight 0 trains the network exactly as without heads; weight 0.5 changes the step.
    assert all(torch.equal(a, b) for a, b in zip(results[None][1], results[0.0][1], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(results[None][1], results[0.5][1], strict=True))


@pytest.mark.slow
def test_deep_supervision_run_serves_the_plain_network(scenes: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    train(**{**TINY_TRAIN, "deep_supervision": 0.4, "ema": 0.9}, data=str(scenes), out=str(out))
    assert "deep supervision: 1 training-only head (" in capsys.readouterr().out
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert "aux_heads" not in best and "aux_heads" in last  # resuming needs them, serving does not
    assert len(last["aux_heads"]) == 2  # one head (weight, bias) on the one inner stage of a depth-2 U-Net
    served = model_from_checkpoint(best)
    assert count_parameters(served) == count_parameters(build_model("lab", base_filters=8, depth=2))
