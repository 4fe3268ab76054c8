"""Tests for unetseg.data.synth: layout, file format, determinism, class coverage, refusals.

Small frames (96x128) keep this fast; one check runs at the lab's 240x320.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetseg.classes import CARLA_IDS
from unetseg.data.synth import (
    MARKER,
    SceneParams,
    _png_bytes,
    frame_numbers,
    render_scene,
    synth_dataset,
)
from unetseg.errors import UnetsegError

SMALL = (96, 128)
DRAWN = {
    "Sky", "Road", "RoadLine", "SideWalk", "Building", "Vegetation", "Terrain", "Pole", "TrafficSign",
    "Fence", "GuardRail", "Vehicles", "Pedestrian", "Wall",
}


def _digest(folder: Path) -> dict[str, str]:
    """sha256 per file under ``folder`` (relative path -> hex digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _frame(seed: int, k: int, size: tuple[int, int] = SMALL, t: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    scene = SceneParams.random(np.random.default_rng([seed, k]))
    return render_scene(np.random.default_rng([seed, k, 1]), size, t, scene)


def test_render_scene_shapes_and_ids() -> None:
    image, mask = render_scene(np.random.default_rng(0), size=SMALL)
    assert image.shape == (*SMALL, 3) and image.dtype == np.uint8
    assert mask.shape == SMALL and mask.dtype == np.uint8
    # Every pixel is labelled with a class the generator draws (never Unlabeled).
    assert set(np.unique(mask)) <= {CARLA_IDS[n] for n in DRAWN}


def test_render_scene_deterministic_and_seed_sensitive() -> None:
    a = render_scene(np.random.default_rng(5), size=SMALL)
    b = render_scene(np.random.default_rng(5), size=SMALL)
    c = render_scene(np.random.default_rng(6), size=SMALL)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_frames_of_a_run_move_forward_but_stay_one_scene() -> None:
    # Consecutive frames differ (the camera moved) but much less than frames of different scenes.
    _, m0 = _frame(3, 0, t=0.0)
    _, m1 = _frame(3, 0, t=1.0)
    _, other = _frame(3, 1, t=0.0)
    same_run = float(np.mean(m0 != m1))
    assert 0.0 < same_run < float(np.mean(m0 != other))


def test_classes_present_and_road_sky_dominate() -> None:
    counts = np.zeros(256, dtype=np.int64)
    for k in range(20):
        _, mask = _frame(0, k, t=float(k % 10))
        counts += np.bincount(mask.ravel(), minlength=256)
    present = {name for name, i in CARLA_IDS.items() if counts[i] > 0}
    assert DRAWN <= present, f"never drawn in 20 frames: {sorted(DRAWN - present)}"
    top_two = {int(i) for i in np.argsort(counts)[-2:]}
    assert top_two == {CARLA_IDS["Road"], CARLA_IDS["Sky"]}
    assert counts[CARLA_IDS["Unlabeled"]] == 0


def test_frame_numbers_form_runs_with_gaps() -> None:
    assert frame_numbers(5, run_length=2) == [0, 1, 100, 101, 200]
    nums = frame_numbers(40, run_length=10)
    assert nums[:10] == list(range(10)) and nums[10] == 100
    for run_length in (1, 7, 10, 50, 51, 120):
        nums = frame_numbers(3 * run_length, run_length)
        steps = np.diff(nums)
        # Inside a run numbers step by 1; between runs by more than 20 (the splitter's default gap).
        assert set(steps[steps > 1]) and min(steps[steps > 1]) > 20
        assert np.sum(steps == 1) == 3 * (run_length - 1)


def test_layout_and_file_format(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    names = synth_dataset(out, count=7, seed=2, size=SMALL, run_length=3)
    assert names == ["000000.png", "000001.png", "000002.png", "000100.png", "000101.png", "000102.png",
                     "000200.png"]
    assert sorted(p.name for p in (out / "CameraRGB").iterdir()) == names
    assert sorted(p.name for p in (out / "CameraMask").iterdir()) == names
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert readme.splitlines()[0] == MARKER and "seed=2" in readme and "0.9.11" in readme
    for name in names:
        with Image.open(out / "CameraRGB" / name) as im:
            assert im.format == "PNG" and im.mode == "RGBA" and im.size == (SMALL[1], SMALL[0])
            rgb = np.asarray(im)
        with Image.open(out / "CameraMask" / name) as im:
            assert im.mode == "RGBA" and im.size == (SMALL[1], SMALL[0])
            m = np.asarray(im)
        assert (rgb[..., 3] == 255).all() and rgb[..., :3].std() > 10  # an image, not a flat fill
        assert (m[..., 1:3] == 0).all() and (m[..., 3] == 255).all()
        assert set(np.unique(m[..., 0])) <= {CARLA_IDS[n] for n in DRAWN}


def test_dataset_matches_render_scene(tmp_path: Path) -> None:
    # The files hold exactly what render_scene draws for (seed, run, step).
    synth_dataset(tmp_path / "s", count=2, seed=4, size=SMALL, run_length=2)
    scene = SceneParams.random(np.random.default_rng([4, 0]), frames=2)
    image, mask = render_scene(np.random.default_rng([4, 0, 1]), SMALL, 1.0, scene)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s/CameraRGB/000001.png"))[..., :3], image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s/CameraMask/000001.png"))[..., 0], mask)


def test_byte_identical_by_seed(tmp_path: Path) -> None:
    def make(name: str, count: int, seed: int) -> dict[str, str]:
        synth_dataset(tmp_path / name, count, seed=seed, size=SMALL, run_length=2)
        return _digest(tmp_path / name)

    a, b, c = make("a", 4, 9), make("b", 4, 9), make("c", 4, 10)
    assert a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 8 and all(a[k] != c[k] for k in pngs)
    # A smaller count is a prefix of a larger one: frame n depends on (seed, n) only.
    d = make("d", 2, 9)
    assert all(d[k] == a[k] for k in d if k.endswith(".png"))


def test_full_size_frame(tmp_path: Path) -> None:
    names = synth_dataset(tmp_path / "full", count=1, seed=0)
    with Image.open(tmp_path / "full" / "CameraRGB" / names[0]) as im:
        assert im.size == (320, 240) and im.mode == "RGBA"
    m = np.asarray(Image.open(tmp_path / "full" / "CameraMask" / names[0]))[..., 0]
    assert m.shape == (240, 320)
    counts = np.bincount(m.ravel(), minlength=23)
    assert counts[CARLA_IDS["Road"]] > 0.2 * m.size and counts[CARLA_IDS["Sky"]] > 0.1 * m.size


def test_png_writer_round_trip() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)  # random bytes exercise the filter's wrap-around
    back = np.asarray(Image.open(io.BytesIO(_png_bytes(arr))))
    assert back.shape == (5, 7, 4) and np.array_equal(back, arr)


def test_rerun_replaces_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "s"
    synth_dataset(out, count=5, seed=1, size=SMALL, run_length=5)
    (out / "CameraRGB" / ".000003.png.part").write_bytes(b"torn")  # what a crash could leave behind
    names = synth_dataset(out, count=2, seed=1, size=SMALL, run_length=5)
    assert sorted(p.name for p in (out / "CameraRGB").iterdir()) == names
    assert sorted(p.name for p in (out / "CameraMask").iterdir()) == names
    assert "count=2" in (out / "README.txt").read_text(encoding="utf-8")


def test_writes_into_empty_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert synth_dataset(out, count=1, size=SMALL) == ["000000.png"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0}, {"count": -3}, {"count": 2.5}, {"count": True},
        {"seed": -1}, {"seed": "7"},
        {"size": (0, 128)}, {"size": (96, -1)}, {"size": (8, 8)}, {"size": (96,)}, {"size": "96x128"},
        {"size": (96.0, 128)},
        {"run_length": 0},
        {"count": 200_000, "run_length": 1},  # frame numbers would outgrow six digits
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    args = {"count": 1, "seed": 0, "size": SMALL, "run_length": 10, **kwargs}
    with pytest.raises(UnetsegError):
        synth_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_refuses_unrelated_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UnetsegError, match="not written by unetseg synth"):
        synth_dataset(out, count=1, size=SMALL)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "CameraRGB").exists()
    # Also a synth output with a foreign file added is left alone.
    synth_dataset(tmp_path / "s", count=1, size=SMALL)
    (tmp_path / "s" / "CameraMask" / "extra.png").write_bytes(b"x")
    with pytest.raises(UnetsegError):
        synth_dataset(tmp_path / "s", count=1, size=SMALL)
    assert (tmp_path / "s" / "CameraMask" / "extra.png").exists()


def test_refuses_file_as_out(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UnetsegError):
        synth_dataset(f, count=1, size=SMALL)
