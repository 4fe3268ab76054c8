"""Batch augmentation in torch with identical geometry for images and masks.

Per sample: a horizontal flip (p = 0.5), a random scale followed by a random crop of ``crop_size``, and
colour jitter (brightness, contrast, saturation and optionally hue; image only). Flip, scale and crop are one affine
resampling (:func:`torch.nn.functional.grid_sample`), bilinear for the image and nearest for the mask,
so the mask's labels are copied, never blended, and both stay aligned to the pixel. The scale is drawn
from ``scale_range`` but raised where needed so the crop always fits inside the scaled image (no
padding, no invented labels). The lab recipe uses no augmentation.

Example:
    >>> import torch
    >>> from unetseg.data.augment import augment_batch
    >>> x = torch.rand(4, 3, 96, 128); y = torch.randint(0, 23, (4, 96, 128))
    >>> xa, ya = augment_batch(x, y, crop_size=(64, 64), generator=torch.Generator().manual_seed(0))
    >>> xa.shape, ya.shape, ya.dtype
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 64, 64]), torch.int64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnetsegError


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device="cpu").to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, ``(B, 1, H, W)``."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


# RGB -> YIQ (NTSC): luma and two chroma axes, so that a rotation in the chroma plane turns the hue and
# keeps the luma.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hues(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Turn each sample's hue by ``angles`` (radians, ``(B,)``) in the YIQ chroma plane; luma unchanged.

    ``images``: ``(B, 3, H, W)`` float RGB in [0, 1]; returns the same shape, clamped to [0, 1]. A third of
    a turn (``-2 * pi / 3``) takes red to green.
    """
    to_yiq = _RGB_TO_YIQ.to(images.device, images.dtype)
    c, s = angles.cos().to(images.dtype), angles.sin().to(images.dtype)
    rot = torch.zeros(len(angles), 3, 3, dtype=images.dtype, device=images.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (B, 3, 3) per-sample RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", m, images).clamp_(0.0, 1.0)


def jitter_colors(images: torch.Tensor, strength: float,
                  generator: torch.Generator | None = None, hue: float = 0.0) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in ``[1 - strength, 1 + strength]`` per sample,
    then (``hue > 0``) a hue turn of up to ``hue`` of a full turn either way (0.1: +-36 degrees).

    ``images``: ``(B, 3, H, W)`` float in [0, 1]; returns the same shape, clamped to [0, 1].
    """
    b = images.shape[0]
    dev = images.device
    x = images
    if strength > 0:
        f = [_uniform(b, 1 - strength, 1 + strength, generator, dev).view(b, 1, 1, 1) for _ in range(3)]
        x = x * f[0]
        mean = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * f[1] + mean
        g = _gray(x)
        x = ((x - g) * f[2] + g).clamp_(0.0, 1.0)
    if hue > 0:
        x = rotate_hues(x, _uniform(b, -hue * 2 * math.pi, hue * 2 * math.pi, generator, dev))
    return x


def augment_batch(images: torch.Tensor, masks: torch.Tensor, *, crop_size: tuple[int, int] | None = None,
                  scale_range: tuple[float, float] = (0.75, 1.25), hflip: bool = True,
                  color_jitter: float = 0.2, generator: torch.Generator | None = None,
                  centers: torch.Tensor | None = None, hue: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch.

    ``images``: ``(B, 3, H, W)`` float32 in [0, 1]; ``masks``: ``(B, H, W)`` int64 class ids.
    Returns ``(images (B, 3, h, w) float32 in [0, 1], masks (B, h, w) int64)`` with ``(h, w) = crop_size``,
    or ``(H, W)`` when ``crop_size`` is ``None`` (then scales below 1 cannot fit and are raised to 1).
    ``scale_range=None`` or ``(1, 1)`` with ``crop_size=None`` skips resampling; ``color_jitter=0`` skips
    brightness, contrast and saturation changes; ``hue`` (a share of a full turn, e.g. 0.1) adds a random
    hue turn. All randomness comes from ``generator`` (a CPU ``torch.Generator``), so a seeded generator
    reproduces the batch. ``centers`` ``(B, 2)`` (y, x in input pixels; NaN rows: random) centres
    the crop on a point where it fits, e.g. from :func:`rare_class_centers`.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise UnetsegError(f"augment_batch: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise UnetsegError(f"augment_batch: masks {tuple(masks.shape)} do not match images "
                           f"{tuple(images.shape)}; expected (B, H, W)")
    b, _, h_in, w_in = images.shape
    h_out, w_out = (h_in, w_in) if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
    if h_out < 1 or w_out < 1:
        raise UnetsegError(f"augment_batch: crop size must be positive, got {crop_size}")
    lo, hi = (1.0, 1.0) if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
    if lo <= 0 or hi < lo:
        raise UnetsegError(f"augment_batch: scale_range must be 0 < low <= high, got {scale_range}")
    dev = images.device
    images = images.float()

    flip = (torch.rand(b, generator=generator) < 0.5).to(dev) if hflip else torch.zeros(b, dtype=torch.bool,
                                                                                      device=dev)
    need_resample = crop_size is not None or lo != 1.0 or hi != 1.0
    if need_resample:
        # Smallest scale at which the crop fits; draw uniformly from the feasible part of the range.
        s_min = max(h_out / h_in, w_out / w_in)
        u = torch.rand(b, generator=generator).to(dev, torch.float64)
        lo_b = max(lo, s_min)
        hi_b = max(hi, lo_b)
        s = lo_b + (hi_b - lo_b) * u
        # Crop offsets in scaled-image pixels.
        left = torch.rand(b, generator=generator).to(dev, torch.float64) * (w_in * s - w_out).clamp(min=0)
        top = torch.rand(b, generator=generator).to(dev, torch.float64) * (h_in * s - h_out).clamp(min=0)
        if centers is not None:
            c = centers.to(dev, torch.float64)
            aim = ~torch.isnan(c[:, 0])
            # A flipped sample takes its crop at the mirrored offset (see theta below): aim there.
            cx_in = torch.where(flip, w_in - c[:, 1], c[:, 1])
            left = torch.where(aim, (cx_in * s - w_out / 2).clamp(min=0).minimum((w_in * s - w_out).clamp(min=0)),
                               left)
            top = torch.where(aim, (c[:, 0] * s - h_out / 2).clamp(min=0).minimum((h_in * s - h_out).clamp(min=0)),
                              top)
        # Output pixel centre (j + 0.5) maps to input x = (left + j + 0.5) / s; in grid_sample's normalised
        # coordinates (align_corners=False): x_n = a * u + c with u the output's normalised coordinate.
        ax = w_out / (w_in * s)
        cx = (w_out + 2 * left) / (w_in * s) - 1
        ay = h_out / (h_in * s)
        cy = (h_out + 2 * top) / (h_in * s) - 1
        sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
        theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=dev)
        theta[:, 0, 0] = ax * sign
        theta[:, 0, 2] = cx * sign  # mirroring the sampled x mirrors the crop inside the image
        theta[:, 1, 1] = ay
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta.float(), [b, 3, h_out, w_out], align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # float32 holds integer ids exactly (< 2**24); nearest copies one source value per pixel.
        masks = F.grid_sample(masks.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False).squeeze(1).round().long()
    else:
        f4 = flip.view(b, 1, 1, 1)
        images = torch.where(f4, images.flip(-1), images)
        masks = torch.where(flip.view(b, 1, 1), masks.flip(-1), masks).long()
    images = jitter_colors(images, float(color_jitter), generator, hue=float(hue))
    return images.clamp(0.0, 1.0), masks


def rare_class_centers(masks: torch.Tensor, class_pixels: torch.Tensor, probability: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop centres that favour rare classes: ``(B, 2)`` float (y, x) in pixels, NaN rows for random crops.

    With ``probability`` per sample, a class present in that mask is drawn with weight
    ``1 / class_pixels[c]`` (its pixel count over the training set) and the crop is centred on one of its
    pixels, so poles, signs and pedestrians appear in crops far more often than their pixel share; the
    other samples keep uniform random crops. ``masks``: ``(B, H, W)`` int64.
    """
    b = masks.shape[0]
    centers = torch.full((b, 2), float("nan"), dtype=torch.float64)
    draws = torch.rand(b, generator=generator)
    inverse = 1.0 / class_pixels.double().clamp(min=1)
    for i in range(b):
        if draws[i] >= probability:
            continue
        present = torch.unique(masks[i])
        c = present[torch.multinomial(inverse[present], 1, generator=generator)]
        ys, xs = torch.nonzero(masks[i] == c, as_tuple=True)
        k = int(torch.randint(len(ys), (1,), generator=generator))
        centers[i, 0], centers[i, 1] = ys[k] + 0.5, xs[k] + 0.5
    return centers


def class_mix(images: torch.Tensor, masks: torch.Tensor, probability: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al., 2021): paste the pixels of half of another sample's classes onto a sample.

    With ``probability`` per sample ``i``, the next sample of the batch (``(i + 1) % B``; batches come in
    random order) gives a random half of the classes present in its mask (rounded up), and its image and
    mask pixels of those classes replace sample ``i``'s. Objects keep their exact outlines and labels and
    appear over other scenes, so what a class looks like is learnt apart from where the training runs put
    it. ``images``: ``(B, 3, H, W)``; ``masks``: ``(B, H, W)`` int64; returns new tensors of the same shapes
    (the inputs are not modified). A batch of one is returned unchanged.
    """
    b = images.shape[0]
    if probability <= 0 or b < 2:
        return images, masks
    draws = torch.rand(b, generator=generator)
    out_images, out_masks = images.clone(), masks.clone()
    for i in range(b):
        if draws[i] >= probability:
            continue
        j = (i + 1) % b
        present = torch.unique(masks[j])
        chosen = present[torch.randperm(len(present), generator=generator)[: (len(present) + 1) // 2]]
        paste = torch.isin(masks[j], chosen.to(masks.device))
        out_images[i] = torch.where(paste, images[j], images[i])
        out_masks[i] = torch.where(paste, masks[j], masks[i])
    return out_images, out_masks


def rare_paste(images: torch.Tensor, masks: torch.Tensor, probability: float, rare: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the rare-class pixels of another sample onto a sample (copy-paste for small, rare objects).

    With ``probability`` per sample ``i``, a random other sample of the batch gives its pixels whose label
    is a rare class (``rare``: ``(C,)`` bool, e.g. the classes with under 1 % of the training pixels),
    mirrored left-right with p = 0.5, and they replace sample ``i``'s image and mask pixels. Poles, signs,
    lights, vehicles and pedestrians keep their exact outlines and labels and appear in front of other
    scenes, so they are learnt apart from the few driving runs that show them; unlike ``class_mix``, the
    large classes keep their own scene. ``images``: ``(B, 3, H, W)``; ``masks``: ``(B, H, W)`` int64;
    returns new tensors of the same shapes (the inputs are not modified). A batch of one is returned
    unchanged.
    """
    b = images.shape[0]
    if probability <= 0 or b < 2 or not bool(rare.any()):
        return images, masks
    draws = torch.rand(b, generator=generator)
    sources = (torch.arange(b) + 1 + torch.randint(b - 1, (b,), generator=generator)) % b  # never i itself
    flips = torch.rand(b, generator=generator) < 0.5
    rare = rare.to(masks.device)
    out_images, out_masks = images.clone(), masks.clone()
    for i in range(b):
        if draws[i] >= probability:
            continue
        j = int(sources[i])
        src_image, src_mask = (images[j].flip(-1), masks[j].flip(-1)) if flips[i] else (images[j], masks[j])
        paste = rare[src_mask]
        out_images[i] = torch.where(paste, src_image, images[i])
        out_masks[i] = torch.where(paste, src_mask, masks[i])
    return out_images, out_masks
