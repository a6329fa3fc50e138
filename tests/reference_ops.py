"""Slow, literal references of detkit's batched ops, shared by the tests (loops over RoIs, bins and samples)."""
import math

import numpy as np
import torch


def bilinear(fmap, y, x):
    """One sample of a (C, H, W) numpy map, following the reference kernel line by line."""
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def slow_roi_align(features, rois, output_size, scale, sampling_ratio, aligned, mode="avg"):
    """The textbook loops over RoIs, bins and samples, in float64."""
    oh, ow = output_size
    feats = features.double().numpy()
    out = np.zeros((len(rois), feats.shape[1], oh, ow))
    offset = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        start_x, start_y = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = x2 * scale - offset - start_x, y2 * scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
        for p in range(oh):
            for q in range(ow):
                samples = [bilinear(feats[int(b)], start_y + p * bin_h + (i + 0.5) * bin_h / grid_h,
                                     start_x + q * bin_w + (j + 0.5) * bin_w / grid_w)
                           for i in range(grid_h) for j in range(grid_w)]
                if not samples:
                    continue
                if mode == "avg":
                    out[r, :, p, q] = np.sum(samples, axis=0) / max(grid_h * grid_w, 1)
                else:
                    out[r, :, p, q] = np.max(samples, axis=0)
    return torch.from_numpy(out)
