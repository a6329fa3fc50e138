"""Anchor boxes per pyramid level, laid out to match a dense head's (N, H*W*A, K) predictions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor


def octave_sizes(base: float, num_scales: int = 3, truncate: bool = False) -> tuple[float, ...]:
    """(base, base * 2^(1/n), ..., base * 2^((n-1)/n)); `truncate` rounds down to integers (torchvision)."""
    sizes = [base * 2 ** (k / num_scales) for k in range(num_scales)]
    return tuple(float(int(s)) if truncate else s for s in sizes)


@dataclass
class AnchorGenerator:
    """Anchors of every level, as (H*W*A, 4) xyxy tensors ordered location-major then anchor.

    Attributes:
        strides: the stride of each level (e.g. 8..128 for P3-P7).
        sizes: per level, anchor sides (sqrt of area) in pixels.
        aspect_ratios: height / width of the anchors.
        offset: anchor centres at (i + offset) * stride; 0 (detectron2, torchvision) or 0.5 (TF).
        order: `ratio_major` (torchvision: anchor a = ratio * num_sizes + size) or `size_major`
            (detectron2); only matters for loading weights trained elsewhere.
        round_base: round the per-level base anchors to integers (torchvision does).
        stride_mode: "nominal" places level l's anchors `strides[l]` apart; "image_over_grid" (torchvision) uses
            padded image size // grid size per axis, so pass `image_size` to `grid_anchors`.
    """

    strides: Sequence[int]
    sizes: Sequence[Sequence[float]]
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    offset: float = 0.0
    order: Literal["ratio_major", "size_major"] = "ratio_major"
    round_base: bool = False
    stride_mode: Literal["nominal", "image_over_grid"] = "nominal"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.sizes):
            raise ValueError(f"{len(self.strides)} strides but {len(self.sizes)} size lists")

    @classmethod
    def from_anchor_size(cls, levels: Sequence[int], anchor_size: float, num_scales: int = 3,
                         aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.5,
                         **kwargs) -> "AnchorGenerator":
        """The TF RetinaNet form: side = anchor_size * 2^level * 2^(k/num_scales)."""
        strides = [2 ** level for level in levels]
        return cls(strides=strides, sizes=[octave_sizes(anchor_size * s, num_scales) for s in strides],
                   aspect_ratios=aspect_ratios, offset=offset, **kwargs)

    @property
    def num_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.sizes[0]) * len(self.aspect_ratios)

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors centred on (0, 0) for one level, in the configured order."""
        sizes = torch.tensor(self.sizes[level], dtype=torch.float64)
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)
        h_ratio = ratios.sqrt()
        w_ratio = 1 / h_ratio
        if self.order == "ratio_major":
            ws = (w_ratio[:, None] * sizes[None, :]).reshape(-1)
            hs = (h_ratio[:, None] * sizes[None, :]).reshape(-1)
        else:
            ws = (sizes[:, None] * w_ratio[None, :]).reshape(-1)
            hs = (sizes[:, None] * h_ratio[None, :]).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return (base.round() if self.round_base else base).float()

    def grid_anchors(self, shapes: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
                     image_size: tuple[int, int] | None = None) -> list[Tensor]:
        """Anchors of each level for feature maps of the given (H, W) shapes: a list of (H*W*A, 4) float32.

        `image_size` is the padded (height, width) of the batch; stride_mode "image_over_grid" needs it.
        """
        if self.stride_mode == "image_over_grid" and image_size is None:
            raise ValueError("stride_mode 'image_over_grid' needs the padded image size")
        out = []
        for level, (h, w) in enumerate(shapes):
            if self.stride_mode == "image_over_grid":
                stride_y, stride_x = int(image_size[0]) // int(h), int(image_size[1]) // int(w)
            else:
                stride_y = stride_x = self.strides[level]
            key = (level, int(h), int(w), stride_y, stride_x, str(device))
            if key not in self._cache:
                if len(self._cache) > 256:  # many distinct input sizes: keep memory bounded
                    self._cache.clear()
                xs = (torch.arange(w, dtype=torch.float32, device=device) + self.offset) * stride_x
                ys = (torch.arange(h, dtype=torch.float32, device=device) + self.offset) * stride_y
                cy, cx = torch.meshgrid(ys, xs, indexing="ij")
                centers = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
                # (H*W, 1, 4) + (1, A, 4) -> (H*W*A, 4)
                self._cache[key] = (centers + self.base_anchors(level).to(device)[None]).reshape(-1, 4)
            out.append(self._cache[key])
        return out


def retinanet_anchor_sizes(base: float = 32.0, num_levels: int = 5, truncate: bool = False) -> list[tuple]:
    """Sizes of the RetinaNet paper: base * 2^level * {2^0, 2^(1/3), 2^(2/3)} on P3..P7."""
    return [octave_sizes(base * 2 ** i, 3, truncate) for i in range(num_levels)]

