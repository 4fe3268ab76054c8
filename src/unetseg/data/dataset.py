"""Load a whole segmentation dataset into memory as uint8 tensors, decoding each file once.

Every image/mask pair is decoded and resized exactly once (in a thread pool: Pillow releases the GIL),
then kept as ``images (N, 3, H, W) uint8`` and ``masks (N, H, W) uint8``; training epochs index these
tensors and never touch the disk again. With ``cache_dir`` the decoded tensors are also saved to a
``.pt`` file keyed by a hash of the file list (paths, byte sizes, mtimes), target size, resize mode,
layout and palette, so the next run with the same inputs decodes nothing.

Resizing (``size=(H, W)``):

* ``resize_mode="lab"`` reproduces the DeepLearning.AI lab: ``tf.image.resize(method="nearest")`` for the
  image and the mask (half-pixel centres: source index ``floor((i + 0.5) * in / out)``), bit for bit;
* ``resize_mode="default"`` filters images (Pillow ``BOX``, i.e. area averaging, when shrinking;
  ``BILINEAR`` when enlarging) and still resizes masks with that same nearest rule.

Masks are never interpolated: a blend of labels 7 and 13 is not label 10.

Example:
    >>> from unetseg.data import load_dataset
    >>> data = load_dataset("data/carla", size=(96, 128), resize_mode="lab")   # doctest: +SKIP
    >>> data.images.shape, data.images.dtype, data.masks.shape, len(data.classes)  # doctest: +SKIP
    (torch.Size([542, 3, 96, 128]), torch.uint8, torch.Size([542, 96, 128]), 23)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..classes import ClassTable, generic_classes, load_class_names
from ..errors import UnetsegError
from . import layouts
from .layouts import Pair, Palette, default_classes, palette_or_none, resize_table, scan_folder

RESIZE_MODES = ("default", "lab")
CACHE_VERSION = 1  # bump when the decoded content for the same key would change
MAX_ERRORS_SHOWN = 20
PROGRESS_MIN_FILES = 64  # below this a progress bar is noise


@dataclass
class SegmentationData:
    """A dataset held in memory.

    ``images``: ``(N, 3, H, W)`` uint8 RGB; ``masks``: ``(N, H, W)`` uint8 class ids; ``names[i]`` the file
    stem of frame ``i``; ``classes`` the class table (``len(classes)`` = n_classes); ``layout`` the folder
    layout; ``root`` the dataset folder. ``pairs[i]`` are the source files, ``label_counts`` ``(N, 256)``
    int64 pixel counts per label at the files' native resolution, ``skipped`` non-image files that were
    ignored, ``from_cache`` whether the tensors came from the on-disk cache.
    """

    images: torch.Tensor
    masks: torch.Tensor
    names: list[str]
    classes: ClassTable
    layout: str
    root: Path
    pairs: list[Pair] = field(default_factory=list)
    label_counts: torch.Tensor | None = None
    skipped: list[Path] = field(default_factory=list)
    resize_mode: str = "default"
    from_cache: bool = False
    cache_file: Path | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (3, H, W) uint8, mask (H, W) uint8)`` of frame ``i``."""
        return self.images[i], self.masks[i]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: list[int]) -> SegmentationData:
        """The frames ``idx`` (in that order) as a new dataset; tensors are copied, not views."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return SegmentationData(
            images=self.images.index_select(0, t),
            masks=self.masks.index_select(0, t),
            names=[self.names[i] for i in idx],
            classes=self.classes,
            layout=self.layout,
            root=self.root,
            pairs=[self.pairs[i] for i in idx] if self.pairs else [],
            label_counts=None if self.label_counts is None else self.label_counts.index_select(0, t),
            skipped=list(self.skipped),
            resize_mode=self.resize_mode,
            from_cache=self.from_cache,
            cache_file=self.cache_file,
        )


# ---------------------------------------------------------------------------------------------- resizing


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for TF2 ``resize(method="nearest")`` (half-pixel centres).

    Mirrors TensorFlow's kernel: ``min(floor((i + 0.5) * (n_in / n_out)), n_in - 1)`` in float32.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` class ids -> ``size=(H, W)`` by nearest neighbour; values are copied, never blended."""
    h, w = mask.shape[:2]
    if (h, w) == tuple(size):
        return mask
    return mask[nearest_indices(h, size[0])[:, None], nearest_indices(w, size[1])[None, :]]


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str = "default") -> np.ndarray:
    """``(h, w, 3)`` uint8 -> ``(H, W, 3)`` uint8. ``"lab"``: nearest like the lab; ``"default"``: Pillow
    BOX (area average) when shrinking both sides, BILINEAR otherwise (Pillow's bilinear also widens its
    support on a shrinking side, so it does not alias)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    if mode == "lab":
        return image[nearest_indices(h, size[0])[:, None], nearest_indices(w, size[1])[None, :]]
    shrink = size[0] <= h and size[1] <= w
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample), dtype=np.uint8)


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise UnetsegError(f"size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise UnetsegError(f"size must be positive, got {h}x{w} (height x width)")
    return h, w


# ---------------------------------------------------------------------------------------------- classes


def resolve_classes(layout: str, n_classes: int | None, max_label: int, palette: Palette | None = None,
                    class_names: str | Path | None = None) -> ClassTable:
    """The class table for a dataset.

    Names come from ``class_names`` (a file for :func:`unetseg.classes.load_class_names`), else the
    palette, else CARLA for the CARLA layouts, else ``class_0 …``. ``n_classes=None`` means the length of
    that table, or ``max_label + 1`` for a generic dataset without names.
    """
    table: ClassTable | None = None
    source = ""
    if class_names is not None:
        table, source = load_class_names(class_names), str(class_names)
        if palette is not None:
            if len(palette.classes) != len(table):
                raise UnetsegError(f"{class_names}: {len(table)} class names but palette {palette.source} "
                                   f"has {len(palette.classes)} colours")
            table = ClassTable(table.names, palette.classes.colors)
    elif palette is not None:
        table, source = palette.classes, palette.source
    if n_classes is not None and n_classes < 1:
        raise UnetsegError(f"n_classes must be at least 1, got {n_classes}")
    if table is not None:
        if n_classes is not None and n_classes != len(table):
            raise UnetsegError(f"{source}: lists {len(table)} classes but n_classes is {n_classes}; "
                               "make them agree")
        return table
    builtin = default_classes(layout)
    if builtin is not None:
        return builtin if n_classes is None else resize_table(builtin, n_classes)
    return generic_classes(max_label + 1 if n_classes is None else n_classes)


def label_errors(label_counts: np.ndarray, paths: list[Path], n_classes: int) -> list[str]:
    """One message per mask holding labels ``>= n_classes``: the file, each bad value and its pixel count."""
    bad_rows = np.nonzero(label_counts[:, n_classes:].sum(axis=1))[0]
    out = []
    for r in bad_rows.tolist():
        vals = np.nonzero(label_counts[r, n_classes:])[0] + n_classes
        desc = ", ".join(f"{v} ({int(label_counts[r, v])} px)" for v in vals.tolist())
        out.append(f"{paths[r]}: label {desc} >= n_classes {n_classes}")
    return out


# ---------------------------------------------------------------------------------------------- cache


def cache_key(pairs: list[Pair], root: Path, layout: str, size: tuple[int, int] | None, resize_mode: str,
              palette: Palette | None) -> str:
    """sha256 over everything that determines the decoded tensors (not the pixel data: stat is enough)."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, layout, size, resize_mode,
                         palette.digest if palette else None]).encode())
    for p in pairs:
        for f in (p.image, p.mask):
            if f is None:
                h.update(b"-\n")
                continue
            st = f.stat()
            h.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_cache(path: Path, key: str) -> dict | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a half-written or foreign file is rebuilt, not fatal
        warnings.warn(f"{path}: unreadable dataset cache ({e}); decoding again", stacklevel=3)
        return None
    if not isinstance(obj, dict) or obj.get("key") != key or obj.get("version") != CACHE_VERSION:
        return None
    return obj


def _save_cache(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache


# ---------------------------------------------------------------------------------------------- loading


def decode_workers() -> int:
    """Threads for decoding: Pillow releases the GIL while inflating, and file reads overlap, so a few
    more threads than cores keep a small machine busy (measured: 4 threads beat 2 on 2 cores)."""
    return min(8, max(4, os.cpu_count() or 1))


def _format_errors(root: Path, errors: list[str]) -> str:
    head = f"{len(errors)} problem(s) in {root}:" if len(errors) > 1 else ""
    shown = errors[:MAX_ERRORS_SHOWN]
    more = [f"… and {len(errors) - MAX_ERRORS_SHOWN} more"] if len(errors) > MAX_ERRORS_SHOWN else []
    return "\n  ".join([head, *shown, *more]).strip() if head else shown[0]


def _header_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise UnetsegError(f"{path}: file not found") from None
    except Exception as e:
        raise UnetsegError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
    return h, w


def decode_pair(pair: Pair, layout: str, palette: Palette | None = None, size: tuple[int, int] | None = None,
                resize_mode: str = "default") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode, check and resize one pair.

    Returns ``(image (H, W, 3) uint8, mask (H, W) uint8, label counts (256,) int64 at native size)``.
    Raises :class:`UnetsegError` naming the file for unreadable files or an image/mask size mismatch.
    """
    image = layouts.read_image(pair.image)
    if pair.mask is None:
        raise UnetsegError(f"{pair.image}: no mask")
    mask = layouts.read_mask(pair.mask, layout, palette)
    if image.shape[:2] != mask.shape:
        raise UnetsegError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {pair.image} is "
                           f"{image.shape[1]}x{image.shape[0]} (width x height); they must match")
    counts = np.bincount(mask.reshape(-1), minlength=256).astype(np.int64)
    if size is not None:
        image = resize_image(image, size, resize_mode)
        mask = resize_mask(mask, size)
    return image, mask, counts


def _decode_all(
    pairs: list[Pair], layout: str, palette: Palette | None, size: tuple[int, int], resize_mode: str,
    progress: bool, root: Path,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    n = len(pairs)
    h, w = size
    images = torch.empty((n, 3, h, w), dtype=torch.uint8)
    masks = torch.empty((n, h, w), dtype=torch.uint8)
    counts = np.zeros((n, 256), dtype=np.int64)
    img_np, mask_np = images.numpy(), masks.numpy()  # views: workers write straight into the tensors
    errors: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            image, mask, c = decode_pair(pairs[i], layout, palette, size, resize_mode)
        except UnetsegError as e:
            errors[i] = str(e)
            return
        if image.shape[:2] != (h, w):  # native size (size=None) that differs from the common one
            errors[i] = (f"{pairs[i].image}: {image.shape[1]}x{image.shape[0]} differs from the "
                         f"{w}x{h} of the other frames (width x height); pass --size H W to resize all")
            return
        img_np[i] = image.transpose(2, 0, 1)
        mask_np[i] = mask
        counts[i] = c

    from tqdm.auto import tqdm

    workers = decode_workers()
    bar = tqdm(total=n, desc=f"decoding {root.name or root}", unit="pair",
               disable=not progress or n < PROGRESS_MIN_FILES, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in as_completed([pool.submit(work, i) for i in range(n)]):
            fut.result()
            bar.update(1)
    bar.close()
    if errors:
        raise UnetsegError(_format_errors(root, [errors[i] for i in sorted(errors)]))
    return images, masks, counts


def _common_size(pairs: list[Pair], root: Path) -> tuple[int, int]:
    """The one native ``(H, W)`` all images share, read from headers; else an error naming odd files."""
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        futures = [pool.submit(_header_size, p.image) for p in pairs]
    sizes, errors = [], []
    for f in futures:
        try:
            sizes.append(f.result())
        except UnetsegError as e:
            sizes.append(None)
            errors.append(str(e))
    if errors:
        raise UnetsegError(_format_errors(root, errors))
    common, _ = Counter(sizes).most_common(1)[0]
    odd = [(p.image, s) for p, s in zip(pairs, sizes, strict=True) if s != common]
    if odd:
        listed = ", ".join(f"{p} ({s[1]}x{s[0]})" for p, s in odd[:layouts.MAX_LISTED])
        more = f" … and {len(odd) - layouts.MAX_LISTED} more" if len(odd) > layouts.MAX_LISTED else ""
        raise UnetsegError(f"{root}: frames differ in size; most are {common[1]}x{common[0]} (width x height)"
                           " "
                           f"but {len(odd)} are not: {listed}{more}. Pass --size H W (e.g. --size "
                           f"{common[0]} {common[1]}) to resize every frame")
    return common


def load_dataset(root: str | Path, size: tuple[int, int] | None = None, resize_mode: str = "default",
                 n_classes: int | None = None, layout: str = "auto", palette: str | Path | None = None,
                 class_names: str | Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True) -> SegmentationData:
    """Decode a dataset folder into memory (see the module doc for layouts, resizing and the cache).

    ``size=(H, W)`` in pixels, or ``None`` to keep the native size (all frames must then share one).
    ``n_classes=None`` takes the class table's length (23 for CARLA) or, without names, max label + 1;
    labels ``>= n_classes`` raise :class:`UnetsegError` naming the files, values and pixel counts.
    Unreadable, missing or mismatched files raise one :class:`UnetsegError` listing every problem.

    Example:
        >>> data = load_dataset("data/carla", size=(96, 128), cache_dir=".cache")  # doctest: +SKIP
    """
    root = Path(root)
    if resize_mode not in RESIZE_MODES:
        raise UnetsegError(f"unknown resize mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    size = _check_size(size)
    scan = scan_folder(root, layout)
    if scan.errors:
        raise UnetsegError(_format_errors(root, scan.errors))
    if scan.ignored:
        warnings.warn(f"{root}: ignored {len(scan.ignored)} non-image entr(y/ies): "
                      + layouts.list_files(scan.ignored), stacklevel=2)
    pairs, layout = scan.pairs, scan.layout
    pal = palette_or_none(palette)

    obj = None
    cache_file = None
    if cache_dir is not None:
        key = cache_key(pairs, root, layout, size, resize_mode, pal)
        cache_file = Path(cache_dir) / f"{root.resolve().name or 'data'}-{key[:20]}.pt"
        if cache_file.is_file():
            obj = _load_cache(cache_file, key)
    from_cache = obj is not None
    if obj is not None:
        images, masks, counts = obj["images"], obj["masks"], obj["label_counts"].numpy()
    else:
        target = size if size is not None else _common_size(pairs, root)
        images, masks, counts = _decode_all(pairs, layout, pal, target, resize_mode, progress, root)
        if cache_file is not None:
            _save_cache(cache_file, {"version": CACHE_VERSION, "key": key, "images": images, "masks": masks,
                                     "label_counts": torch.from_numpy(counts),
                                     "names": [p.name for p in pairs]})

    present = np.nonzero(counts.sum(axis=0))[0]
    max_label = int(present.max()) if len(present) else 0
    classes = resolve_classes(layout, n_classes, max_label, pal, class_names)
    bad = label_errors(counts, [p.mask for p in pairs], len(classes))
    if bad:
        fix = (f"fix the masks or pass --classes {max_label + 1}" if class_names is None and pal is None
               else "fix the masks or the class list")
        raise UnetsegError(f"{len(bad)} mask(s) hold labels outside 0..{len(classes) - 1} "
                           f"(max label found: {max_label}); {fix}:\n  " + "\n  ".join(bad[:MAX_ERRORS_SHOWN])
                           + (f"\n  … and {len(bad) - MAX_ERRORS_SHOWN} more" if len(bad) > MAX_ERRORS_SHOWN
                              else ""))
    return SegmentationData(images=images, masks=masks, names=[p.name for p in pairs], classes=classes,
                            layout=layout, root=root, pairs=list(pairs),
                            label_counts=torch.from_numpy(counts),
                            skipped=list(scan.ignored), resize_mode=resize_mode, from_cache=from_cache,
                            cache_file=cache_file)
