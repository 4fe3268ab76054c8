"""Inference from a checkpoint: class-index masks at each input's own resolution.

A checkpoint carries the model config, class names and preprocessing, so nothing else is needed. Frames
are resized as in training, run in batches on the fast path (bf16 autocast where the CPU does bf16
natively, channels_last), and the logits are resized back to the input's size before the argmax.

``predict`` writes, for each input image ``NAME``::

    OUT/masks/NAME.png     class indices, PNG mode L, the input's size
    OUT/color/NAME.png     colourised mask
    OUT/overlay/NAME.png   mask blended over the image
    OUT/triplet/NAME.png   input | true mask | predicted mask (when a true mask is known)

Example:
    >>> from unetseg import predict
    >>> predict("runs/demo/best.pt", ["scenes/CameraRGB"], "preds")  # doctest: +SKIP
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .classes import ClassTable
from .errors import UnetsegError
from .model import forward_full, model_from_checkpoint
from .runtime import pick_device, prepare_model_for_inference, set_threads


def load_model_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint (``.pt`` file or run folder) or an export of ``unetseg export`` (its folder, an ``.onnx``
    file in it or its oneDNN ``model.int8.pt``), as the dict that ``Predictor`` takes."""
    from .export import ONEDNN_INT8_FILE

    p = Path(path)
    export_pt = p.name == ONEDNN_INT8_FILE and (p.parent / "model.json").is_file()
    if p.suffix == ".onnx" or export_pt or (p.is_dir() and (p / "model.json").is_file()):
        from .export import load_exported

        return load_exported(p)
    return load_checkpoint(p)


class Predictor:
    """A model from a checkpoint (or an ONNX export of one), ready to segment HWC uint8 RGB images of any size.

    Example:
        >>> p = Predictor("runs/demo/best.pt")            # doctest: +SKIP
        >>> masks = p.predict([image])                     # doctest: +SKIP  -> [(H, W) uint8]
    """

    def __init__(
        self, checkpoint: str | Path | dict[str, Any], precision: str = "auto", device: str = "auto",
        threads: int | None = None, batch_size: int = 8, tta: bool = False, compile: str | bool = "off",
        n_images: int = 0, scales: Sequence[float] | None = None,
    ) -> None:
        state = checkpoint if isinstance(checkpoint, dict) else load_model_file(checkpoint)
        set_threads(threads)
        self.preprocess = dict(state.get("preprocess") or {})
        self.scales = check_scales((self.preprocess.get("predict_scales") or [1.0]) if scales is None else scales)
        # ONNX Runtime runs exports on the CPU here, so "auto" means the CPU for them.
        self.device = pick_device("cpu" if device == "auto" and "onnx" in state else device)
        size = self.preprocess.get("size")
        self._forward: Any  # float32 images (N, 3, H, W) in [0, 1] -> float32 logits (N, C, H, W)
        if "int8_onednn" in state:  # an export's oneDNN int8 model: one model for every scale
            from .int8 import load_int8

            if precision not in ("auto", "int8"):
                raise UnetsegError(f"{state['int8_onednn']} is the export's int8 model: --precision {precision} "
                                   "needs the checkpoint (or the export's model.onnx)")
            if self.device.type != "cpu":
                raise UnetsegError(f"{state['int8_onednn']}: int8 through oneDNN runs on the CPU; use the "
                                   f"checkpoint on {self.device.type}")
            self.model = load_int8(state["int8_onednn"])
            self._forward = lambda x: forward_full(self.model, x)
            self.precision = "int8 (oneDNN)"
        elif "onnx" in state:  # an export: ONNX Runtime on the CPU, at the exported precision and size
            from .export import OnnxPredictor

            if precision not in ("auto", state["precision"]):
                raise UnetsegError(f"{state['onnx']} is the export's {state['precision']} model: --precision "
                                   f"{precision} needs the checkpoint (or the export's other model file)")
            if self.device.type != "cpu":
                raise UnetsegError(f"{state['onnx']}: exported models run on the CPU (ONNX Runtime); use the "
                                   f"checkpoint on {self.device.type}")
            # One graph per scale (each ONNX graph has one input size), picked by the size of the batch.
            graphs = state.get("onnx_scales") or {1.0: state["onnx"]}
            missing = [v for v in self.scales if v not in graphs]
            if missing:
                have = " ".join(f"{v:g}" for v in sorted(graphs))
                raise UnetsegError(f"{state['onnx']}: this export has graphs for scales {have} only, so it cannot "
                                   f"predict at scales {missing}; use --scales with those, export again with "
                                   f"`unetseg export --scales ...`, or use the checkpoint")
            by_size = {scaled_size(size, v): OnnxPredictor(graphs[v], threads=threads) for v in self.scales}
            self.model: Any = by_size  # (H, W) -> OnnxPredictor
            self._forward = lambda x: by_size[tuple(x.shape[-2:])](x)
            self.precision = f"{state['precision']} (ONNX Runtime)"
        else:
            # bf16 weights where the hardware does bf16 natively, channels_last, and torch.compile when
            # ``compile`` is on, or auto and ``n_images`` pay for it: see unetseg.runtime. Each scale is
            # another input size, which would compile again, so ``auto`` compiles only single-scale runs.
            if compile == "auto" and len(self.scales) > 1:
                compile = "off"
            self.model = prepare_model_for_inference(
                model_from_checkpoint(state), precision, self.device, compile=compile,
                n_images=n_images * (2 if tta else 1), batch_size=batch_size, image_size=tuple(size) if size else None,
            )
            self._forward = lambda x: forward_full(self.model, x)  # float32 logits at x's size
            self.precision = self.model.precision
        self.classes = ClassTable.from_dict(state["classes"])
        n_out = int(state["model_config"]["n_classes"])
        if len(self.classes) != n_out:
            raise UnetsegError(f"checkpoint names {len(self.classes)} classes but its model outputs {n_out}: "
                               "the file is inconsistent")
        self.state = state
        self.batch_size = batch_size
        self.tta = tta

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def _prepare(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """``image`` resized as in training (to the checkpoint's size, if it has one), times ``scale``."""
        from .data import resize_image

        size = scaled_size(self.preprocess.get("size") or image.shape[:2], scale)
        if tuple(image.shape[:2]) != size:
            return resize_image(image, size, self.preprocess.get("resize_mode", "default"))
        return image

    def _scale_logits(self, images: Sequence[np.ndarray], scale: float) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self._prepare(im, scale) for im in images])).permute(0, 3, 1, 2)
        x = x.to(self.device).float().div_(255)
        out = self._forward(x)
        if self.tta:
            out = (out + self._forward(x.flip(-1).contiguous()).flip(-1)) / 2
        # Resizing and the argmax over classes run ~2.5x faster on channels_last logits than on NCHW ones
        # (ONNX Runtime returns NCHW; the torch path is channels_last already, and this is then a no-op).
        return out.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, images: Sequence[np.ndarray], out_size: tuple[int, int]) -> torch.Tensor:
        """Float32 logits ``(N, C, *out_size)`` for same-size HWC uint8 ``images``.

        With ``tta``, the mean of the logits of each image and of its mirror image (mirrored back): twice the
        compute; on held-out CARLA runs -0.5 to +0.6 mIoU points, a gain on 10 of 13 (RESULTS.md).

        With several ``scales``, each image is also run resized by each scale, and the result is the log of
        the class probabilities averaged over the scales (at the largest scale's size): a smaller copy lets
        every output pixel see more of the frame; on held-out CARLA runs Wall, Terrain, GuardRail and
        RoadLine gain most (RESULTS.md). Compute grows with the sum of the squared scales.
        """
        if len(self.scales) == 1:
            out = self._scale_logits(images, self.scales[0])
        else:
            per_scale = [self._scale_logits(images, s) for s in self.scales]
            size = max((o.shape[-2:] for o in per_scale), key=lambda hw: hw[0] * hw[1])
            probs = sum(F.interpolate(o, size=size, mode="bilinear", align_corners=False).softmax(1)
                        if o.shape[-2:] != size else o.softmax(1) for o in per_scale)
            # clamp: a probability that underflowed to 0 would give -inf, not a finite logit
            out = (probs / len(per_scale)).clamp_(min=torch.finfo(torch.float32).tiny).log_()  # type: ignore[union-attr]
        if tuple(out.shape[-2:]) != tuple(out_size):
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-index masks ``(H, W)`` uint8, each at its image's own size."""
        results: list[np.ndarray | None] = [None] * len(images)
        for idx in _same_size_batches([im.shape[:2] for im in images], self.batch_size):
            pred = self.logits([images[i] for i in idx], tuple(images[idx[0]].shape[:2])).argmax(1)
            for i, p in zip(idx, pred.to(torch.uint8).cpu().numpy(), strict=True):
                results[i] = p
        return results  # type: ignore[return-value]


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """``(H, W)`` times ``scale``, rounded: the size a frame is predicted at for that scale (exports use the
    same rule for their per-scale graphs)."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def check_scales(scales: Iterable[float]) -> list[float]:
    """Prediction scales as a list of positive floats, or an error that says what is wrong."""
    try:
        values = [float(v) for v in scales]
    except (TypeError, ValueError):
        raise UnetsegError(f"scales must be numbers such as 0.6 1.0, got {scales!r}") from None
    if not values or any(not 0 < v <= 4 for v in values):
        raise UnetsegError(f"scales must be between 0 and 4 (1 = the training frame size), got {values}")
    return values


def _same_size_batches(shapes: Sequence[tuple[int, ...]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of consecutive same-size images."""
    batch: list[int] = []
    for i, shape in enumerate(shapes):
        if batch and (shape != shapes[batch[0]] or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted) and globs → image paths; an input matching nothing is an error."""
    from .data import list_images

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            sub = p / "CameraRGB" if (p / "CameraRGB").is_dir() else p / "images" if (p / "images").is_dir() else p
            found, _ = list_images(sub)
            if not found:
                raise UnetsegError(f"{p}: no images found (PNG, JPEG, BMP or TIFF)")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item)) if Path(m).is_file())
            if not matches:
                raise UnetsegError(f"{item}: no such file or folder, and no file matches it as a glob")
            paths.extend(matches)
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem] != p:
            raise UnetsegError(f"two inputs share the name {p.stem!r} ({stems[p.stem]} and {p}); "
                               "outputs would overwrite each other: predict them into separate --out folders")
        stems[p.stem] = p
    return list(dict.fromkeys(paths))


def _true_mask_path(image: Path, masks_dir: Path | None) -> tuple[Path, str] | None:
    """The true mask for ``image``: in ``masks_dir`` by name, or beside it in a CARLA/generic layout."""
    candidates: list[tuple[Path, str]] = []
    if masks_dir is not None:
        candidates += [(masks_dir / f"{image.stem}{ext}", "auto") for ext in (image.suffix, ".png")]
    parent = image.parent
    for sub, layout in (("CameraMask", "carla"), ("CameraSeg", "lyft"), ("masks", "generic")):
        if parent.name in ("CameraRGB", "images"):
            candidates.append((parent.parent / sub / f"{image.stem}.png", layout))
    for path, layout in candidates:
        if path.is_file():
            return path, layout
    return None


def predict(
    checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, masks: str | Path | None = None,
    batch_size: int = 8, precision: str = "auto", threads: int | None = None, progress: bool = True,
    tta: bool = False, compile: str | bool = "auto", scales: Sequence[float] | None = None,
) -> list[Path]:
    """Segment every input image; write mask, colour, overlay (and triplet) PNGs; return the mask paths.

    ``tta=True`` averages each image's logits with those of its mirror image (see ``Predictor.logits``).
    ``scales`` (e.g. ``[0.6, 1.0]``) overrides the checkpoint's ``preprocess.predict_scales``.
    ``compile``: ``auto`` compiles the model when the number of images pays for it, ``on``, ``off``.
    """
    from .classes import colorize
    from .data import read_image, read_mask
    from .visualize import overlay, save_png, save_triplet

    paths = expand_inputs(inputs)
    predictor = Predictor(checkpoint, precision=precision, threads=threads, batch_size=batch_size, tta=tta,
                          compile=compile, n_images=len(paths), scales=scales)
    masks_dir = Path(masks) if masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise UnetsegError(f"{masks_dir}: --masks folder not found")
    out = Path(out_dir)
    for sub in ("masks", "color", "overlay"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    layout = predictor.preprocess.get("layout", "auto")
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Decode the next chunk while the model runs on this one.
        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        decoded = pool.map(lambda chunk: [read_image(p) for p in chunk], chunks)
        bar = tqdm(total=len(paths), desc="predict", disable=not progress, leave=False)
        for chunk, images in zip(chunks, decoded, strict=True):
            for path, image, pred in zip(chunk, images, predictor.predict(images), strict=True):
                stem = path.stem
                written.append(save_png(pred, out / "masks" / f"{stem}.png", mode="L"))
                save_png(colorize(pred, predictor.classes), out / "color" / f"{stem}.png")
                save_png(overlay(image, pred, predictor.classes), out / "overlay" / f"{stem}.png")
                found = _true_mask_path(path, masks_dir)
                if found is not None:
                    mask_path, mask_layout = found
                    true = read_mask(mask_path, layout if mask_layout == "auto" else mask_layout)
                    if true.shape != pred.shape:
                        raise UnetsegError(f"{mask_path}: mask is {true.shape[1]}x{true.shape[0]} but its image "
                                           f"{path} is {pred.shape[1]}x{pred.shape[0]}")
                    save_triplet(image, true, pred, predictor.classes, out / "triplet" / f"{stem}.png")
                bar.update()
        bar.close()
    return written
