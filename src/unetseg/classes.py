"""Class tables: names and display colours for label indices.

The CARLA 0.9.11 semantic tags (the numbering the DeepLearning.AI lab's masks use, 23 classes) are built
in; other datasets name their classes in a file or get ``class_0 …``.

Example:
    >>> from unetseg.classes import CARLA, colorize
    >>> CARLA.names[7], CARLA.colors[7]
    ('Road', (128, 64, 128))
    >>> import numpy as np
    >>> colorize(np.array([[7, 13]], dtype=np.uint8), CARLA).shape
    (1, 2, 3)
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UnetsegError


@dataclass(frozen=True)
class ClassTable:
    """Names and RGB display colours, indexed by class id (0 … n-1)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"{len(self.names)} names but {len(self.colors)} colours")

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """Plain values for checkpoints and JSON: ``{"names": [...], "colors": [[r, g, b], ...]}``."""
        return {"names": list(self.names), "colors": [list(c) for c in self.colors]}

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        return cls(tuple(d["names"]), tuple(tuple(int(v) for v in c) for c in d["colors"]))


# CARLA 0.9.11 semantic tags with the simulator's CityScapesPalette colours (renumbered in 0.9.12).
_CARLA_0911 = [
    ("Unlabeled", (0, 0, 0)),
    ("Building", (70, 70, 70)),
    ("Fence", (100, 40, 40)),
    ("Other", (55, 90, 80)),
    ("Pedestrian", (220, 20, 60)),
    ("Pole", (153, 153, 153)),
    ("RoadLine", (157, 234, 50)),
    ("Road", (128, 64, 128)),
    ("SideWalk", (244, 35, 232)),
    ("Vegetation", (107, 142, 35)),
    ("Vehicles", (0, 0, 142)),
    ("Wall", (102, 102, 156)),
    ("TrafficSign", (220, 220, 0)),
    ("Sky", (70, 130, 180)),
    ("Ground", (81, 0, 81)),
    ("Bridge", (150, 100, 100)),
    ("RailTrack", (230, 150, 140)),
    ("GuardRail", (180, 165, 180)),
    ("TrafficLight", (250, 170, 30)),
    ("Static", (110, 190, 160)),
    ("Dynamic", (170, 120, 50)),
    ("Water", (45, 60, 150)),
    ("Terrain", (145, 170, 100)),
]
CARLA = ClassTable(tuple(n for n, _ in _CARLA_0911), tuple(c for _, c in _CARLA_0911))
CARLA_IDS = {name: i for i, name in enumerate(CARLA.names)}


def distinct_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` well-separated colours (golden-ratio hues); class 0 is black."""
    colors = [(0, 0, 0)]
    for i in range(1, n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * ((i // 2) % 2))
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(colors[:n])


def generic_classes(n: int) -> ClassTable:
    """``class_0 … class_{n-1}`` with distinct colours."""
    return ClassTable(tuple(f"class_{i}" for i in range(n)), distinct_colors(n))


def load_class_names(path: str | Path) -> ClassTable:
    """Read class names from a text file (one name per line, line i = class i) or a JSON list/dict.

    A JSON dict may map ``name -> [r, g, b]`` (a palette, in class-id order) or ``"id" -> name``.
    """
    path = Path(path)
    if not path.is_file():
        raise UnetsegError(f"{path}: class-name file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UnetsegError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, list):
            names = [str(n) for n in obj]
        elif isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
            names = list(obj)
            cols = [tuple(int(c) for c in v) for v in obj.values()]
            return ClassTable(tuple(names), tuple(cols))
        elif isinstance(obj, dict):
            try:
                names = [str(obj[k]) for k in sorted(obj, key=int)]
            except ValueError:
                raise UnetsegError(f"{path}: JSON keys must be class ids (0, 1, …)") from None
        else:
            raise UnetsegError(f"{path}: expected a JSON list of names or a dict")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UnetsegError(f"{path}: no class names found")
    return ClassTable(tuple(names), distinct_colors(len(names)))


def colorize(mask: np.ndarray, classes: ClassTable) -> np.ndarray:
    """Class-index mask ``(H, W)`` → RGB ``(H, W, 3)`` uint8; ids past the table are drawn white."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[: len(classes)] = np.asarray(classes.colors, dtype=np.uint8)[:256]
    return lut[np.asarray(mask, dtype=np.int64).clip(0, 255)]
