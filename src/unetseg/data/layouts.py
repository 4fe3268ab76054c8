"""Folder layouts, file pairing and decoding of single images and masks.

Three layouts are understood, each a folder with two subfolders paired by file *stem* (``a.jpg`` pairs with
``a.png``), never by listing order:

=========  ==========================  ===========================================================
layout     subfolders                  where the class index is
=========  ==========================  ===========================================================
carla      ``CameraRGB/ CameraMask/``  channel 0 of the mask (the DeepLearning.AI lab); channels
                                       1-2 must be 0, which is checked
lyft       ``CameraRGB/ CameraSeg/``   the red channel (Lyft-Udacity challenge); G, B ignored
generic    ``images/ masks/``          the value of an 8-bit ``L`` mask, the palette *index* of a
                                       ``P`` mask, channel 0 of a grey RGB(A) mask, or a colour
                                       looked up in a palette file (JSON or CSV, name -> RGB)
=========  ==========================  ===========================================================

``layout="auto"`` picks the one whose subfolders exist. Images may be PNG, JPEG, BMP, TIFF or WebP in
RGB, RGBA (alpha dropped, as ``tf.image.decode_png(channels=3)`` does), grey or 16-bit; they are always
returned as ``(H, W, 3)`` uint8 RGB.

Every full decode of a file adds one to :data:`DECODE_COUNT`, so tests can prove that a cached or
in-memory dataset decodes nothing.

Example:
    >>> from unetseg.data.layouts import find_pairs, read_image, read_mask
    >>> pairs, layout = find_pairs("data")          # doctest: +SKIP
    >>> layout, pairs[0].name                        # doctest: +SKIP
    ('carla', '000026')
    >>> read_image(pairs[0].image).shape             # doctest: +SKIP
    (240, 320, 3)
    >>> read_mask(pairs[0].mask, layout).max()       # doctest: +SKIP
    13
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..classes import CARLA, ClassTable, distinct_colors
from ..errors import UnetsegError

#: Number of image/mask files fully decoded by this process (see :func:`read_image`, :func:`read_mask`).
DECODE_COUNT = 0
_count_lock = threading.Lock()  # decoding runs in a thread pool; ``+=`` on a global is not atomic

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# JPEG is lossy: compression noise turns a label 7 into 6 or 8 along every edge, so such masks are refused.
LOSSY_MASK_EXTS = (".jpg", ".jpeg")

#: layout name -> (image subfolder, mask subfolder)
LAYOUTS: dict[str, tuple[str, str]] = {
    "carla": ("CameraRGB", "CameraMask"),
    "lyft": ("CameraRGB", "CameraSeg"),
    "generic": ("images", "masks"),
}
LAYOUT_CHOICES = ("auto", *LAYOUTS)
MAX_LISTED = 10  # how many file names an error message lists before "… and N more"


@dataclass
class Pair:
    """One frame: its name (the shared file stem), image path and mask path (``None``: no mask)."""

    name: str
    image: Path
    mask: Path | None


@dataclass
class Scan:
    """What :func:`scan_folder` found; nothing is decoded.

    ``unpaired_images``/``unpaired_masks`` are files without a partner, ``ignored`` files that are not
    images (``.DS_Store``, ``notes.txt``, subfolders) and ``errors`` problems that make pairing
    impossible (two images with one stem, JPEG masks).
    """

    root: Path
    layout: str
    image_dir: Path
    mask_dir: Path
    pairs: list[Pair]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def list_files(names: list[Path], what: str = "") -> str:
    """``a, b, c … and 7 more`` for error messages."""
    shown = ", ".join(str(p) for p in names[:MAX_LISTED])
    more = f" … and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{what}{shown}{more}"


def _subdirs(root: Path) -> dict[str, Path]:
    """Subfolders by lower-case name, so ``Images/`` or ``cameraRGB/`` are found too."""
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}


def detect_layout(root: str | Path) -> str:
    """Name of the layout whose two subfolders exist under ``root``; ``UnetsegError`` if none or several.

    Example: a folder holding ``CameraRGB/`` and ``CameraMask/`` gives ``"carla"``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UnetsegError(f"{root}: folder not found")
    subs = _subdirs(root)
    found = [name for name, (img, msk) in LAYOUTS.items() if img.lower() in subs and msk.lower() in subs]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UnetsegError(
            f"{root}: matches several layouts ({', '.join(found)}); choose one with --layout "
            + "|".join(found)
        )
    expected = "; ".join(f"{img}/ + {msk}/ ({name})" for name, (img, msk) in LAYOUTS.items())
    hint = ""
    if root.name.lower() in {"camerargb", "cameramask", "cameraseg", "images", "masks"}:
        hint = f" You pointed at a subfolder: give its parent folder {root.parent} instead."
    else:
        # A folder one level down may hold the layout (the Lyft-Udacity download has dataA/ … dataE/).
        nested = [p for p in subs.values() if any(
            {a.lower(), b.lower()} <= set(_subdirs(p)) for a, b in LAYOUTS.values())]
        if nested:
            hint = " These subfolders have a known layout: " + ", ".join(str(p) for p in nested) + "."
    have = ", ".join(p.name + "/" for p in subs.values()) or "no subfolders"
    raise UnetsegError(f"{root}: no known dataset layout. Expected subfolders {expected}; "
                       f"found {have}.{hint}")


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def list_images(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Image files in ``folder`` sorted by name, and the other entries (hidden, non-image, subfolders).

    Only the extension is looked at; a ``.png`` that is not a PNG is caught when it is decoded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnetsegError(f"{folder}: folder not found")
    images, other = [], []
    for p in sorted(folder.iterdir()):
        (images if _is_image_file(p) else other).append(p)
    return images, other


def _by_stem(files: list[Path], errors: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            errors.append(f"{out[p.stem]} and {p}: two files with the name {p.stem!r}; keep one")
        else:
            out[p.stem] = p
    return out


def scan_folder(root: str | Path, layout: str = "auto", require_masks: bool = True) -> Scan:
    """List and pair the files of a dataset folder without decoding anything.

    ``require_masks=False`` accepts a missing mask folder or missing masks (``Pair.mask`` is ``None``),
    for prediction. Problems are collected in the returned :class:`Scan`, not raised, except a missing
    folder or unknown layout.
    """
    root = Path(root)
    if layout not in LAYOUT_CHOICES:
        raise UnetsegError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")
    if not root.is_dir():
        raise UnetsegError(f"{root}: folder not found")
    if layout == "auto":
        try:
            layout = detect_layout(root)
        except UnetsegError:
            img_only = [n for n, (i, _) in LAYOUTS.items() if i.lower() in _subdirs(root)]
            if require_masks or not img_only:
                raise
            layout = img_only[0]
    img_name, mask_name = LAYOUTS[layout]
    subs = _subdirs(root)
    if img_name.lower() not in subs or (require_masks and mask_name.lower() not in subs):
        raise UnetsegError(
            f"{root}: layout {layout!r} expects subfolders {img_name}/ and {mask_name}/; found "
            + (", ".join(p.name + "/" for p in subs.values()) or "no subfolders")
        )
    image_dir = subs[img_name.lower()]
    mask_dir = subs.get(mask_name.lower(), root / mask_name)
    errors: list[str] = []
    images, ignored = list_images(image_dir)
    masks, ignored_m = list_images(mask_dir) if mask_dir.is_dir() else ([], [])
    ignored += ignored_m
    for m in masks:
        if m.suffix.lower() in LOSSY_MASK_EXTS:
            errors.append(f"{m}: JPEG masks are lossy (compression changes class ids along edges); "
                          "save masks as PNG")
    img_by = _by_stem(images, errors)
    mask_by = _by_stem(masks, errors)
    if not images:
        what = f" (found only: {list_files(ignored)})" if ignored else ""
        errors.append(f"{image_dir}: no image files ({', '.join(IMAGE_EXTS)}){what}")
    pairs = [Pair(s, img_by[s], mask_by.get(s)) for s in sorted(img_by)]
    unpaired_images = [p.image for p in pairs if p.mask is None] if require_masks else []
    if require_masks:
        pairs = [p for p in pairs if p.mask is not None]
    unpaired_masks = [mask_by[s] for s in sorted(mask_by) if s not in img_by]
    if unpaired_images:
        errors.append(f"{len(unpaired_images)} image(s) without a mask in {mask_dir}: "
                      + list_files(unpaired_images))
    if unpaired_masks:
        errors.append(f"{len(unpaired_masks)} mask(s) without an image in {image_dir}: "
                      + list_files(unpaired_masks))
    return Scan(root, layout, image_dir, mask_dir, pairs, unpaired_images, unpaired_masks, ignored, errors)


def find_pairs(root: str | Path, layout: str = "auto", require_masks: bool = True) -> tuple[list[Pair], str]:
    """Pair images and masks of a dataset folder by file stem.

    Returns ``(pairs sorted by name, detected layout)``. Raises :class:`UnetsegError` for a missing or
    empty folder, an unknown layout, unpaired files (the message lists them) or duplicate stems.
    Non-image files are skipped; :func:`scan_folder` lists them.

    Example:
        >>> pairs, layout = find_pairs("data/carla")   # doctest: +SKIP
    """
    scan = scan_folder(root, layout, require_masks=require_masks)
    if scan.errors:
        raise UnetsegError("\n".join(scan.errors))
    return scan.pairs, scan.layout


# ---------------------------------------------------------------------------------------------- decoding


def _count_decode() -> None:
    global DECODE_COUNT
    with _count_lock:
        DECODE_COUNT += 1


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode a file with Pillow; corrupt, truncated or non-image files raise
    :class:`UnetsegError` naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnetsegError(f"{path}: empty file (0 bytes)")
        im = Image.open(path)
        im.load()  # Image.open only reads the header; truncation shows up here
    except UnetsegError:
        raise
    except FileNotFoundError:
        raise UnetsegError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise UnetsegError(f"{path}: not an image Pillow can read (wrong extension or corrupt file)"
                           ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnetsegError(f"{path}: corrupt or truncated image file ({e})") from None
    _count_decode()
    return im


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 16/32-bit or float intensities to uint8.

    Integer data is divided by the range of the smallest bit depth (8, 10, 12, 14, 16, 32) that holds its
    maximum, so 12-bit sensor data stored in a 16-bit file is not made 16 times darker; floats whose
    maximum is at most 1 are taken as 0..1, other floats as 0..255.
    """
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32))
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    a = a.astype(np.int64).clip(0, None)
    top = int(a.max(initial=0))
    bits = next((b for b in (8, 10, 12, 14, 16, 32) if top < 2**b), 32)
    return ((a * 255 + (2**bits - 1) // 2) // (2**bits - 1)).astype(np.uint8)


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> ``(H, W, 3)`` uint8 RGB (alpha dropped, grey repeated, 16-bit scaled)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode == "RGBA":
        # Drop alpha rather than composite: the lab's decode_png(channels=3) does the same.
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[..., :3])
    if mode in ("L", "LA", "1"):
        g = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode.startswith("I") or mode == "F":
        g = _to_uint8(np.asarray(im))
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)  # P, CMYK, YCbCr, LAB, …


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB. Raises :class:`UnetsegError` naming the file."""
    return image_to_rgb(open_image(path))


# ---------------------------------------------------------------------------------------------- palettes


@dataclass(frozen=True)
class Palette:
    """Class names and the RGB colour of each class id, read from a palette file.

    ``digest`` identifies the content (it is part of the dataset cache key).
    """

    classes: ClassTable
    source: str
    digest: str

    def lookup(self, rgb: np.ndarray, path: str | Path) -> np.ndarray:
        """``(H, W, 3)`` uint8 colours -> ``(H, W)`` uint8 class ids; unknown colours raise, naming
        ``path``, each colour and its pixel count."""
        codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        pal = np.asarray(self.classes.colors, dtype=np.int32).reshape(-1, 3)
        keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        order = np.argsort(keys)
        sorted_keys = keys[order]
        pos = np.searchsorted(sorted_keys, codes).clip(0, len(keys) - 1)
        ok = sorted_keys[pos] == codes
        if not ok.all():
            bad, counts = np.unique(codes[~ok], return_counts=True)
            top = np.argsort(-counts)[:MAX_LISTED]
            cols = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}): {n} px"
                             for c, n in zip(bad[top].tolist(), counts[top].tolist(), strict=True))
            more = f" and {len(bad) - len(top)} more colours" if len(bad) > len(top) else ""
            raise UnetsegError(f"{path}: {len(bad)} colour(s) not in palette {self.source}: {cols}{more}. "
                               "Add them to the palette or fix the mask (anti-aliased edges?)")
        return order[pos].astype(np.uint8)


def _parse_color(value: object, where: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        s = value.strip().lstrip("#")
        if len(s) == 6:
            try:
                return (int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16))
            except ValueError:
                pass
    elif isinstance(value, (list, tuple)) and len(value) == 3:
        try:
            rgb = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
            return rgb  # type: ignore[return-value]
    raise UnetsegError(f"{where}: colour {value!r} is not [r, g, b] (0-255) or '#rrggbb'")


def load_palette(path: str | Path) -> Palette:
    """Read a palette: class id = entry order, each entry a name and an RGB colour.

    Accepted forms (``"carla"`` gives the built-in CARLA 0.9.11 CityScapes colours):

    * JSON object ``{"Road": [128, 64, 128], "Sky": "#4682b4", …}``;
    * JSON list ``[{"name": "Road", "color": [128, 64, 128]}, …]`` or ``[["Road", [128, 64, 128]], …]``;
    * CSV rows ``name,r,g,b`` or ``id,name,r,g,b`` or ``name,#rrggbb`` (a header row is skipped).
    """
    if str(path).lower() == "carla":
        return Palette(CARLA, "carla (built-in)", "carla-0.9.11")
    path = Path(path)
    if not path.is_file():
        raise UnetsegError(f"{path}: palette file not found")
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    entries: list[tuple[str, tuple[int, int, int]]] = []
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UnetsegError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, dict):
            entries = [(str(k), _parse_color(v, f"{path}: {k}")) for k, v in obj.items()]
        elif isinstance(obj, list):
            for i, e in enumerate(obj):
                if isinstance(e, dict) and "name" in e and ("color" in e or "colour" in e):
                    entries.append((str(e["name"]), _parse_color(e.get("color", e.get("colour")),
                                                                 f"{path}: entry {i}")))
                elif isinstance(e, (list, tuple)) and len(e) == 2:
                    entries.append((str(e[0]), _parse_color(e[1], f"{path}: entry {i}")))
                else:
                    raise UnetsegError(f"{path}: entry {i} must be {{'name': …, 'color': [r, g, b]}}")
        else:
            raise UnetsegError(f"{path}: expected a JSON object name -> [r, g, b] or a list")
    else:
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        rows = [[c.strip() for c in r] for r in rows if not r[0].strip().startswith("#")]  # comments
        for i, r in enumerate(rows):
            where = f"{path}: line {i + 1}"
            if len(r) == 2:
                color: object = r[1]
                name = r[0]
            elif len(r) == 4:
                name, color = r[0], r[1:]
            elif len(r) == 5:
                name, color = r[1], r[2:]
            else:
                raise UnetsegError(f"{where}: expected name,r,g,b or id,name,r,g,b or name,#rrggbb")
            try:
                entries.append((name, _parse_color(color, where)))
            except UnetsegError:
                if i == 0:  # a header row such as "name,r,g,b"
                    continue
                raise
    if not entries:
        raise UnetsegError(f"{path}: no palette entries found")
    seen: dict[tuple[int, int, int], str] = {}
    for name, c in entries:
        if c in seen:
            raise UnetsegError(f"{path}: colour {c} is used by both {seen[c]!r} and {name!r}")
        seen[c] = name
    if len(entries) > 256:
        raise UnetsegError(f"{path}: {len(entries)} classes; at most 256 fit in uint8 masks")
    classes = ClassTable(tuple(n for n, _ in entries), tuple(c for _, c in entries))
    return Palette(classes, str(path), hashlib.sha256(raw).hexdigest()[:16])


def palette_or_none(palette: Palette | str | Path | None) -> Palette | None:
    """Accept a :class:`Palette`, a palette file path, ``"carla"`` or ``None``."""
    if palette is None or isinstance(palette, Palette):
        return palette
    return load_palette(palette)


# ---------------------------------------------------------------------------------------------- masks


def _index_from_int(a: np.ndarray, path: Path) -> np.ndarray:
    top = int(a.max(initial=0))
    if a.min(initial=0) < 0 or top > 255:
        raise UnetsegError(f"{path}: mask values up to {top}; class ids must be 0-255 (uint8)")
    return a.astype(np.uint8)


def mask_to_ids(im: Image.Image, layout: str, path: Path, palette: Palette | None = None) -> np.ndarray:
    """A decoded Pillow mask -> ``(H, W)`` uint8 class ids following ``layout``'s convention."""
    mode = im.mode
    if palette is not None:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return palette.lookup(rgb, path)
    if mode in ("L", "P"):
        # For P the array holds the palette *indices*, which are the class ids; the colours are display only.
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I"):
        return _index_from_int(np.asarray(im), path)
    if mode == "LA":
        return np.asarray(im, dtype=np.uint8)[..., 0]
    if mode not in ("RGB", "RGBA"):
        raise UnetsegError(f"{path}: mask mode {mode} is not supported; save masks as 8-bit PNG "
                           "(L, P or RGB)")
    a = np.asarray(im, dtype=np.uint8)
    ids = a[..., 0]
    if layout == "lyft":
        return np.ascontiguousarray(ids)  # Lyft-Udacity: class in R; G/B may carry other data
    rest = a[..., 1:3]
    if not rest.any():
        return np.ascontiguousarray(ids)
    if layout == "carla":
        ys, xs = np.nonzero(rest.any(axis=2))
        y, x = int(ys[0]), int(xs[0])
        raise UnetsegError(
            f"{path}: channels 1-2 (G, B) are non-zero at {len(ys)} pixels, e.g. "
            f"{tuple(a[y, x, :3].tolist())} at row {y}, column {x}; the CARLA lab layout keeps the class id "
            "in channel 0 only. If these are colour-coded masks, use --layout generic with --palette "
            "(e.g. --palette carla)")
    # generic: a grey mask saved as RGB is fine; real colours need a palette.
    if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        return np.ascontiguousarray(ids)
    rgb = a[..., :3].reshape(-1, 3)
    n_colors = len(np.unique(rgb[:: max(1, len(rgb) // 20000)], axis=0))
    raise UnetsegError(f"{path}: colour mask ({n_colors}+ distinct colours) but no palette; pass --palette "
                       "FILE (JSON or CSV, class name -> [r, g, b]) or save masks as 8-bit index PNGs")


def read_mask(path: str | Path, layout: str, palette: Palette | str | Path | None = None) -> np.ndarray:
    """Decode a mask file to ``(H, W)`` uint8 class ids using ``layout``'s convention (see module doc).

    ``layout="auto"`` takes the layout from the mask's folder name (``CameraMask`` carla, ``CameraSeg``
    lyft, anything else generic). ``palette`` (a :class:`Palette`, a palette file or ``"carla"``) maps
    colours to ids instead. Raises :class:`UnetsegError` naming the file for corrupt files, unexpected
    channels or unknown colours.
    """
    path = Path(path)
    if layout == "auto":
        folder = path.parent.name.lower()
        layout = next((n for n, (_, m) in LAYOUTS.items() if m.lower() == folder), "generic")
    if layout not in LAYOUTS:
        raise UnetsegError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")
    if path.suffix.lower() in LOSSY_MASK_EXTS:
        raise UnetsegError(f"{path}: JPEG masks are lossy (compression changes class ids along edges); "
                           "save masks as PNG")
    return mask_to_ids(open_image(path), layout, path, palette_or_none(palette))


def default_classes(layout: str) -> ClassTable | None:
    """The class table a layout implies (CARLA for both CARLA layouts), ``None`` for generic."""
    return CARLA if layout in ("carla", "lyft") else None


def resize_table(classes: ClassTable, n: int) -> ClassTable:
    """``classes`` cut to ``n`` entries or extended with ``class_i`` names and distinct colours."""
    if n <= len(classes):
        return ClassTable(classes.names[:n], classes.colors[:n])
    extra = range(len(classes), n)
    cols = distinct_colors(n)
    return ClassTable(classes.names + tuple(f"class_{i}" for i in extra),
                      classes.colors + tuple(cols[i] for i in extra))
