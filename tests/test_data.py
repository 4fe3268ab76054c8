"""Dataset formats, bad input, loading, resizing, cache and ``data check``.

Every file is generated in ``tmp_path`` (a few pixels each); the tests marked ``realdata`` read the
CARLA frames in ``../shared/data/carla`` (or ``$UNETSEG_CARLA_DIR``, see the ``carla`` fixture in
conftest.py) and are skipped without them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unetseg.classes import CARLA
from unetseg.data import (
    check_folder,
    detect_layout,
    find_pairs,
    layouts,
    load_dataset,
    load_palette,
    nearest_indices,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    scan_folder,
    split_by_sequence,
)
from unetseg.errors import UnetsegError

H, W = 6, 8  # every generated frame is this small


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_carla(root: Path, names=("000001", "000002", "000003"), labels=None, size=(H, W),
               mask_dir: str = "CameraMask", rgba: bool = True) -> Path:
    """CARLA-layout folder: RGBA frames, RGBA masks with the class id in channel 0."""
    (root / "CameraRGB").mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    rng = _rng()
    for k, n in enumerate(names):
        img = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
        img[..., 3] = 255
        lab = (labels if labels is not None else rng.integers(1, 23, size)).astype(np.uint8)
        if labels is not None and labels.ndim == 3:
            lab = labels[k]
        m = np.zeros((*size, 4), np.uint8)
        m[..., 0] = lab
        m[..., 3] = 255
        Image.fromarray(img if rgba else img[..., :3]).save(root / "CameraRGB" / f"{n}.png")
        Image.fromarray(m).save(root / mask_dir / f"{n}.png")
    return root


def make_generic(root: Path, names=("a", "b"), img_ext=".png", n_classes=4, size=(H, W)) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{n}{img_ext}")
        Image.fromarray(rng.integers(0, n_classes, size).astype(np.uint8), "L").save(root / "masks" / f"{n}.png")
    return root


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- layouts


def test_carla_pairs_sorted_by_stem(tmp_path):
    make_carla(tmp_path, names=("000010", "000002", "000007"))
    pairs, layout = find_pairs(tmp_path)
    assert layout == "carla"
    assert [p.name for p in pairs] == ["000002", "000007", "000010"]
    for p in pairs:
        assert p.image.parent.name == "CameraRGB" and p.mask.parent.name == "CameraMask"
        assert p.image.stem == p.mask.stem == p.name


def test_lyft_layout_reads_red_channel_and_ignores_green(tmp_path):
    make_carla(tmp_path, names=("F61-1",), mask_dir="CameraSeg")
    m = np.asarray(Image.open(tmp_path / "CameraSeg" / "F61-1.png")).copy()
    m[..., 1] = 77  # Lyft masks may carry data in G; the class is in R
    Image.fromarray(m).save(tmp_path / "CameraSeg" / "F61-1.png")
    pairs, layout = find_pairs(tmp_path)
    assert layout == "lyft"
    assert np.array_equal(read_mask(pairs[0].mask, "lyft"), m[..., 0])
    assert np.array_equal(read_mask(pairs[0].mask, "auto"), m[..., 0])  # layout from the folder name
    with pytest.raises(UnetsegError, match="channels 1-2"):
        read_mask(pairs[0].mask, "carla")


def test_generic_pairs_jpeg_image_with_png_mask(tmp_path):
    make_generic(tmp_path, names=("x1", "x2"), img_ext=".jpg")
    pairs, layout = find_pairs(tmp_path)
    assert layout == "generic"
    assert [(p.image.name, p.mask.name) for p in pairs] == [("x1.jpg", "x1.png"), ("x2.jpg", "x2.png")]
    assert read_image(pairs[0].image).shape == (H, W, 3)


def test_auto_layout_error_names_expected_folders(tmp_path):
    (tmp_path / "pics").mkdir()
    with pytest.raises(UnetsegError) as e:
        detect_layout(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "CameraRGB/" in msg and "CameraMask/" in msg and "images/" in msg
    assert "pics/" in msg


def test_pointing_at_subfolder_hints_parent(tmp_path):
    make_carla(tmp_path)
    with pytest.raises(UnetsegError, match="parent folder"):
        find_pairs(tmp_path / "CameraRGB")


def test_nested_layout_is_suggested(tmp_path):
    make_carla(tmp_path / "dataA")
    with pytest.raises(UnetsegError, match="dataA"):
        find_pairs(tmp_path)


def test_explicit_layout_mismatch(tmp_path):
    make_generic(tmp_path)
    with pytest.raises(UnetsegError, match="expects subfolders CameraRGB/ and CameraMask/"):
        find_pairs(tmp_path, layout="carla")


def test_missing_folder(tmp_path):
    with pytest.raises(UnetsegError, match="not found"):
        find_pairs(tmp_path / "nope")


def test_unpaired_files_are_listed(tmp_path):
    make_carla(tmp_path, names=("000001", "000002", "000003"))
    (tmp_path / "CameraMask" / "000002.png").unlink()
    (tmp_path / "CameraRGB" / "000003.png").unlink()
    with pytest.raises(UnetsegError) as e:
        find_pairs(tmp_path)
    msg = str(e.value)
    assert "CameraRGB/000002.png" in msg and "without a mask" in msg
    assert "CameraMask/000003.png" in msg and "without an image" in msg


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UnetsegError, match="no image files") as e:
        find_pairs(tmp_path)
    assert "images" in str(e.value)


def test_non_image_files_are_reported_not_paired(tmp_path):
    make_carla(tmp_path, names=("000001", "000002"))
    (tmp_path / "CameraRGB" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "CameraMask" / "notes.txt").write_text("labels by hand")
    scan = scan_folder(tmp_path)
    assert not scan.errors and len(scan.pairs) == 2
    assert sorted(p.name for p in scan.ignored) == [".DS_Store", "notes.txt"]
    with pytest.warns(UserWarning, match="notes.txt"):
        warnings.simplefilter("always")
        data = load_dataset(tmp_path, progress=False)
    assert len(data) == 2 and {p.name for p in data.skipped} == {".DS_Store", "notes.txt"}
    report = check_folder(tmp_path)
    assert report.ok and any("notes.txt" in w for w in report.warnings) and "notes.txt" in report.text()


def test_duplicate_stems_are_an_error(tmp_path):
    make_generic(tmp_path, names=("a",))
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(UnetsegError, match="two files with the name 'a'"):
        find_pairs(tmp_path)


def test_jpeg_mask_is_refused(tmp_path):
    make_generic(tmp_path, names=("a",))
    (tmp_path / "masks" / "a.png").unlink()
    Image.new("L", (W, H)).save(tmp_path / "masks" / "a.jpg")
    with pytest.raises(UnetsegError, match=r"masks/a\.jpg: JPEG masks are lossy"):
        find_pairs(tmp_path)


# ---------------------------------------------------------------------------------------------- decoding


def test_read_image_modes(tmp_path):
    rgb = _rng().integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "grey.png")
    for name in ("rgb.png", "rgba.png", "rgb.bmp", "rgb.tif"):
        a = read_image(tmp_path / name)
        assert a.dtype == np.uint8 and a.shape == (H, W, 3)
        assert np.array_equal(a, rgb), name  # alpha dropped, not composited
    g = read_image(tmp_path / "grey.png")
    assert g.shape == (H, W, 3) and np.array_equal(g[..., 1], rgb[..., 0])


def test_read_image_16bit_is_scaled(tmp_path):
    full = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    Image.fromarray(full).save(tmp_path / "full16.png")
    a = read_image(tmp_path / "full16.png")
    assert a.dtype == np.uint8 and a[0, 0, 0] == 0 and a[-1, -1, 0] == 255
    twelve = (full // 16).astype(np.uint16)  # 12-bit sensor data in a 16-bit file
    Image.fromarray(twelve).save(tmp_path / "twelve.tif")
    b = read_image(tmp_path / "twelve.tif")
    assert b[-1, -1, 0] == 255 and abs(int(b[3, 4, 0]) - int(a[3, 4, 0])) <= 1


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_files_name_the_file(tmp_path, kind):
    make_carla(tmp_path, names=("000001", "000002"))
    bad = tmp_path / "CameraRGB" / "000002.png"
    if kind == "garbage":
        bad.write_bytes(b"this is not a png at all")
    elif kind == "truncated":
        big = _rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(big).save(bad)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(UnetsegError) as e:
        read_image(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(UnetsegError) as e:
        load_dataset(tmp_path, progress=False)
    assert str(bad) in str(e.value)
    report = check_folder(tmp_path)
    assert not report.ok and any(str(bad) in x for x in report.errors)


def test_carla_mask_with_colour_channels_is_rejected(tmp_path):
    make_carla(tmp_path, names=("000001",))
    path = tmp_path / "CameraMask" / "000001.png"
    m = np.asarray(Image.open(path)).copy()
    m[2, 3, 1] = 64
    Image.fromarray(m).save(path)
    with pytest.raises(UnetsegError) as e:
        read_mask(path, "carla")
    msg = str(e.value)
    assert str(path) in msg and "channels 1-2" in msg and "1 pixels" in msg and "row 2, column 3" in msg


def test_generic_index_masks_L_P_and_grey_rgb(tmp_path):
    ids = _rng().integers(0, 5, (H, W)).astype(np.uint8)
    Image.fromarray(ids, "L").save(tmp_path / "l.png")
    p = Image.fromarray(ids, "P")
    p.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90, 1, 2, 3] + [0] * (3 * 251))
    p.save(tmp_path / "p.png")
    Image.fromarray(np.dstack([ids] * 3)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(np.dstack([ids, ids * 0, ids * 0])).save(tmp_path / "red.png")
    for name in ("l.png", "p.png", "grey_rgb.png", "red.png"):
        assert np.array_equal(read_mask(tmp_path / name, "generic"), ids), name  # P: indices, not colours


def test_colour_mask_without_palette_asks_for_one(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :4] = (128, 64, 128)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(UnetsegError, match=r"c\.png: colour mask .* --palette"):
        read_mask(tmp_path / "c.png", "generic")


@pytest.mark.parametrize("fmt", ["json", "json-list", "csv", "csv-hex"])
def test_palette_maps_colours(tmp_path, fmt):
    pal = {"background": (0, 0, 0), "road": (128, 64, 128), "sky": (70, 130, 180)}
    if fmt == "json":
        (tmp_path / "pal.json").write_text(json.dumps({k: list(v) for k, v in pal.items()}))
        path = tmp_path / "pal.json"
    elif fmt == "json-list":
        (tmp_path / "pal.json").write_text(json.dumps([{"name": k, "color": list(v)} for k, v in pal.items()]))
        path = tmp_path / "pal.json"
    elif fmt == "csv":
        rows = ["name,r,g,b"] + [f"{k},{r},{g},{b}" for k, (r, g, b) in pal.items()]
        (tmp_path / "pal.csv").write_text("\n".join(rows))
        path = tmp_path / "pal.csv"
    else:
        (tmp_path / "pal.csv").write_text("\n".join(f"{k},#{r:02x}{g:02x}{b:02x}" for k, (r, g, b) in pal.items()))
        path = tmp_path / "pal.csv"
    palette = load_palette(path)
    assert palette.classes.names == ("background", "road", "sky")
    ids = _rng().integers(0, 3, (H, W))
    rgb = np.asarray(list(pal.values()), np.uint8)[ids]
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png", "generic", palette), ids)


def test_unknown_palette_colour_names_file_colour_and_count(tmp_path):
    (tmp_path / "pal.json").write_text(json.dumps({"bg": [0, 0, 0], "road": [128, 64, 128]}))
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, :3] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    with pytest.raises(UnetsegError) as e:
        read_mask(tmp_path / "m.png", "generic", tmp_path / "pal.json")
    msg = str(e.value)
    assert str(tmp_path / "m.png") in msg and "(1, 2, 3): 3 px" in msg


def test_palette_dataset_end_to_end_with_names(tmp_path):
    make_generic(tmp_path, names=("a", "b"))
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    (tmp_path / "pal.csv").write_text("\n".join(f"c{i},{r},{g},{b}" for i, (r, g, b) in enumerate(colours)))
    for n in ("a", "b"):
        ids = np.asarray(Image.open(tmp_path / "masks" / f"{n}.png"))
        Image.fromarray(np.asarray(colours, np.uint8)[ids]).save(tmp_path / "masks" / f"{n}.png")
    data = load_dataset(tmp_path, palette=tmp_path / "pal.csv", progress=False)
    assert data.classes.names == ("c0", "c1", "c2", "c3") and data.classes.colors[1] == (255, 0, 0)
    assert int(data.masks.max()) <= 3


# ---------------------------------------------------------------------------------------------- loading


def test_load_carla_shapes_dtypes_and_classes(tmp_path):
    make_carla(tmp_path)
    data = load_dataset(tmp_path, progress=False)
    assert data.images.shape == (3, 3, H, W) and data.images.dtype == torch.uint8
    assert data.masks.shape == (3, H, W) and data.masks.dtype == torch.uint8
    assert data.names == ["000001", "000002", "000003"] and data.layout == "carla"
    assert data.classes == CARLA and data.n_classes == 23
    img = np.asarray(Image.open(tmp_path / "CameraRGB" / "000002.png"))[..., :3]
    assert np.array_equal(data.images[1].permute(1, 2, 0).numpy(), img)
    sub = data.subset([2, 0])
    assert sub.names == ["000003", "000001"] and torch.equal(sub.images[1], data.images[0])


def test_generic_classes_from_max_label_and_from_names_file(tmp_path):
    make_generic(tmp_path, n_classes=4)
    data = load_dataset(tmp_path, progress=False)
    top = int(data.masks.max())
    assert len(data.classes) == top + 1 and data.classes.names[0] == "class_0"
    (tmp_path / "names.txt").write_text("bg\nroad\ncar\nsky\nperson\n")
    data = load_dataset(tmp_path, class_names=tmp_path / "names.txt", progress=False)
    assert data.classes.names == ("bg", "road", "car", "sky", "person")
    with pytest.raises(UnetsegError, match="names.txt: lists 5 classes but n_classes is 7"):
        load_dataset(tmp_path, class_names=tmp_path / "names.txt", n_classes=7, progress=False)


def test_label_out_of_range_names_file_value_and_count(tmp_path):
    labels = np.full((3, H, W), 7, np.uint8)
    labels[1, 0, :5] = 30
    make_carla(tmp_path, labels=labels)
    bad = tmp_path / "CameraMask" / "000002.png"
    with pytest.raises(UnetsegError) as e:
        load_dataset(tmp_path, progress=False)
    msg = str(e.value)
    assert f"{bad}: label 30 (5 px) >= n_classes 23" in msg and "000001" not in msg and "--classes 31" in msg
    with pytest.raises(UnetsegError, match="label 30 .* >= n_classes 10"):
        load_dataset(tmp_path, n_classes=10, progress=False)
    data = load_dataset(tmp_path, n_classes=31, progress=False)  # a bigger table is fine
    assert len(data.classes) == 31 and data.classes.names[7] == "Road" and data.classes.names[30] == "class_30"
    report = check_folder(tmp_path)
    assert not report.ok and any(str(bad) in x and "label 30" in x for x in report.errors)


def test_image_mask_size_mismatch(tmp_path):
    make_carla(tmp_path, names=("000001", "000002"))
    Image.new("RGBA", (W + 2, H), (5, 0, 0, 255)).save(tmp_path / "CameraMask" / "000002.png")
    with pytest.raises(UnetsegError) as e:
        load_dataset(tmp_path, size=(4, 4), progress=False)
    msg = str(e.value)
    assert str(tmp_path / "CameraMask" / "000002.png") in msg and "10x6" in msg and "8x6" in msg
    report = check_folder(tmp_path)
    assert not report.ok and any("000002.png" in x and "must match" in x for x in report.errors)


def test_native_sizes_must_agree_unless_resized(tmp_path):
    make_carla(tmp_path, names=("000001", "000002", "000003"))
    make_carla(tmp_path, names=("000009",), size=(H + 2, W + 2))
    with pytest.raises(UnetsegError) as e:
        load_dataset(tmp_path, progress=False)
    msg = str(e.value)
    assert "CameraRGB/000009.png (10x8)" in msg and "--size" in msg
    data = load_dataset(tmp_path, size=(4, 6), progress=False)
    assert data.images.shape == (4, 3, 4, 6) and data.masks.shape == (4, 4, 6)
    report = check_folder(tmp_path)  # check works at any resolution
    assert report.ok and set(report.image_sizes) == {"8x6", "10x8"}


def test_bad_options(tmp_path):
    make_carla(tmp_path)
    with pytest.raises(UnetsegError, match="resize mode"):
        load_dataset(tmp_path, resize_mode="cubic", progress=False)
    with pytest.raises(UnetsegError, match="size must be positive"):
        load_dataset(tmp_path, size=(0, 4), progress=False)
    with pytest.raises(UnetsegError, match="unknown layout"):
        load_dataset(tmp_path, layout="coco", progress=False)


# ---------------------------------------------------------------------------------------------- resizing


def test_lab_nearest_matches_tensorflow_half_pixel_rule():
    # tf.image.resize(method="nearest") on [0, 1, 2, 3] to 2 gives [1, 3]; 240 -> 96 (the lab's shrink
    # of these frames) takes floor((i + 0.5) * 2.5).
    assert nearest_indices(4, 2).tolist() == [1, 3]
    assert nearest_indices(240, 96)[:6].tolist() == [1, 3, 6, 8, 11, 13]
    assert nearest_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert nearest_indices(320, 128).max() == 318


def test_resize_modes():
    rng = _rng()
    img = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    lab = resize_image(img, (4, 6), "lab")
    assert np.array_equal(lab, img[1::2, 1::2])
    box = resize_image(img, (4, 6), "default")
    mean = img.reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.abs(box.astype(float) - mean).max() <= 1  # BOX = 2x2 block mean when halving
    up = resize_image(img, (16, 24), "default")
    assert up.shape == (16, 24, 3)
    mask = rng.integers(0, 5, (8, 12)).astype(np.uint8)
    for size in [(4, 6), (5, 7), (16, 24)]:
        m = resize_mask(mask, size)
        assert m.shape == size and set(np.unique(m)) <= set(np.unique(mask))  # never interpolated


def test_load_lab_and_default_resize(tmp_path):
    make_carla(tmp_path, names=("000001",))
    lab = load_dataset(tmp_path, size=(3, 4), resize_mode="lab", progress=False)
    img = np.asarray(Image.open(tmp_path / "CameraRGB" / "000001.png"))[..., :3]
    assert np.array_equal(lab.images[0].permute(1, 2, 0).numpy(), img[1::2, 1::2])
    mask = np.asarray(Image.open(tmp_path / "CameraMask" / "000001.png"))[..., 0]
    default = load_dataset(tmp_path, size=(3, 4), progress=False)
    assert np.array_equal(default.masks[0].numpy(), mask[1::2, 1::2])  # masks: nearest in both modes


# ---------------------------------------------------------------------------------------------- speed


def test_cache_second_load_decodes_nothing(tmp_path):
    root = make_carla(tmp_path / "d", names=[f"{i:06d}" for i in range(6)])
    cache = tmp_path / "cache"
    before = layouts.DECODE_COUNT
    first = load_dataset(root, size=(4, 4), cache_dir=cache, progress=False)
    assert layouts.DECODE_COUNT - before == 12 and not first.from_cache  # 6 images + 6 masks, once each
    assert len(list(cache.glob("*.pt"))) == 1
    before = layouts.DECODE_COUNT
    second = load_dataset(root, size=(4, 4), cache_dir=cache, progress=False)
    assert layouts.DECODE_COUNT == before and second.from_cache
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert second.names == first.names and second.classes == first.classes
    # Another size or mode is another cache entry; a changed file invalidates its entry.
    load_dataset(root, size=(4, 4), resize_mode="lab", cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2
    f = root / "CameraMask" / "000003.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    before = layouts.DECODE_COUNT
    load_dataset(root, size=(4, 4), cache_dir=cache, progress=False)
    assert layouts.DECODE_COUNT - before == 12


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = make_carla(tmp_path / "d")
    cache = tmp_path / "cache"
    load_dataset(root, cache_dir=cache, progress=False)
    (pt,) = cache.glob("*.pt")
    pt.write_bytes(b"junk")
    data = load_dataset(root, cache_dir=cache, progress=False)
    assert len(data) == 3 and not data.from_cache


# ---------------------------------------------------------------------------------------------- check


def test_check_report_text_json_and_plots(tmp_path):
    labels = np.zeros((3, H, W), np.uint8)
    labels[:, : H // 2] = 13  # Sky on top
    labels[:, H // 2:] = 7  # Road below
    make_carla(tmp_path / "d", labels=labels)
    report = check_folder(tmp_path / "d", out_dir=tmp_path / "out", samples=2)
    assert report.ok and report.pairs == 3 and report.layout == "carla"
    text = report.text()
    assert "Road" in text and "Sky" in text and "50.000" in text and "OK" in text and "RGBA PNG (3)" in text
    assert report.class_shares_png.is_file() and report.samples_png.is_file()
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] and d["labels_found"] == [7, 13] and d["n_classes"] == 23
    shares = {r["name"]: r["percent"] for r in d["class_shares"]}
    assert shares["Road"] == 50.0 and shares["Sky"] == 50.0 and shares["Unlabeled"] == 0.0


def test_check_collects_all_errors(tmp_path):
    make_carla(tmp_path, names=("000001", "000002", "000003", "000004"))
    (tmp_path / "CameraRGB" / "000002.png").write_bytes(b"nope")
    (tmp_path / "CameraMask" / "000003.png").unlink()
    m = np.zeros((H, W, 4), np.uint8)
    m[..., 0] = 40
    m[..., 3] = 255
    Image.fromarray(m).save(tmp_path / "CameraMask" / "000004.png")
    report = check_folder(tmp_path)
    errs = "\n".join(report.errors)
    assert not report.ok
    assert "CameraRGB/000002.png" in errs and "CameraRGB/000003.png" in errs and "CameraMask/000004.png" in errs
    assert "label 40 (48 px)" in errs and "FAILED: 3 error(s)" in report.text()


def test_cli_data_check_exit_codes(tmp_path, capsys):
    cli = pytest.importorskip("unetseg.cli")
    make_carla(tmp_path / "good")
    assert cli.main(["data", "check", str(tmp_path / "good"), "--out", str(tmp_path / "o")]) == 0
    assert "Road" in capsys.readouterr().out
    make_carla(tmp_path / "bad")
    (tmp_path / "bad" / "CameraMask" / "000001.png").write_bytes(b"")
    assert cli.main(["data", "check", str(tmp_path / "bad"), "--out", str(tmp_path / "o"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert cli.main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real data


# Shares of pixels from ../shared/data/carla/README.md, in percent.
README_SHARES = {"Road": 42.580, "Sky": 34.302, "Vegetation": 6.466, "Building": 4.738, "Terrain": 3.910,
                 "SideWalk": 2.256, "Pole": 0.360, "Pedestrian": 0.044, "TrafficSign": 0.014, "Water": 0.006,
                 "Unlabeled": 0.0}


@pytest.fixture(scope="module")
def carla_data(carla):
    # ``carla`` (tests/conftest.py) is the real folder, from $UNETSEG_CARLA_DIR or ../shared/data/carla;
    # the test is skipped when it is absent. One load serves every real-data test here.
    return load_dataset(carla, size=(96, 128), resize_mode="lab", progress=False)


@pytest.mark.realdata
def test_real_carla_count_and_class_shares(carla_data):
    data = carla_data
    assert len(data) == 542 and data.layout == "carla" and data.images.shape == (542, 3, 96, 128)
    counts = data.label_counts.sum(0)  # at the files' native 320x240, like the README
    assert int(counts.sum()) == 41_625_600
    share = 100.0 * counts.double() / counts.sum()
    for name, pct in README_SHARES.items():
        assert float(share[CARLA.names.index(name)]) == pytest.approx(pct, abs=0.01), name
    assert sorted(torch.nonzero(counts[:23]).flatten().tolist()) == list(range(1, 23))  # README: 1..22


@pytest.mark.realdata
def test_real_carla_split_keeps_runs_together(carla_data):
    split = split_by_sequence(carla_data.names, val_fraction=0.2, seed=0)
    assert split.groups == 34 and not split.by_frame
    assert abs(len(split.val) / 542 - 0.2) < 0.03
    nums = sorted((int(n), n in set(split.val_names)) for n in carla_data.names)
    for (a, va), (b, vb) in zip(nums, nums[1:], strict=False):
        if b - a <= 20:
            assert va == vb, (a, b)  # neighbours never straddle train and validation
