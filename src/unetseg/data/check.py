"""``unetseg data check``: inspect a dataset folder and report every problem at once.

Decodes every file at its native resolution (frames may differ in size; nothing is resized or kept in
memory except a few samples) and reports counts, sizes, PNG/JPEG modes, unpaired and ignored files, the
label values found (by class name), masks with labels ``>= n_classes``, and the share of pixels per class.
With ``out_dir`` it also writes ``class_shares.png`` (bar chart) and ``samples.png`` (image | colourised
mask for a few evenly spaced frames). Problems are collected, not raised: ``report.ok`` is False when
there are errors, and the CLI then exits with status 1.

Example:
    >>> from unetseg.data import check_folder
    >>> report = check_folder("data/carla", out_dir="check")   # doctest: +SKIP
    >>> print(report.text())                                   # doctest: +SKIP
    >>> report.ok, report.pairs                                # doctest: +SKIP
    (True, 542)
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import ClassTable, colorize, generic_classes
from ..errors import UnetsegError
from . import layouts
from .dataset import PROGRESS_MIN_FILES, decode_workers, label_errors, resolve_classes
from .layouts import LAYOUTS, Pair, Palette, open_image, palette_or_none, scan_folder

MAX_TEXT_ERRORS = 30


@dataclass
class CheckReport:
    """Result of :func:`check_folder`. Pixel counts are at each file's native resolution."""

    root: Path
    layout: str
    pairs: int
    images: int
    masks: int
    image_sizes: dict[str, int]  # "WxH" -> number of images
    mask_sizes: dict[str, int]
    image_modes: dict[str, int]  # "RGBA PNG" -> number of images
    mask_modes: dict[str, int]
    unpaired_images: list[str]
    unpaired_masks: list[str]
    ignored: list[str]
    label_pixels: dict[int, int]  # label value -> pixels over all masks
    label_masks: dict[int, int]  # label value -> number of masks holding it
    n_classes: int
    classes: ClassTable
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    class_shares_png: Path | None = None
    samples_png: Path | None = None
    masks_read: int = 0  # masks decoded without error (the pixel counts cover these)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def total_pixels(self) -> int:
        return int(sum(self.label_pixels.values()))

    def class_name(self, label: int) -> str:
        return self.classes.names[label] if label < len(self.classes) else f"<label {label}: not a class>"

    def shares(self) -> list[tuple[int, str, int, float]]:
        """``(id, name, pixels, percent)`` for every class and every stray label, largest share first."""
        total = max(self.total_pixels, 1)
        ids = set(range(self.n_classes)) | set(self.label_pixels)
        px = {i: self.label_pixels.get(i, 0) for i in ids}
        rows = [(i, self.class_name(i), px[i], 100.0 * px[i] / total) for i in ids]
        return sorted(rows, key=lambda r: (-r[2], r[0]))

    def to_dict(self) -> dict:
        """JSON-ready summary (paths as strings)."""
        return {
            "ok": self.ok, "root": str(self.root), "layout": self.layout, "pairs": self.pairs,
            "images": self.images, "masks": self.masks, "image_sizes": self.image_sizes,
            "mask_sizes": self.mask_sizes, "image_modes": self.image_modes, "mask_modes": self.mask_modes,
            "unpaired_images": self.unpaired_images, "unpaired_masks": self.unpaired_masks,
            "ignored": self.ignored, "n_classes": self.n_classes, "total_pixels": self.total_pixels,
            "masks_read": self.masks_read,
            "labels_found": sorted(self.label_pixels),
            "class_shares": [{"id": i, "name": n, "pixels": p, "percent": round(s, 4), "masks":
                              self.label_masks.get(i, 0)} for i, n, p, s in self.shares()],
            "errors": self.errors, "warnings": self.warnings,
            "class_shares_png": str(self.class_shares_png) if self.class_shares_png else None,
            "samples_png": str(self.samples_png) if self.samples_png else None,
        }

    def text(self) -> str:
        """Human-readable report: counts, sizes, modes, unpaired files, labels by name, class-share table."""
        def counted(d: dict[str, int]) -> str:
            return ", ".join(f"{k} ({v})" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"

        img_dir, mask_dir = LAYOUTS.get(self.layout, ("?", "?"))
        lines = [
            f"dataset   {self.root}  (layout {self.layout}: {img_dir}/ + {mask_dir}/)",
            f"pairs     {self.pairs}   images {self.images}   masks {self.masks}",
            f"images    sizes (WxH): {counted(self.image_sizes)}",
            f"          modes: {counted(self.image_modes)}",
            f"masks     sizes (WxH): {counted(self.mask_sizes)}",
            f"          modes: {counted(self.mask_modes)}",
        ]
        listed = (("unpaired images", self.unpaired_images), ("unpaired masks", self.unpaired_masks),
                  ("ignored (not images)", self.ignored))
        for title, names in listed:
            if names:
                lines.append(f"{title} ({len(names)}): {layouts.list_files(names)}")
        found = sorted(self.label_pixels)
        stray = [v for v in found if v >= self.n_classes]
        lines.append(f"labels    {len(found)} values found, n_classes {self.n_classes}"
                     + (f"; {len(stray)} outside 0..{self.n_classes - 1}: {stray}" if stray else ""))
        absent = [f"{i} {self.classes.names[i]}" for i in range(min(self.n_classes, len(self.classes)))
                  if i not in self.label_pixels]
        if absent:
            lines.append(f"          never present: {', '.join(absent)}")
        lines.append("")
        lines.append(f"share of pixels per class ({self.total_pixels:,} pixels in {self.masks_read} masks)")
        width = max([len(n) for _, n, _, _ in self.shares()] + [5])
        lines.append(f"  {'id':>3}  {'class':<{width}}  {'pixels':>13}  {'%':>7}  {'masks':>6}")
        for i, name, px, pct in self.shares():
            n_masks = self.label_masks.get(i, 0)
            lines.append(f"  {i:>3}  {name:<{width}}  {px:>13,}  {pct:>7.3f}  {n_masks:>6}")
        if self.class_shares_png or self.samples_png:
            lines.append("")
            plots = [str(p) for p in (self.class_shares_png, self.samples_png) if p]
            lines.append("plots     " + ", ".join(plots))
        if self.warnings:
            lines.append("")
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  - {w}" for w in self.warnings]
        lines.append("")
        if self.errors:
            lines.append(f"errors ({len(self.errors)}):")
            lines += [f"  - {e}" for e in self.errors[:MAX_TEXT_ERRORS]]
            if len(self.errors) > MAX_TEXT_ERRORS:
                lines.append(f"  … and {len(self.errors) - MAX_TEXT_ERRORS} more (see --json)")
            lines.append(f"FAILED: {len(self.errors)} error(s)")
        else:
            lines.append("OK: no problems found")
        return "\n".join(lines)


@dataclass
class _Inspected:
    image_size: str | None = None
    image_mode: str | None = None
    mask_size: str | None = None
    mask_mode: str | None = None
    counts: np.ndarray | None = None
    errors: list[str] = field(default_factory=list)
    sample: tuple[np.ndarray, np.ndarray] | None = None


def _inspect(pair: Pair, layout: str, palette: Palette | None, keep: bool) -> _Inspected:
    out = _Inspected()
    image = mask = None
    try:
        im = open_image(pair.image)
        out.image_size, out.image_mode = f"{im.width}x{im.height}", f"{im.mode} {im.format or '?'}"
        image = layouts.image_to_rgb(im)
    except UnetsegError as e:
        out.errors.append(str(e))
    # A JPEG mask is already reported by scan_folder; decoding it would only repeat the error.
    if pair.mask is not None and pair.mask.suffix.lower() not in layouts.LOSSY_MASK_EXTS:
        try:
            mk = open_image(pair.mask)
            out.mask_size, out.mask_mode = f"{mk.width}x{mk.height}", f"{mk.mode} {mk.format or '?'}"
            mask = layouts.mask_to_ids(mk, layout, pair.mask, palette)
            out.counts = np.bincount(mask.reshape(-1), minlength=256).astype(np.int64)
        except UnetsegError as e:
            out.errors.append(str(e))
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        out.errors.append(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {pair.image} is "
                          f"{image.shape[1]}x{image.shape[0]} (width x height); they must match")
    if keep and image is not None and mask is not None:
        out.sample = (image, mask)
    return out


def _plot_shares(report: CheckReport, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.shares()
    fig = Figure(figsize=(7, 0.28 * len(rows) + 1.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas directly: no pyplot, no global backend switch for the caller
    ax = fig.add_subplot(1, 1, 1)
    colors = [np.asarray(report.classes.colors[i]) / 255 if i < len(report.classes) else (1, 0, 0)
              for i, _, _, _ in rows]
    ypos = np.arange(len(rows))[::-1]
    ax.barh(ypos, [r[3] for r in rows], color=colors, edgecolor="0.3", linewidth=0.5)
    ax.set_yticks(ypos, [f"{i} {n}" for i, n, _, _ in rows], fontsize=8)
    for y, r in zip(ypos, rows, strict=True):
        ax.text(r[3], y, f" {r[3]:.3f}%", va="center", fontsize=7)
    ax.set_xlabel("share of pixels (%)")
    ax.set_title(f"{report.root.name}: {report.total_pixels:,} pixels, {report.masks_read} masks", fontsize=9)
    ax.set_xlim(0, max([r[3] for r in rows] + [1]) * 1.18)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_samples(samples: list[tuple[str, np.ndarray, np.ndarray]], classes: ClassTable, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    aspect = max(s[1].shape[0] / s[1].shape[1] for s in samples)
    fig = Figure(figsize=(8, 4 * aspect * len(samples) + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    for r, (name, image, mask) in enumerate(samples):
        for c, (pic, title) in enumerate(((image, f"{name}"), (colorize(mask, classes), f"{name} mask"))):
            ax = fig.add_subplot(len(samples), 2, 2 * r + c + 1)
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def check_folder(root: str | Path, n_classes: int | None = None, layout: str = "auto",
                 palette: str | Path | None = None, class_names: str | Path | None = None,
                 out_dir: str | Path | None = None, samples: int = 4, progress: bool = True) -> CheckReport:
    """Inspect a dataset folder and return a :class:`CheckReport` (see the module doc).

    Only a missing folder, an unknown layout or an unreadable palette/class-name file raise
    :class:`UnetsegError`; every problem with the data itself is collected in ``report.errors``.
    ``out_dir`` receives ``class_shares.png`` and ``samples.png`` (``samples`` frames; 0 for none).
    ``progress`` shows a progress bar (stderr) for folders of 64 pairs or more.
    """
    root = Path(root)
    scan = scan_folder(root, layout)
    pal = palette_or_none(palette)
    errors = list(scan.errors)
    warns = []
    if scan.ignored:
        warns.append(f"{len(scan.ignored)} non-image entr(y/ies) ignored: {layouts.list_files(scan.ignored)}")
    pairs = scan.pairs
    n = len(pairs)
    # Evenly spaced sample frames, so a run of near-identical frames does not fill the grid.
    k = min(max(samples, 0), n)
    keep = set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if n else set()

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        jobs = pool.map(lambda i: _inspect(pairs[i], scan.layout, pal, i in keep), range(n))
        results = list(tqdm(jobs, total=n, desc=f"checking {root.name or root}", unit="pair", leave=False,
                            disable=not progress or n < PROGRESS_MIN_FILES))

    counts = np.zeros((n, 256), dtype=np.int64)
    for i, r in enumerate(results):
        errors += r.errors
        if r.counts is not None:
            counts[i] = r.counts
    totals = counts.sum(axis=0)
    present = np.nonzero(totals)[0]
    max_label = int(present.max()) if len(present) else 0
    try:
        classes = resolve_classes(scan.layout, n_classes, max_label, pal, class_names)
    except UnetsegError as e:
        if class_names is not None and not Path(class_names).is_file():
            raise
        errors.append(str(e))
        classes = generic_classes(n_classes or max_label + 1)
    n_cls = len(classes)
    errors += label_errors(counts, [p.mask for p in pairs], n_cls)
    if n == 0 and not scan.errors:
        errors.append(f"{scan.image_dir}: no image/mask pairs")

    report = CheckReport(
        root=root, layout=scan.layout, pairs=n,
        images=n + len(scan.unpaired_images), masks=n + len(scan.unpaired_masks),
        image_sizes=dict(Counter(r.image_size for r in results if r.image_size)),
        mask_sizes=dict(Counter(r.mask_size for r in results if r.mask_size)),
        image_modes=dict(Counter(r.image_mode for r in results if r.image_mode)),
        mask_modes=dict(Counter(r.mask_mode for r in results if r.mask_mode)),
        unpaired_images=[str(p) for p in scan.unpaired_images],
        unpaired_masks=[str(p) for p in scan.unpaired_masks],
        ignored=[str(p) for p in scan.ignored],
        label_pixels={int(v): int(totals[v]) for v in present},
        label_masks={int(v): int((counts[:, v] > 0).sum()) for v in present},
        n_classes=n_cls, classes=classes, errors=errors, warnings=warns,
        masks_read=sum(r.counts is not None for r in results),
    )
    if len(report.image_sizes) > 1:
        report.warnings.append(f"images come in {len(report.image_sizes)} sizes; train with --size H W")
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            if report.total_pixels:
                report.class_shares_png = _plot_shares(report, out / "class_shares.png")
            picked = [(pairs[i].name, *results[i].sample) for i in sorted(keep) if results[i].sample is not None]
            if picked:
                report.samples_png = _plot_samples(picked, classes, out / "samples.png")
        except OSError as e:
            raise UnetsegError(f"{out}: cannot write the check plots ({e}); choose another folder with --out"
                               ) from None
    return report
