"""Shared test setup: cheap tests first, real-data location, small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def carla_dir() -> Path:
    """The real CARLA frames: ``$UNETSEG_CARLA_DIR`` or ``../shared/data/carla`` beside the repo."""
    return Path(os.environ.get("UNETSEG_CARLA_DIR", REPO.parent / "shared" / "data" / "carla"))


@pytest.fixture(scope="session")
def carla() -> Path:
    path = carla_dir()
    if not (path / "CameraRGB").is_dir():
        pytest.skip(f"real CARLA frames not found at {path} (set UNETSEG_CARLA_DIR)")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The fast set runs first, so a broken basic test fails within seconds.
    def cost(item: pytest.Item) -> tuple[bool, bool]:
        return item.get_closest_marker("slow") is not None, item.get_closest_marker("realdata") is not None

    items.sort(key=cost)


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from many threads, and CI machines are small and shared.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated driving scenes at 64x96 in the CARLA layout (4 runs of 10 frames)."""
    from unetseg.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("scenes")
    synth_dataset(root, count=40, seed=0, size=(64, 96), run_length=10)
    return root


TINY_TRAIN = dict(
    recipe="lab", base_filters=8, depth=2, size=[32, 48], batch_size=8, epochs=2, threads=1,
    no_progress=True, precision="fp32",
)
