"""Pictures of predictions and ground truth: class-coloured boxes with name tags, saved as PNG atomically."""
from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .fileio import write_bytes_atomic

# Hues stepped by the golden ratio, so consecutive labels get far-apart colours; label k always gets PALETTE[k % 256].
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(round(255 * c) for c in colorsys.hsv_to_rgb(k * 0.618033988749895 % 1.0, 0.75, 0.95)) for k in range(256))

ImageLike = Image.Image | np.ndarray | torch.Tensor
ArrayLike = np.ndarray | torch.Tensor | Sequence


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour used for class `label`."""
    return PALETTE[int(label) % len(PALETTE)]


def draw_detections(image: ImageLike, boxes: ArrayLike, labels: ArrayLike, scores: ArrayLike,
                    class_names: Sequence[str] | Mapping[int, str] | None = None, *, score_threshold: float = 0.3,
                    max_boxes: int = 100) -> Image.Image:
    """Draw the confident detections on a copy of `image`, each with a "name 0.87" tag in its class colour.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array/tensor.
        boxes: (N, 4) absolute xyxy in the image's pixels.
        labels: (N,) class indices into `class_names` (and the palette).
        scores: (N,) confidences.
        class_names: label -> name; labels without a name are shown as numbers.
        score_threshold: detections scoring below this are left out.
        max_boxes: at most this many, the highest scoring.

    Returns:
        A new RGB image; the input is not modified.
    """
    boxes, labels, scores = _boxes(boxes), _flat(labels, np.int64), _flat(scores, np.float32)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores: counts must agree")
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")[:max_boxes]][::-1]  # best drawn last, so on top
    tags = [f"{_name(class_names, labels[i])} {scores[i]:.2f}" for i in keep]
    return _draw(_to_pil(image), boxes[keep], labels[keep], tags)


def draw_ground_truth(image: ImageLike, boxes: ArrayLike, labels: ArrayLike,
                      class_names: Sequence[str] | Mapping[int, str] | None = None) -> Image.Image:
    """Draw annotated boxes like `draw_detections`, tagged with the class name only.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array/tensor.
        boxes: (N, 4) absolute xyxy.
        labels: (N,) class indices.
        class_names: label -> name.

    Returns:
        A new RGB image.
    """
    boxes, labels = _boxes(boxes), _flat(labels, np.int64)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    return _draw(_to_pil(image), boxes, labels, [_name(class_names, label) for label in labels])


def save_image_atomic(image: ImageLike, path: str | Path) -> Path:
    """Write `image` as PNG to `path` (which must end in .png) so that readers never see half a file.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array/tensor.
        path: destination; missing parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_image_atomic writes PNG; give a .png path, not {path.name!r}")
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(buffer.getvalue(), path)


def _draw(canvas: Image.Image, boxes: np.ndarray, labels: np.ndarray, tags: list[str]) -> Image.Image:
    width, height = canvas.size
    line = max(1, round(max(width, height) / 400))
    font = _font(max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)
    for (x1, y1, x2, y2), label, tag in zip(boxes.tolist(), labels.tolist(), tags):
        if not all(np.isfinite((x1, y1, x2, y2))):
            continue
        # Clip so that boxes reaching past the border still show an edge; order corners for degenerate boxes.
        x1, x2 = sorted((min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)))
        y1, y2 = sorted((min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)))
        colour = class_colour(label)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        pad = max(1, line)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top; always within the image.
        tag_x = min(max(x1, 0), max(width - tag_w, 0))
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else min(y1, max(height - tag_h, 0))
        draw.rectangle((tag_x, tag_y, tag_x + tag_w - 1, tag_y + tag_h - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tag_x + pad - left, tag_y + pad - top), tag, font=font,
                  fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
    return canvas


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # always a copy
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {array.shape} and dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def _flat(values: ArrayLike, dtype: type) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(dtype, copy=False).reshape(-1)


def _boxes(boxes: ArrayLike) -> np.ndarray:
    return _flat(boxes, np.float32).reshape(-1, 4)  # (N*4,) -> (N, 4); also (0,) for no boxes


def _name(class_names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    label = int(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
