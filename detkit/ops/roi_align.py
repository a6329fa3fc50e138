"""RoIAlign (Mask R-CNN) in pure PyTorch, with the semantics of the Detectron2 / torchvision kernel.

How it is computed. Bilinear interpolation is separable: a sample at (y, x) weighs pixel (i, j) by wy(i) * wx(j),
and the kernel's border rules act on each axis alone (a sample with y outside [-1, H] contributes 0, y is clamped
to [0, H - 1]; the same for x). The average over a bin's gh x gw samples is therefore
    out[r, c, p, q] = sum_{i, j} Wy[r, p, i] * Wx[r, q, j] * features[b_r, c, i, j]
with short per-axis tap lists Wy (rows and weights of output row p) and Wx. We build those lists for all RoIs and
bins at once, take their outer product as flat pixel indices and weights, and let one `embedding_bag` (sum mode,
per-sample weights) gather and reduce the channel vectors of an (N*H*W, C) pixel table. Autograd gives the
backward (a scatter-add into the table) for free; nothing loops over RoIs or bins.

Along an axis a bin has two taps per sample (its low and high neighbour) or, when that is fewer, the run of
consecutive rows its samples touch: with adaptive sampling (g = ceil(bin size) samples, so samples <= 1 px apart)
the run is at most g + 2 rows long, and it never exceeds the map. The run only regroups the same weights.

Adaptive sampling (sampling_ratio=0) gives every RoI its own sample counts. RoIs are grouped by the power of two
at or above their per-axis counts; a group computes its largest count and masks the samples beyond each RoI's
own. Reading the counts costs one host synchronisation per call; a fixed sampling ratio needs none. Groups are
split into chunks so that the temporaries stay within `CHUNK_BUDGET`.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BUDGET = 1 << 22  # taps (avg) or sample-channel values (max) per chunk: roughly 100 MB of temporaries


class _RoiGrid(NamedTuple):
    """Per-RoI sampling geometry on the feature map, all (R,) tensors."""

    batch: Tensor  # long: image index into the features
    start_y: Tensor  # RoI top on the feature map (after scaling and the half-pixel shift)
    start_x: Tensor
    bin_h: Tensor  # may be <= 0 for degenerate RoIs when aligned
    bin_w: Tensor
    grid_h: Tensor  # long: samples per bin along y; 0 for an empty adaptive RoI
    grid_w: Tensor

    def select(self, index: Tensor | slice) -> _RoiGrid:
        return _RoiGrid(*(t[index] for t in self))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _roi_grid(rois: Tensor, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int,
              aligned: bool) -> _RoiGrid:
    """Kernel geometry of (R, 5) rois given in the compute dtype."""
    offset = 0.5 if aligned else 0.0
    # a RoI with a NaN or infinite coordinate becomes an empty one two pixels outside the map: it pools to 0
    finite = torch.isfinite(rois[:, 1:]).all(dim=1)
    x1, y1, x2, y2 = (torch.where(finite, rois[:, k] * spatial_scale - offset, -2.0) for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: malformed RoIs are forced to 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / output_size[0], roi_w / output_size[1]
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.long)
    else:  # ceil(roi size / output size); a RoI of size <= 0 has no samples and pools to 0
        grid_h = torch.ceil(bin_h).clamp(min=0).long()
        grid_w = torch.ceil(bin_w).clamp(min=0).long()
    return _RoiGrid(rois[:, 0].long(), y1, x1, bin_h, bin_w, grid_h, grid_w)


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, num_bins: int, num_samples: int,
                  length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear neighbours of every sample along one axis.

    Args:
        start, bin_size, grid: (R,) RoI start, bin size and the RoI's own samples per bin along the axis.
        num_bins: output bins P along the axis. num_samples: samples G computed per bin (>= every grid).
        length: the feature map's extent along the axis.

    Returns:
        low, high: (R, P, G) long neighbour indices in [0, length - 1].
        weight_low, weight_high: (R, P, G) their weights; 0 for a sample outside [-1, length] and for the
            samples beyond the RoI's own count.
    """
    dtype, device = start.dtype, start.device
    bins = torch.arange(num_bins, dtype=dtype, device=device)[None, :, None]  # (1, P, 1)
    samples = torch.arange(num_samples, device=device)[None, None, :]  # (1, 1, G)
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid[:, None, None]  # (R,) -> (R, 1, 1)
    # the kernel's order of operations: (start + p * bin) + ((i + 0.5) * bin) / grid -> (R, P, G)
    pos = start + bins * bin_size + (samples.to(dtype) + 0.5) * bin_size / grid.clamp(min=1)
    valid = ((pos >= -1.0) & (pos <= length) & (samples < grid)).to(dtype)
    pos = pos.clamp(0, length - 1)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = (low + 1).clamp(max=length - 1)  # at the last row frac is 0, so high carries no weight
    return low, high, (1.0 - frac) * valid, frac * valid


def _num_taps(num_samples: int, length: int, adaptive: bool) -> tuple[int, bool]:
    """Taps per bin along an axis, and whether they are a run of consecutive rows (True) or per-sample pairs."""
    # adaptive samples are at most one pixel apart (bin <= g): their neighbours span <= g + 1 rows, +1 for rounding
    run = min(num_samples + 2, length) if adaptive else length
    return (run, True) if run < 2 * num_samples else (2 * num_samples, False)


def _axis_taps(start: Tensor, bin_size: Tensor, grid: Tensor, num_bins: int, num_samples: int, length: int,
               num_taps: int, run: bool) -> tuple[Tensor, Tensor]:
    """Rows and weights of each bin along one axis, (R, P, K) each; weights sum the samples, not yet averaged."""
    low, high, weight_low, weight_high = _axis_samples(start, bin_size, grid, num_bins, num_samples, length)
    if not run:  # (R, P, G) x 2 -> (R, P, 2G)
        return torch.cat([low, high], dim=-1), torch.cat([weight_low, weight_high], dim=-1)
    # every weighted neighbour of a bin lies in origin .. origin + K - 1; the clamps touch only zero weights
    origin = low.amin(dim=-1, keepdim=True)  # (R, P, 1)
    weights = torch.zeros(*low.shape[:2], num_taps, dtype=weight_low.dtype, device=low.device)
    weights = weights.scatter_add(-1, (low - origin).clamp(max=num_taps - 1), weight_low)
    weights = weights.scatter_add(-1, (high - origin).clamp(max=num_taps - 1), weight_high)
    rows = (origin + torch.arange(num_taps, device=low.device)).clamp(max=length - 1)  # (R, P, K)
    return rows, weights


def _pool_avg(table: Tensor, grid: _RoiGrid, output_size: tuple[int, int], map_size: tuple[int, int],
              num_samples: tuple[int, int], taps: tuple[tuple[int, bool], tuple[int, bool]]) -> Tensor:
    """Average RoIAlign of a chunk of R RoIs -> (R*oh*ow, C) rows ordered (roi, bin row, bin column)."""
    (oh, ow), (height, width) = output_size, map_size
    (ky, run_y), (kx, run_x) = taps
    rows, row_weights = _axis_taps(grid.start_y, grid.bin_h, grid.grid_h, oh, num_samples[0], height, ky, run_y)
    cols, col_weights = _axis_taps(grid.start_x, grid.bin_w, grid.grid_w, ow, num_samples[1], width, kx, run_x)
    # the mean over gh * gw samples, split over the two axes
    row_weights = row_weights / grid.grid_h.clamp(min=1)[:, None, None]
    col_weights = col_weights / grid.grid_w.clamp(min=1)[:, None, None]
    rows = rows + grid.batch[:, None, None] * height  # row index in the stacked (N*H, W) map
    # (R, oh, Ky) x (R, ow, Kx) -> (R, oh, ow, Ky, Kx) flat pixel indices into the (N*H*W, C) table
    index = rows[:, :, None, :, None] * width + cols[:, None, :, None, :]
    weight = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :]
    # (R, oh, ow, Ky, Kx) -> (R*oh*ow, Ky*Kx): one bag per bin
    return F.embedding_bag(index.reshape(-1, ky * kx), table, mode="sum",
                           per_sample_weights=weight.reshape(-1, ky * kx).to(table.dtype))


def _pool_max(table: Tensor, grid: _RoiGrid, output_size: tuple[int, int], map_size: tuple[int, int],
              num_samples: tuple[int, int]) -> Tensor:
    """Max over each bin's bilinear samples for a chunk of R RoIs -> (R*oh*ow, C); a bin without samples is 0."""
    (oh, ow), (height, width), (gh, gw) = output_size, map_size, num_samples
    y_low, y_high, wy_low, wy_high = _axis_samples(grid.start_y, grid.bin_h, grid.grid_h, oh, gh, height)
    x_low, x_high, wx_low, wx_high = _axis_samples(grid.start_x, grid.bin_w, grid.grid_w, ow, gw, width)
    rows = torch.stack([y_low, y_high], dim=-1) + grid.batch[:, None, None, None] * height  # (R, oh, gh, 2)
    cols = torch.stack([x_low, x_high], dim=-1)  # (R, ow, gw, 2)
    row_weights, col_weights = torch.stack([wy_low, wy_high], dim=-1), torch.stack([wx_low, wx_high], dim=-1)
    # (R, oh, gh, 2) x (R, ow, gw, 2) -> (R, oh, ow, gh, gw, 2, 2): the four corners of every sample
    index = rows[:, :, None, :, None, :, None] * width + cols[:, None, :, None, :, None, :]
    weight = row_weights[:, :, None, :, None, :, None] * col_weights[:, None, :, None, :, None, :]
    values = F.embedding_bag(index.reshape(-1, 4), table, mode="sum",
                             per_sample_weights=weight.reshape(-1, 4).to(table.dtype))
    num_rois, channels = grid.batch.shape[0], table.shape[1]
    values = values.view(num_rois, oh * ow, gh * gw, channels)  # (R*oh*ow*gh*gw, C) -> (R, oh*ow, gh*gw, C)
    step_y = torch.arange(gh, device=table.device)
    step_x = torch.arange(gw, device=table.device)
    # (R, gh, 1) & (R, 1, gw) -> (R, 1, gh*gw, 1): samples within the RoI's own grid
    own = ((step_y < grid.grid_h[:, None])[:, :, None] & (step_x < grid.grid_w[:, None])[:, None, :])
    best = values.masked_fill(~own.view(num_rois, 1, gh * gw, 1), float("-inf")).max(dim=2).values
    has_samples = ((grid.grid_h > 0) & (grid.grid_w > 0))[:, None, None]
    return torch.where(has_samples, best, torch.zeros_like(best)).view(-1, channels)


def _sample_groups(grid: _RoiGrid, sampling_ratio: int) -> list[tuple[Tensor | None, int, int]]:
    """(members, samples along y, samples along x) per group of RoIs; members None means all, in order."""
    num_rois = grid.batch.shape[0]
    if sampling_ratio > 0:
        return [(None, sampling_ratio, sampling_ratio)]
    if num_rois == 0:
        return [(None, 1, 1)]
    counts = torch.stack([grid.grid_h, grid.grid_w]).cpu()  # (2, R); the host synchronisation
    # bucket b holds counts in (2^(b-1), 2^b]; counts 0 and 1 share bucket 0
    buckets = torch.ceil(torch.log2(counts.clamp(min=1).double())).long()
    keys = buckets[0] * 64 + buckets[1]
    groups = []
    for key in torch.unique(keys).tolist():
        members = torch.nonzero(keys == key).flatten()
        gh, gw = (max(int(c), 1) for c in counts[:, members].amax(dim=1))
        groups.append((members, gh, gw))
    if len(groups) == 1:
        return [(None, groups[0][1], groups[0][2])]
    return groups


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float,
              sampling_ratio: int = 0, aligned: bool = True, mode: Literal["avg", "max"] = "avg") -> Tensor:
    """RoIAlign with the semantics of Detectron2's `ROIAlign` / torchvision's `roi_align`.

    Each RoI is split into oh x ow bins; a bin is the mean (or max) of gh x gw bilinear samples placed at the
    centres of a regular sub-grid. Samples further than one pixel outside the map contribute 0; the others are
    clamped to the map. Gradients flow to `features`, not to `rois`.

    Args:
        features: (N, C, H, W) float32, float64, float16 or bfloat16 feature map. Coordinates and bilinear weights
            are computed in float32 (float64 for float64 features); the output has the features' dtype, with or
            without autocast.
        rois: (R, 5) float (batch_index, x1, y1, x2, y2) in image pixels; batch indices must lie in [0, N).
        output_size: oh = ow, or (oh, ow).
        spatial_scale: feature-map pixels per image pixel (1 / stride).
        sampling_ratio: samples per bin along each axis; 0 is adaptive: ceil(roi_h / oh) x ceil(roi_w / ow),
            per RoI (needs one host synchronisation to size the computation).
        aligned: True shifts the scaled box by -0.5 pixel (Detectron2 ROIAlignV2, mmcv). False is the legacy
            Mask R-CNN form (no shift, RoI width and height forced >= 1), as in torchvision and Detectron1.
        mode: "avg" (the standard) or "max": the largest of the bin's bilinear samples.

    Returns:
        (R, C, oh, ow) pooled features in `features.dtype`. A RoI with no samples (adaptive sampling of an
        empty box) or with a non-finite coordinate pools to 0.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5) (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
    if mode not in ("avg", "max"):
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    if sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")
    output_size = _pair(output_size)
    if min(output_size) <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    _, channels, height, width = features.shape
    num_rois = rois.shape[0]
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=features.device.type, enabled=False):
        grid = _roi_grid(rois.detach().to(compute_dtype), spatial_scale, output_size, sampling_ratio, aligned)
        # (N, C, H, W) -> (N*H*W, C): one row per pixel, so each gathered index brings all its channels
        table = features.permute(0, 2, 3, 1).reshape(-1, channels)
        bins = output_size[0] * output_size[1]
        pieces, order = [], []
        for members, gh, gw in _sample_groups(grid, sampling_ratio):
            if mode == "avg":
                taps = (_num_taps(gh, height, sampling_ratio == 0), _num_taps(gw, width, sampling_ratio == 0))
                cost = bins * taps[0][0] * taps[1][0]
            else:
                cost = bins * gh * gw * (4 + channels)
            count = num_rois if members is None else members.shape[0]
            chunk = max(1, CHUNK_BUDGET // cost)
            for start in range(0, max(count, 1), chunk):  # at least once, so that R = 0 still builds a graph
                if members is None:
                    sub = grid.select(slice(start, start + chunk))
                else:
                    order.append(members[start:start + chunk])
                    sub = grid.select(order[-1].to(rois.device))
                if mode == "avg":
                    pieces.append(_pool_avg(table, sub, output_size, (height, width), (gh, gw), taps))
                else:
                    pieces.append(_pool_max(table, sub, output_size, (height, width), (gh, gw)))
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        out = out.view(num_rois, output_size[0], output_size[1], channels)  # (R*oh*ow, C) -> (R, oh, ow, C)
        if order:  # grouped by sample count: back to the order of `rois`
            inverse = torch.empty(num_rois, dtype=torch.long)
            inverse[torch.cat(order)] = torch.arange(num_rois)
            out = out.index_select(0, inverse.to(out.device))
    return out.permute(0, 3, 1, 2).contiguous()  # (R, oh, ow, C) -> (R, C, oh, ow)
