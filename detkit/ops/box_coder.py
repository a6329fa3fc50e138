"""Box regression targets: the (dx, dy, dw, dh) parameterisation of R-CNN, with weights and a dw/dh clamp."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Detectron's clamp: a box can grow at most 1000/16 times its anchor per side in one decode.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class BoxCoder:
    """Encode boxes relative to reference boxes (anchors or proposals) and decode them back.

    deltas = (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * log(gw / aw), wh * log(gh / ah)) on centres and
    sizes. RetinaNet and RPN use weights (1, 1, 1, 1); Fast R-CNN (10, 10, 5, 5); Cascade stages 2 and 3
    (20, 20, 10, 10) and (30, 30, 15, 15). Both directions run in float32 whatever the input dtype.
    """

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def encode(self, reference: Tensor, boxes: Tensor) -> Tensor:
        """(N, 4) reference and target xyxy boxes -> (N, 4) deltas."""
        with torch.autocast(device_type=reference.device.type, enabled=False):
            reference, boxes = reference.float(), boxes.float()
            ref_wh = reference[:, 2:] - reference[:, :2]
            ref_center = reference[:, :2] + 0.5 * ref_wh
            wh = boxes[:, 2:] - boxes[:, :2]
            center = boxes[:, :2] + 0.5 * wh
            # Python-float weights: no small host-to-device copy (a CUDA sync) on every call
            wx, wy, ww, wh_weight = self.weights
            d_center = (center - ref_center) / ref_wh
            d_size = torch.log(wh / ref_wh)
            return torch.stack([wx * d_center[:, 0], wy * d_center[:, 1], ww * d_size[:, 0],
                                wh_weight * d_size[:, 1]], dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """(N, 4) deltas applied to (N, 4) reference boxes -> (N, 4) xyxy boxes (float32).

        `deltas` may also be (N, K*4) (class-specific regression): each group of 4 is decoded against the same
        reference box, giving (N, K*4).
        """
        with torch.autocast(device_type=reference.device.type, enabled=False):
            deltas, reference = deltas.float(), reference.float()
            n, k = deltas.shape[0], deltas.shape[1] // 4
            # (N, K*4) -> (N, K, 4)
            deltas = deltas.reshape(n, k, 4)
            ref_wh = (reference[:, 2:] - reference[:, :2])[:, None, :]
            ref_center = reference[:, None, :2] + 0.5 * ref_wh
            wx, wy, ww, wh = self.weights
            # (N, K, 2) deltas over per-coordinate weights, without a host-to-device copy
            center = torch.stack([deltas[..., 0] / wx, deltas[..., 1] / wy], dim=-1) * ref_wh + ref_center
            d_size = torch.stack([deltas[..., 2] / ww, deltas[..., 3] / wh], dim=-1).clamp(max=self.scale_clamp)
            half = 0.5 * torch.exp(d_size) * ref_wh
            # (N, K, 4) -> (N, K*4)
            return torch.cat([center - half, center + half], dim=-1).reshape(n, k * 4)
