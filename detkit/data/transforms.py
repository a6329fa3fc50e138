"""Geometric transforms that keep an image, its boxes, masks and ignore regions consistent; normalisation.

A `Sample` carries the PIL image, its targets and the affine map from original to current pixel coordinates
(x' = ax * x + bx, y' = ay * y + by), so predictions on the transformed image map back exactly.
Masks are per instance either polygons (flat float32 x, y arrays, transformed exactly) or uint8 bitmaps
(decoded RLE, transformed with nearest-neighbour sampling).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config.schema import InputConfig, TransformConfig


@dataclass
class Sample:
    image: Image.Image
    boxes: np.ndarray  # (N, 4) float32 xyxy
    labels: np.ndarray  # (N,) int64
    ignore_boxes: np.ndarray  # (M, 4) float32 xyxy: crowd regions
    masks: list | None = None  # N entries: list of polygons, or an (H, W) uint8 bitmap
    affine: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0)  # ax, bx, ay, by

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.image.height, self.image.width


def _scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


def resize(sample: Sample, new_w: int, new_h: int, image: Image.Image | None = None) -> Sample:
    """Resize to (new_w, new_h) pixels; boxes and masks follow. `image`: the resized pixels, when the caller
    already has them (see `resize_crop`)."""
    w, h = sample.image.size
    if (new_w, new_h) == (w, h) and image is None:
        return sample
    sx, sy = new_w / w, new_h / h
    masks = None
    if sample.masks is not None:
        masks = [np.asarray(Image.fromarray(m).resize((new_w, new_h), Image.NEAREST)) if isinstance(m, np.ndarray)
                 else [p * np.tile(np.array([sx, sy], np.float32), len(p) // 2) for p in m] for m in sample.masks]
    ax, bx, ay, by = sample.affine
    return replace(sample, image=image if image is not None else sample.image.resize((new_w, new_h), Image.BILINEAR),
                   boxes=_scale_boxes(sample.boxes, sx, sy), ignore_boxes=_scale_boxes(sample.ignore_boxes, sx, sy),
                   masks=masks, affine=(ax * sx, bx * sx, ay * sy, by * sy))


def _flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; boxes and masks follow."""
    w = sample.image.width
    masks = None
    if sample.masks is not None:
        masks = []
        for m in sample.masks:
            if isinstance(m, np.ndarray):
                masks.append(np.ascontiguousarray(m[:, ::-1]))
            else:
                flipped = []
                for p in m:
                    q = p.copy()
                    q[0::2] = w - p[0::2]
                    flipped.append(q)
                masks.append(flipped)
    ax, bx, ay, by = sample.affine
    return replace(sample, image=sample.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                   boxes=_flip_boxes(sample.boxes, w), ignore_boxes=_flip_boxes(sample.ignore_boxes, w),
                   masks=masks, affine=(-ax, w - bx, ay, by))


def crop(sample: Sample, x0: int, y0: int, width: int, height: int, min_box_size: float = 1.0,
         image: Image.Image | None = None) -> Sample:
    """Keep the window [x0, x0+width) x [y0, y0+height). Boxes are clipped to it; boxes left narrower or
    shorter than `min_box_size` are removed with their labels and masks; ignore regions are clipped.
    `image`: the cropped pixels, when the caller already has them (see `resize_crop`)."""
    shift = np.array([x0, y0, x0, y0], dtype=np.float32)
    limit = np.array([width, height, width, height], dtype=np.float32)

    def clip(b: np.ndarray) -> np.ndarray:
        return np.clip(b - shift, 0, limit)

    boxes, ignore = clip(sample.boxes), clip(sample.ignore_boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
    keep_ignore = ((ignore[:, 2] - ignore[:, 0]) > 0) & ((ignore[:, 3] - ignore[:, 1]) > 0)
    masks = None
    if sample.masks is not None:
        masks = []
        for m, k in zip(sample.masks, keep):
            if not k:
                continue
            if isinstance(m, np.ndarray):
                masks.append(np.ascontiguousarray(m[y0:y0 + height, x0:x0 + width]))
            else:
                masks.append([p - np.tile(np.array([x0, y0], np.float32), len(p) // 2) for p in m])
    ax, bx, ay, by = sample.affine
    if image is None:
        image = sample.image.crop((x0, y0, x0 + width, y0 + height))
    return replace(sample, image=image, boxes=boxes[keep],
                   labels=sample.labels[keep], ignore_boxes=ignore[keep_ignore], masks=masks,
                   affine=(ax, bx - x0, ay, by - y0))


def resize_crop(sample: Sample, new_w: int, new_h: int, x0: int, y0: int, width: int, height: int,
                min_box_size: float = 1.0) -> Sample:
    """`crop(resize(sample, new_w, new_h), x0, y0, width, height)`, resampling only the pixels the crop keeps.

    With scale jitter up to 2x, resizing the whole image first would resample up to 4x the output's pixels.
    """
    w, h = sample.image.size
    sx, sy = new_w / w, new_h / h
    region = (x0 / sx, y0 / sy, (x0 + width) / sx, (y0 + height) / sy)  # the window in source pixels
    pixels = sample.image.resize((width, height), Image.BILINEAR, box=region)
    return crop(resize(sample, new_w, new_h, image=pixels), x0, y0, width, height, min_box_size, image=pixels)


def boxes_to_original(boxes: np.ndarray | torch.Tensor, affine: Sequence[float]):
    """Map (N, 4) xyxy boxes from transformed back to original image coordinates (undoes flips too)."""
    ax, bx, ay, by = affine
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    xa, xb = (x0 - bx) / ax, (x1 - bx) / ax
    ya, yb = (y0 - by) / ay, (y1 - by) / ay
    lib = torch if isinstance(boxes, torch.Tensor) else np
    return lib.stack([lib.minimum(xa, xb), lib.minimum(ya, yb), lib.maximum(xa, xb), lib.maximum(ya, yb)], 1)


@dataclass
class TransformPipeline:
    """The transforms of one split, built from a `TransformConfig`. Randomness comes from the caller's rng."""

    cfg: TransformConfig
    train: bool
    min_box_size: float = 1.0

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """Batches pad to this (height, width) when set; else to a multiple of size_divisibility."""
        if self.cfg.mode == "scale_jitter":
            return self.cfg.output_size, self.cfg.output_size
        return None

    def output_size(self, height: int, width: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """(new_h, new_w) of the resize step, for an image of (height, width)."""
        c = self.cfg
        if c.mode == "resize_short":
            if self.train and len(c.short_sizes) > 1 and rng is not None:
                if c.short_sample == "range":
                    short = int(rng.integers(min(c.short_sizes), max(c.short_sizes) + 1))
                else:
                    short = int(c.short_sizes[rng.integers(len(c.short_sizes))])
            else:
                short = c.short_sizes[0]
            scale = min(short / min(height, width), c.max_size / max(height, width))
        else:
            s = float(rng.uniform(*c.scale_range)) if self.train and rng is not None else 1.0
            target = round(s * c.output_size)
            scale = min(target / height, target / width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        if self.train and rng is None:
            raise ValueError("training transforms need an rng")
        c = self.cfg
        if self.train and c.flip_prob > 0 and rng.random() < c.flip_prob:
            sample = hflip(sample)
        new_h, new_w = self.output_size(*sample.size, rng=rng)
        if c.mode == "scale_jitter" and (new_w > c.output_size or new_h > c.output_size):
            cw, ch = min(new_w, c.output_size), min(new_h, c.output_size)
            x0 = int(rng.integers(0, new_w - cw + 1)) if rng is not None else 0
            y0 = int(rng.integers(0, new_h - ch + 1)) if rng is not None else 0
            return resize_crop(sample, new_w, new_h, x0, y0, cw, ch, self.min_box_size)
        return resize(sample, new_w, new_h)


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a tensor on `device`, copied there once (a copy from host memory at every step would make the
    training step wait for the GPU)."""
    return torch.tensor(values, dtype=dtype, device=device)


def normalize(images: torch.Tensor, image_sizes: torch.Tensor, input_cfg: InputConfig,
              mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 padded batch -> float network input: (pixel - mean) / std in the configured channel order.

    Padding stays exactly 0 after normalisation, as the backbone expects. Runs wherever `images` is (do it on
    the GPU: the uint8 batch is 4x smaller to move).

    Args:
        images: (N, 3, H, W) uint8 RGB, padded bottom/right.
        image_sizes: (N, 2) (height, width) of each image before padding.
        input_cfg: normalisation settings.
        mean, std: (1, 3, 1, 1) float32 `input_cfg.pixel_mean` / `pixel_std` already on the images' device (the
            detectors' non-persistent buffers); when None they are made from `input_cfg` (cached per device).

    Returns:
        (N, 3, H, W) float32.
    """
    x = images.float()
    if input_cfg.channel_order == "BGR":
        x = x.flip(1)
    if mean is None:
        mean = _constant(tuple(input_cfg.pixel_mean), x.device, x.dtype).view(1, 3, 1, 1)
    if std is None:
        std = _constant(tuple(input_cfg.pixel_std), x.device, x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    sizes = image_sizes.to(x.device)
    valid = (torch.arange(h, device=x.device).view(1, h, 1) < sizes[:, 0].view(-1, 1, 1)) & \
            (torch.arange(w, device=x.device).view(1, 1, w) < sizes[:, 1].view(-1, 1, 1))  # (N, H, W)
    return x * valid.unsqueeze(1)
