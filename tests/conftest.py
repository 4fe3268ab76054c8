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
