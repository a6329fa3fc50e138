"""The second stage of Faster R-CNN: RoI sampling, box losses and post-processing, batched over images.

Sampled RoIs are kept as a fixed (N, S) grid per batch (S = RoIs per image) with a validity mask, so training
needs no per-image Python loops and no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.box_coder import BoxCoder
from ...ops.boxes import box_iou, clip_boxes_per_image
from ...ops.losses import l1_loss, smooth_l1_loss
from ..batching import Detections, nms_per_image, pad_per_image
from ..rpn import sample_labels


@dataclass
class SampledRoIs:
    """RoIs chosen for the box head, S per image (fewer real ones are padded and marked invalid)."""

    boxes: Tensor  # (N, S, 4) float32 xyxy, network pixels
    valid: Tensor  # (N, S) bool: a sampled RoI (False: padding)
    gt_classes: Tensor  # (N, S) int64: 0..K-1 foreground, K background (meaningless where not valid)
    matched_boxes: Tensor  # (N, S, 4) the matched ground-truth box (meaningful for foreground)
    matched_idxs: Tensor  # (N, S) int64 index of the matched ground truth in its image (for mask targets)
    num_classes: int

    @property
    def foreground(self) -> Tensor:
        return self.valid & (self.gt_classes < self.num_classes)


@torch.no_grad()
def label_and_sample(proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor], *,
                     num_classes: int, fg_iou: float, batch_size_per_image: int, positive_fraction: float,
                     append_gt: bool) -> SampledRoIs:
    """`label_and_sample_padded` for per-image (P_i, 4) proposals, optionally with the ground truth appended."""
    if append_gt:
        proposals = [torch.cat([p.float(), g.float()]) for p, g in zip(proposals, gt_boxes)]
    props, valid = pad_per_image([p.float() for p in proposals], 4)
    return label_and_sample_padded(props, valid, gt_boxes, gt_labels, num_classes=num_classes, fg_iou=fg_iou,
                                   batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)


@torch.no_grad()
def label_and_sample_padded(props: Tensor, prop_valid: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], *,
                            num_classes: int, fg_iou: float, batch_size_per_image: int,
                            positive_fraction: float) -> SampledRoIs:
    """Match proposals to ground truth and draw a balanced sample of RoIs per image.

    Args:
        props: (N, P, 4) proposals of the batch (detached), padded; prop_valid: (N, P) which are real.
        gt_boxes, gt_labels: per image (G_i, 4) and (G_i,) in 0..K-1.
        fg_iou: IoU >= fg_iou is foreground, below is background (no ignore band, no low-quality matches).
        batch_size_per_image, positive_fraction: at most this many RoIs per image, at most this share foreground.

    Returns:
        S = min(batch_size_per_image, P) RoIs per image, foreground first.
    """
    boxes, gt_valid = pad_per_image([b.float() for b in gt_boxes], 4)  # (N, G, 4), (N, G)
    labels, _ = pad_per_image([lab.view(-1, 1) for lab in gt_labels], 1)  # (N, G, 1)
    n, p = prop_valid.shape
    if boxes.shape[1] > 0:
        # (N, G, 4) x (N, P, 4) -> (N, G, P); padded ground truth never matches
        iou = box_iou(boxes, props).masked_fill(~gt_valid[..., None], -1.0)
        best_iou, matched_idxs = iou.max(dim=1)  # (N, P)
        classes = labels[..., 0].gather(1, matched_idxs)
        matched_boxes = boxes.gather(1, matched_idxs[..., None].expand(n, p, 4))
    else:
        best_iou = props.new_zeros((n, p))
        matched_idxs = torch.zeros((n, p), dtype=torch.int64, device=props.device)
        classes, matched_boxes = matched_idxs, props
    foreground = prop_valid & (best_iou >= fg_iou)
    gt_classes = torch.where(foreground, classes, torch.full_like(classes, num_classes))
    # 1 foreground, 0 background, -1 padding -> the sampler keeps a balanced subset (the others become -1)
    flags = torch.where(prop_valid, foreground.long(), torch.full_like(matched_idxs, -1))
    chosen = sample_labels(flags, batch_size_per_image, positive_fraction) >= 0
    s = min(batch_size_per_image, p)
    # the chosen proposals first (foreground before background), as a fixed (N, S) grid
    order = chosen.long() * 2 + foreground.long()
    idx = order.topk(s, dim=1, sorted=True).indices  # (N, S)
    gather4 = idx[..., None].expand(n, s, 4)
    return SampledRoIs(boxes=props.gather(1, gather4), valid=chosen.gather(1, idx),
                       gt_classes=gt_classes.gather(1, idx), matched_boxes=matched_boxes.gather(1, gather4),
                       matched_idxs=matched_idxs.gather(1, idx), num_classes=num_classes)


def fast_rcnn_losses(class_logits: Tensor, box_deltas: Tensor, rois: SampledRoIs, box_coder: BoxCoder, *,
                     box_loss: str = "l1", beta: float = 0.0) -> dict[str, Tensor]:
    """Softmax cross-entropy over the sampled RoIs and box regression over the foreground ones (detectron2: both
    averaged over the number of sampled RoIs).

    Args:
        class_logits: (N*S, K+1) in the row order of `rois`.
        box_deltas: (N*S, 4K) class-specific or (N*S, 4) class-agnostic.
    """
    k = rois.num_classes
    valid = rois.valid.flatten()  # (R,)
    gt_classes = rois.gt_classes.flatten().clamp(max=k)
    foreground = valid & (gt_classes < k)
    count = valid.sum().clamp(min=1).float()
    ce = F.cross_entropy(class_logits.float(), gt_classes, reduction="none")
    loss_cls = torch.where(valid, ce, 0.0).sum() / count
    r = box_deltas.shape[0]
    if box_deltas.shape[1] > 4:
        # (R, 4K) -> (R, K, 4) -> the ground-truth class's 4 columns, (R, 4)
        box_deltas = box_deltas.view(r, -1, 4).gather(1, gt_classes.clamp(max=k - 1).view(r, 1, 1).expand(r, 1, 4))
        box_deltas = box_deltas.squeeze(1)
    # rows that are not foreground (padding rows are all-zero boxes) encode a unit box against itself: zero
    # targets and no log(0); `where`, not a product, keeps their (unused) values out of the sum
    unit = torch.cat([rois.boxes.new_zeros(2), rois.boxes.new_ones(2)])  # (0, 0, 1, 1), with no host copy
    reference = torch.where(foreground[:, None], rois.boxes.reshape(-1, 4), unit)
    target_boxes = torch.where(foreground[:, None], rois.matched_boxes.reshape(-1, 4), unit)
    targets = box_coder.encode(reference, target_boxes)
    per_row = smooth_l1_loss(box_deltas, targets, beta) if box_loss == "smooth_l1" else l1_loss(box_deltas, targets)
    loss_box = torch.where(foreground[:, None], per_row, 0.0).sum() / count
    return {"loss_cls": loss_cls, "loss_box": loss_box}


@torch.no_grad()
def fast_rcnn_inference(scores: Tensor, boxes: Tensor, image_sizes: Tensor, *, score_threshold: float,
                        nms_threshold: float, max_detections: int,
                        min_box_size: float = 0.0) -> tuple[list[Detections], list[Tensor]]:
    """Per-class score threshold, one NMS over (image, class) pairs, the best `max_detections` per image.

    Args:
        scores: (N, S, K) foreground class probabilities.
        boxes: (N, S, K, 4) class-specific boxes, or (N, S, 1, 4) class-agnostic ones, in network pixels.
        image_sizes: (N, 2) (height, width) to clip to.
        min_box_size: when > 0, clipped boxes with a side below it are dropped before NMS (torchvision's
            `remove_small_boxes(1e-2)`); 0 keeps every box.

    Returns:
        One `Detections` per image, and per image the RoI row (0..S-1) each detection came from.
    """
    n, s, k = scores.shape
    boxes = clip_boxes_per_image(boxes.float().expand(n, s, k, 4), image_sizes)
    keep = scores > score_threshold  # candidates are (image, RoI, class) triples
    if min_box_size > 0:
        wh = boxes[..., 2:] - boxes[..., :2]  # (N, S, K, 2)
        keep = keep & (wh >= min_box_size).all(dim=-1)
    keep = keep.flatten()
    flat = torch.nonzero(keep).squeeze(1)
    image_idxs = torch.div(flat, s * k, rounding_mode="floor")
    roi_idxs = torch.div(flat, k, rounding_mode="floor") % s
    labels = flat % k
    cand_boxes, cand_scores = boxes.reshape(-1, 4)[flat], scores.flatten()[flat]
    kept, per_image = nms_per_image(cand_boxes, cand_scores, labels, image_idxs, n, k, nms_threshold=nms_threshold,
                                    max_detections=max_detections)
    detections = [Detections(b, sc, lab) for b, sc, lab in zip(cand_boxes[kept].split(per_image),
                                                               cand_scores[kept].split(per_image),
                                                               labels[kept].split(per_image))]
    return detections, list(roi_idxs[kept].split(per_image))
