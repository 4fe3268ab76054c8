"""The Keras-style table: rows as the lab prints them, totals, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unetseg.cli import main
from unetseg.model import build_model, conv_block, unet_model, upsampling_block
from unetseg.summary import layer_table, model_summary

# The lab notebook's printed comparator output (seeds/003), row for row.
LAB_CONV_BLOCK_1 = [
    ["InputLayer", [(None, 96, 128, 3)], 0],
    ["Conv2D", (None, 96, 128, 32), 896, "same", "relu", "HeNormal"],
    ["Conv2D", (None, 96, 128, 32), 9248, "same", "relu", "HeNormal"],
    ["MaxPooling2D", (None, 48, 64, 32), 0, (2, 2)],
]
LAB_CONV_BLOCK_2 = [
    ["InputLayer", [(None, 96, 128, 3)], 0],
    ["Conv2D", (None, 96, 128, 1024), 28672, "same", "relu", "HeNormal"],
    ["Conv2D", (None, 96, 128, 1024), 9438208, "same", "relu", "HeNormal"],
    ["Dropout", (None, 96, 128, 1024), 0, 0.1],
    ["MaxPooling2D", (None, 48, 64, 1024), 0, (2, 2)],
]
LAB_UPSAMPLING_BLOCK = [
    ["Conv2DTranspose", (None, 24, 32, 32), 73760],
    ["Concatenate", (None, 24, 32, 160), 0],
    ["Conv2D", (None, 24, 32, 32), 46112, "same", "relu", "HeNormal"],
    ["Conv2D", (None, 24, 32, 32), 9248, "same", "relu", "HeNormal"],
]


def test_conv_block_rows_equal_the_lab() -> None:
    assert [r.lab_row() for r in layer_table(conv_block(3, 32), (96, 128, 3))] == LAB_CONV_BLOCK_1
    rows = layer_table(conv_block(3, 1024, dropout_prob=0.1), (96, 128, 3))
    assert [r.lab_row() for r in rows] == LAB_CONV_BLOCK_2


def test_upsampling_block_rows_equal_the_lab() -> None:
    rows = layer_table(upsampling_block(256, 128, 32), (12, 16, 256), (24, 32, 128))
    inputs = [r.lab_row() for r in rows if r.type == "InputLayer"]
    assert inputs == [["InputLayer", [(None, 12, 16, 256)], 0], ["InputLayer", [(None, 24, 32, 128)], 0]]
    assert [r.lab_row() for r in rows if r.type != "InputLayer"] == LAB_UPSAMPLING_BLOCK


def test_full_lab_table() -> None:
    rows = layer_table(unet_model(), (96, 128, 3))
    assert sum(r.params for r in rows) == 8_640_471
    assert rows[-1].lab_row() == ["Conv2D", (None, 96, 128, 23), 759, "same", "linear", "GlorotUniform"]
    assert sum(r.type == "Conv2DTranspose" for r in rows) == 4
    assert sum(r.type == "Dropout" for r in rows) == 2
    text = model_summary(unet_model(), (96, 128, 3))
    assert "Total params: 8,640,471" in text and "Trainable params: 8,640,471" in text
    assert "(None, 96, 128, 32)" in text


def test_cli_summary_prints_lab_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "8,640,471" in out and "896" in out and "9,248" in out


def test_cli_summary_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--arch", "paper", "--input-size", "572", "572", "1"]) == 0
    out = capsys.readouterr().out
    assert "(None, 388, 388, 2)" in out
    assert out.count("(Conv2D)") + out.count("(Conv2DTranspose)") == 23


def test_cli_summary_bad_size_is_a_clear_error_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unetseg", "summary", "--input-size", "100", "130", "3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "height 100 is not divisible by 16" in proc.stderr and "use 96 or 112" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_paper_table_sums_to_its_parameters() -> None:
    net = build_model("paper")
    rows = layer_table(net, (572, 572, 1))
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters())
