"""The benchmark command and the fast paths it measures (runtime's inference model, compile decisions).

Everything runs on tiny models (4 base filters, depth 2) at 32x32 so the file takes seconds; the
compiled paths, which spend tens of seconds in inductor, are marked slow.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unetseg.bench import (
    ALL_MODES,
    Subject,
    add_arguments,
    count_flops,
    interleaved_medians,
    main,
    peak_reference,
    run_benchmark,
)
from unetseg.errors import UnetsegError
from unetseg.model import ConvTranspose2dSame, build_model, unet_model
from unetseg.runtime import (
    InferenceModel,
    compile_available,
    compile_pays_off,
    cpu_has_native_bf16,
    flush_denormals,
    prepare_model_for_inference,
    resolve_compile,
)

TINY = dict(base_filters=4, depth=2, n_classes=5)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and on a busy machine OpenMP's barriers make a
    # two-thread step of a tiny model up to 50x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lab_model_flops_match_the_issue() -> None:
    # 5.02 GFLOP per 96x128 image forward: the figure the speed targets are stated in.
    with torch.device("meta"):  # no weight init: instant
        net = unet_model()
    assert count_flops(net, (96, 128)) / 1e9 == pytest.approx(5.022, abs=0.001)


def test_fast_transposed_conv_equals_pytorchs_in_value_and_gradient() -> None:
    # model.ConvTranspose2dSame computes pad + 2x2 conv + pixel shuffle for speed; it must be the same
    # function of the same parameters as the cropped native transposed conv, gradients included.
    torch.manual_seed(0)
    t = ConvTranspose2dSame(6, 4)
    nn.init.normal_(t.bias)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    ref = nn.ConvTranspose2d.forward(t, x)[..., :10, :14]
    out = t(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, t.weight, t.bias), g),
                    torch.autograd.grad(ref, (x, t.weight, t.bias), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [n for n, _ in t.named_parameters()] == ["weight", "bias"] and t.weight.shape == (6, 4, 3, 3)


def _trained_tiny(steps: int = 300) -> tuple[nn.Module, torch.Tensor]:
    """A tiny lab U-Net trained for a few seconds to label pixels by colour: "trained-ish" weights.

    Random weights give logits that nearly tie everywhere, which no real model has; 300 Adam steps (~2 s)
    on a colour -> class task give the confident, spatially coherent logits of a trained network (> 95 %
    pixel accuracy on fresh frames; errors and near-ties remain along the block edges). A network this
    small without normalisation sometimes loses its ReLUs early (about 1 initialisation in 6 here), so
    the next seed is tried until one learns.
    """
    palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9], [0.1, 0.1, 0.1], [0.9, 0.9, 0.8]])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the weight init: the same trained model whichever test asks first
        net = build_model("lab", **TINY)

        def batch(n: int, g: torch.Generator = g) -> tuple[torch.Tensor, torch.Tensor]:
            # 8x8 blocks, each one of five colours (its class), plus a little noise
            y = F.interpolate(torch.randint(0, 5, (n, 1, 4, 4), generator=g).float(), scale_factor=8).long()[:, 0]
            x = palette[y].permute(0, 3, 1, 2) + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
            return x.clamp(0, 1), y

        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(steps):
            x, y = batch(8)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, y = batch(16)
        with torch.no_grad():
            if (net.eval()(x).argmax(1) == y).float().mean() > 0.95:  # it did learn the task
                return net, x
    raise AssertionError("no initialisation learned the colour task")


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is chosen only on CPUs with native bf16")
def test_bf16_inference_agrees_with_fp32_eager() -> None:
    # The fast path predict/evaluate use: >= 99.9 % of pixels get the same class as fp32 eager.
    torch.manual_seed(0)
    net, x = _trained_tiny()
    with torch.no_grad():
        ref = net(x).argmax(1)
    fast = prepare_model_for_inference(net, "bf16", CPU)
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == (16, 5, 32, 32)
    agreement = (out.argmax(1) == ref).float().mean().item()
    assert agreement >= 0.999, agreement


def test_fp32_inference_model_matches_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    net = build_model("lab", **TINY).train()
    before = copy.deepcopy(net.state_dict())
    fast = prepare_model_for_inference(net, "fp32", CPU)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = net.eval()(x)
    net.train()
    torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert fast.arch == "lab" and fast.depth == 2  # so train.forward_full can take it in the model's place


@pytest.mark.parametrize("arch", ["lab", "paper"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_model_fuses_conv_relu_with_identical_outputs(arch: str, precision: str) -> None:
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    torch.manual_seed(0)
    net = build_model(arch, **TINY).eval()
    size = 32 if arch == "lab" else 44  # the paper U-Net's output of a 44x44 input is 4x4
    x = torch.rand(2, net.config["in_channels"], size, size)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    plain = copy.deepcopy(net).to(dtype=dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = plain(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()
    fast = InferenceModel(net, precision, CPU)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert fast.fused_conv_relu == n_convs - 1  # every 3x3 conv; the 1x1 logits conv has no ReLU
    assert fast.prepacked_weights == fast.fused_conv_relu  # their weights in oneDNN's layout, once
    assert torch.equal(fast(x), expected)
    unpacked = InferenceModel(net, precision, CPU)
    for m in unpacked.net.modules():
        if hasattr(m, "packed_weight"):
            m.packed_weight = None
    for batch in (x, x[:1]):  # any batch: the packed weights do not fix the input shape, nor change a bit
        assert torch.equal(fast(batch), unpacked(batch))
    assert sum(isinstance(m, nn.ReLU) for m in fast.net.modules()) == 0
    assert isinstance(net.encoder[0].convs[1], nn.ReLU)  # the source model is left as it was


def test_inference_model_keeps_conv_and_relu_apart_where_the_fused_op_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import unetseg.runtime as runtime

    monkeypatch.setattr(runtime, "_fused_conv_runs", lambda dtype: False)
    torch.manual_seed(0)
    net = build_model("lab", **TINY).eval()
    fast = InferenceModel(net, "fp32", CPU)
    assert fast.fused_conv_relu == 0 and any(isinstance(m, nn.ReLU) for m in fast.net.modules())
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x))


@pytest.mark.parametrize("arch", ["lab", "paper"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_conv_relu_fused_takes_the_same_steps_bit_for_bit(arch: str, precision: str) -> None:
    from unetseg.runtime import prepare_model_for_training
    from unetseg.train import make_optimizer, train_step

    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    torch.manual_seed(0)
    plain = build_model(arch, **{**TINY, "dropout": 0.3}).to(memory_format=torch.channels_last).train()
    fused = prepare_model_for_training(copy.deepcopy(plain), precision, CPU)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert sum(type(m).__name__ == "_ConvReLU" for m in fused.modules()) == n_convs - 1
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints load into a plain model
    size = 32 if arch == "lab" else 44
    x = torch.rand(2, plain.config["in_channels"], size, size).contiguous(memory_format=torch.channels_last)
    out = 32 if arch == "lab" else 4
    y = torch.randint(0, 5, (2, out, out))
    opts = [make_optimizer("adam", net, 1e-2) for net in (plain, fused)]
    for _ in range(3):  # dropout draws the same masks from the same seed in both
        losses = []
        for net, opt in zip((plain, fused), opts, strict=True):
            torch.manual_seed(1)
            losses.append(train_step(net, opt, x, y, precision, CPU)[0])
        assert torch.equal(losses[0], losses[1])
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_keeps_conv_and_relu_apart_where_the_fused_op_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import unetseg.runtime as runtime

    monkeypatch.setattr(runtime, "_fused_conv_runs", lambda dtype: dtype != torch.bfloat16)
    net = runtime.prepare_model_for_training(build_model("lab", **TINY), "bf16", CPU)
    assert any(isinstance(m, nn.ReLU) for m in net.modules())  # fp32 weights alone are not enough for bf16
    net = runtime.prepare_model_for_training(build_model("lab", **TINY), "fp32", CPU)
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())


def test_inference_model_can_keep_an_fp32_head_in_bf16() -> None:
    net = build_model("lab", **TINY)
    fast = InferenceModel(net, "bf16", CPU, fp32_head=True)
    assert fast.net.encoder[0].convs[0].weight.dtype == torch.bfloat16
    assert fast.net.conv10.conv.weight.dtype == torch.float32
    assert fast(torch.rand(1, 3, 32, 32)).dtype == torch.float32


def test_compile_decisions() -> None:
    assert resolve_compile("off", "train", 1e9, CPU) is False
    assert compile_pays_off("infer", 1.0, CPU) is False  # a second of work never pays for compiling
    # On CPUs a compiled training step measured no faster than eager (BENCHMARKS.md): never worth it.
    assert compile_pays_off("train", 1e6, CPU) is False
    if compile_available(CPU)[0]:
        assert compile_pays_off("infer", 1e5, CPU)  # a day of inference is worth a minute of compiling
        assert compile_pays_off("train", 1e5, torch.device("cuda"))
        assert resolve_compile("on", "infer", 0.0, CPU) is True
    with pytest.raises(UnetsegError, match="compile"):
        resolve_compile("sometimes", "train", 1.0, CPU)


def _quick(**kw: object) -> dict:
    opts = dict(quick=True, size=(32, 32), batch_size=4, threads=1, model_options=TINY, verbose=False)
    opts.update(kw)
    return run_benchmark(**opts)  # type: ignore[arg-type]


def test_benchmark_quick_reports_every_figure() -> None:
    modes = ["fp32", "fp32_cl", "auto"] + (["bf16"] if cpu_has_native_bf16() else [])
    r = _quick(modes=modes, compile="off")
    assert set(r["modes"]) == set(modes)
    for key in ("train_images_per_s", "infer_images_per_s", "latency_ms", "peak_rss_mib"):
        assert r[key] > 0, key
    row = r["modes"]["fp32"]
    for key in ("train_gflops", "infer_gflops", "train_pct_of_fp32_peak", "infer_x_fp32", "samples"):
        assert key in row, key
    assert row["samples"] == {"train": 2, "infer": 2, "latency": 4}
    assert r["peaks"]["matmul_fp32_gflops"] > 0
    # An emulated bf16 matmul is no peak: probed only where bf16 is native.
    assert ("matmul_bf16_gflops" in r["peaks"]) == cpu_has_native_bf16()
    if cpu_has_native_bf16():
        assert r["peaks"]["matmul_bf16_gflops"] > 0
    assert r["gflop_per_image"]["train_step"] == pytest.approx(3 * r["gflop_per_image"]["forward"])
    assert r["auto"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_benchmark_onnx_modes_and_json(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    rc = main(["--quick", "--size", "32", "32", "--batch-size", "4", "--filters", "4", "--depth", "2",
               "--classes", "5", "--threads", "1", "--modes", "fp32,onnx_fp32,onnx_int8",
               "--parts", "infer,latency", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["infer_int8_images_per_s"] > 0 and r["latency_int8_ms"] > 0
    assert "train_images_per_s" not in r["modes"]["onnx_int8"]
    assert r["modes"]["onnx_int8"]["precision"] == "int8"
    # int8 is set against the bf16 peak where bf16 is native, else against the fp32 peak.
    ref = "bf16" if cpu_has_native_bf16() else "fp32"
    assert r["modes"]["onnx_int8"][f"infer_pct_of_{ref}_peak"] > 0


def test_peak_reference() -> None:
    assert peak_reference("fp32", True) == "fp32"
    assert peak_reference("bf16", True) == "bf16"
    assert peak_reference("int8", True) == "bf16"
    assert peak_reference("int8", False) == "fp32"


def test_benchmark_rejects_unknown_modes_and_sizes() -> None:
    with pytest.raises(UnetsegError, match="unknown benchmark mode"):
        _quick(modes=["fp64"])
    with pytest.raises(UnetsegError, match="divisible"):
        _quick(modes=["fp32"], size=(30, 32))
    assert main(["--quick", "--modes", "warp9"]) == 2
    assert "auto" in ALL_MODES


def test_benchmark_pauses_between_subjects() -> None:
    # A subject's spinning thread pool must be idle again before the next subject's timed call.
    spans: list[tuple[str, float, float]] = []

    def timed(name: str) -> Subject:
        def run() -> float:
            start = time.perf_counter()
            spans.append((name, start, time.perf_counter()))
            return 1e-3

        return Subject(name, name, "fp32", infer=run)

    r = _quick(modes=["fp32"], parts=("infer",), extra_subjects=[timed("a"), timed("b")], settle_s=0.05)
    assert r["settings"]["settle_s"] == 0.05
    pairs = zip(spans, spans[1:], strict=False)
    after_a = [b_start - a_end for (na, _, a_end), (nb, b_start, _) in pairs if (na, nb) == ("a", "b")]
    assert len(after_a) == 3 and min(after_a) >= 0.05  # 1 warm-up + 2 timed rounds
    with pytest.raises(UnetsegError, match="settle_s"):
        _quick(modes=["fp32"], parts=("infer",), settle_s=-1)


def test_interleaved_medians_run_round_robin_and_skip_warm_up() -> None:
    calls: list[str] = []
    slow_times = iter([0.2] + [0.03] * 3)  # the warm-up call is the slow outlier; it must not count

    def slow() -> None:
        calls.append("slow")
        time.sleep(next(slow_times))

    medians = interleaved_medians({"slow": slow, "fast": lambda: calls.append("fast")}, rounds=3, warmup=1)
    assert calls == ["slow", "fast"] * 4
    assert 0.03 <= medians["slow"] < 0.2 and medians["fast"] < 0.03


def test_benchmark_cpu_clock() -> None:
    r = _quick(modes=["fp32"], clock="cpu", parts=("infer",))
    assert r["settings"]["clock"] == "cpu" and r["modes"]["fp32"]["infer_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(CPU)[0], reason="torch.compile (inductor) unavailable here")
def test_compiled_paths_run_and_agree() -> None:
    net, x = _trained_tiny()
    with torch.no_grad():
        ref = net(x).argmax(1)
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    fast = prepare_model_for_inference(net, precision, CPU, compile="on", batch_size=16)
    assert fast.compiled
    assert (fast(x).argmax(1) == ref).float().mean().item() >= 0.999
    assert fast(x[:3]).shape == (3, 5, 32, 32)  # padded to the compiled batch, then cut back
    r = _quick(modes=["fp32_compile", "auto"], compile="on", parts=("train", "infer"))
    assert r["modes"]["auto"]["compile_train"] is True and r["modes"]["fp32_compile"]["train_images_per_s"] > 0


def test_cli_benchmark_options_match_and_run(tmp_path: Path) -> None:
    cli = pytest.importorskip("unetseg.cli")
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ours = argparse.ArgumentParser()
    add_arguments(ours)

    def options(p: argparse.ArgumentParser) -> dict:
        return {a.dest: a.default for a in p._actions if a.dest != "help"}

    assert options(sub.choices["benchmark"]) == options(ours)  # cli.py spells them out; keep them equal
    out = tmp_path / "b.json"
    assert cli.main(["benchmark", "--quick", "--size", "32", "32", "--batch-size", "2", "--filters", "4",
                     "--depth", "2", "--threads", "1", "--modes", "fp32", "--parts", "infer",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["modes"]["fp32"]["infer_images_per_s"] > 0


def test_flush_denormals_zeroes_subnormals(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_flush_denormal(False)  # earlier tests' predict/train calls turned it on for the process
    tiny = torch.tensor([1e-39])  # subnormal in fp32 (made after: with flushing on it would be 0 already)
    assert tiny.item() > 0
    try:
        monkeypatch.setenv("UNETSEG_DENORMALS", "keep")
        assert flush_denormals() is False and (tiny * 1.0).item() > 0
        monkeypatch.delenv("UNETSEG_DENORMALS")
        if not flush_denormals():
            pytest.skip("this CPU cannot flush subnormals (no SSE3)")
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_training_optimizers_are_fused_and_match_the_loop() -> None:
    from unetseg.train import make_optimizer

    torch.manual_seed(0)
    nets = [build_model("lab", n_classes=3, base_filters=4, depth=2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for name in ("adam", "adamw", "sgd"):
        fused = make_optimizer(name, nets[0], 1e-2, 1e-4)
        assert fused.defaults["fused"] is True
        d = fused.defaults
        if name == "sgd":
            assert (d["momentum"], d["nesterov"]) == (0.9, True)
            assert make_optimizer("sgd", nets[0], 1e-2, momentum=0.0).defaults["nesterov"] is False
            loop = torch.optim.SGD(nets[1].parameters(), lr=d["lr"], momentum=0.9, nesterov=True,
                                   weight_decay=d["weight_decay"], foreach=False)
        else:
            loop = type(fused)(nets[1].parameters(), lr=d["lr"], eps=d["eps"], weight_decay=d["weight_decay"])
        for _ in range(3):
            for net in nets:
                for p in net.parameters():
                    p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32)).view_as(p)
            fused.step()
            loop.step()
        for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_int8_may_saturate_only_on_x86_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from unetseg import runtime

    cases = [("x86_64", {"avx2"}, True), ("x86_64", {"avx2", "avx512_vnni"}, False),
             ("x86_64", {"avx2", "avx_vnni"}, False), ("aarch64", set(), False)]
    for machine, flags, expected in cases:
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(runtime, "cpu_flags", lambda f=flags: frozenset(f))
        assert runtime.int8_may_saturate() is expected, (machine, flags)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [("crop_cost.py", ["--sizes", "32", "48", "64", "96"]),
                                           ("layout_ab.py", ["--recipe", "lab"]),
                                           ("layout_ab.py", ["--recipe", "lab", "--compile"])])
def test_step_benchmark_scripts_run_and_write_their_figures(tmp_path: Path, script: str, extra: list) -> None:
    import subprocess
    import sys

    if "--compile" in extra and not compile_available(CPU)[0]:
        pytest.skip(compile_available(CPU)[1])
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / script), "--rounds", "2", "--steps", "1",
                           "--threads", "1", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    if script == "crop_cost.py":
        assert list(figures["sizes"]) == ["32x48", "64x96"] and figures["reference"] == "64x96"
        small, full = figures["sizes"]["32x48"], figures["sizes"]["64x96"]
        assert len(small["all_ms_per_step"]) == 2 and small["ms_per_step"] > 0
        assert small["ratio"] == pytest.approx(small["ms_per_step"] / full["ms_per_step"])
        assert small["ratio_over_pixel_ratio"] == pytest.approx(small["ratio"] * 4)
    elif "--compile" in extra:
        assert set(figures["ms_per_step"]) == {"channels_last", "contiguous", "channels_last_compiled"}
        assert figures["compile_seconds"] > 0 and len(figures["all_ms_per_step"]["channels_last_compiled"]) == 2
    else:
        assert set(figures["ms_per_step"]) == {"channels_last", "contiguous"} and figures["gflop_per_step"] > 0
        assert figures["compile_seconds"] is None
