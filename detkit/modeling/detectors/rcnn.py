"""Two-stage detectors: Faster R-CNN (C4 or FPN), Mask R-CNN and Cascade R-CNN in one module.

A backbone (+ FPN) feeds the RPN, whose proposals go through one box stage (Faster/Mask R-CNN) or several
(Cascade R-CNN: each stage refines the previous stage's boxes with a stricter IoU). Mask R-CNN adds a mask
branch on the foreground RoIs in training and on the final detections at test time. TridentNet is Faster R-CNN
C4 on a trident backbone whose res4 folds B branches into the batch: the RPN and the RoI head run on the B*N
folded rows, each row its own "image" (`TridentBranches` folds the per-image inputs and merges the branches).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ...config.schema import InputConfig, MaskHeadConfig, RoIHeadsConfig
from ...data.transforms import normalize
from ...ops.box_coder import BoxCoder
from ...ops.boxes import clip_boxes_per_image
from ..batching import Detections, pad_per_image
from ..mask_ops import mask_targets
from ..roi_heads.fast_rcnn import SampledRoIs, fast_rcnn_inference, fast_rcnn_losses, label_and_sample_padded
from ..roi_heads.mask_head import mask_rcnn_loss, select_class_masks
from ..trident import TridentBranches, box_scale_in_range


class BoxStage(nn.Module):
    """One box stage: RoI features -> head -> class scores and box deltas, with its own IoU and box coder."""

    def __init__(self, head: nn.Module, predictor: nn.Module, box_coder: BoxCoder, fg_iou: float,
                 loss_weight: float = 1.0):
        super().__init__()
        self.head, self.predictor = head, predictor
        self.box_coder, self.fg_iou, self.loss_weight = box_coder, fg_iou, loss_weight

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictor(self.head(pooled))

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """(N*S, 4K) or (N*S, 4) deltas on (N, S, 4) RoIs -> (N, S, K or 1, 4) boxes."""
        n, s, _ = boxes.shape
        per_row = deltas.shape[1] // 4
        reference = boxes.reshape(-1, 1, 4).expand(-1, per_row, 4).reshape(-1, 4)
        return self.box_coder.decode(deltas.reshape(-1, 4), reference).view(n, s, per_row, 4)


class TwoStageDetector(nn.Module):
    """Backbone (+ FPN) -> RPN -> box stages (-> mask branch).

    Args (keyword-only):
        backbone: returns a dict of feature maps.
        neck: an FPN over them, or None (C4: the RPN and RoIs use the backbone's single output).
        rpn: proposals and their losses from the RPN features.
        rpn_features, roi_features: names of the maps the RPN and the RoI poolers read (FPN: p2..p6 / p2..p5).
        box_pooler: RoI features for the box stages; stages: one BoxStage (Faster R-CNN) or several (Cascade).
        mask_pooler, mask_head: the mask branch (Mask R-CNN), or None. With the res5 box head the mask head reads
            the box head's res5 map instead (`mask_pooler` None).
        input_cfg: pixel normalisation of the uint8 input; cfg: sampling and post-processing; mask_cfg.
        trident: TridentNet's branches (the backbone folds them into the batch; see `make_trident`), or None.
            Sampling then draws `cfg.batch_size_per_image` RoIs per image and branch, and testing merges an
            image's branches before the per-class NMS.
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, rpn: nn.Module, rpn_features: Sequence[str],
                 roi_features: Sequence[str], box_pooler: nn.Module, stages: Sequence[BoxStage],
                 input_cfg: InputConfig, cfg: RoIHeadsConfig, mask_pooler: nn.Module | None = None,
                 mask_head: nn.Module | None = None, mask_cfg: MaskHeadConfig | None = None,
                 trident: TridentBranches | None = None):
        super().__init__()
        if trident is not None and mask_head is not None:
            raise ValueError("TridentNet is built as Faster R-CNN: the mask branch does not unfold the branches")
        self.trident = trident
        self.backbone, self.neck, self.rpn = backbone, neck, rpn
        self.rpn_features, self.roi_features = tuple(rpn_features), tuple(roi_features)
        self.box_pooler, self.stages = box_pooler, nn.ModuleList(stages)
        self.mask_pooler, self.mask_head = mask_pooler, mask_head
        self.input_cfg, self.cfg, self.mask_cfg = input_cfg, cfg, mask_cfg
        # (1, 3, 1, 1) normalisation constants on the model's device: not in the state dict
        self.register_buffer("pixel_mean", torch.tensor(input_cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(input_cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.num_classes = stages[0].predictor.num_classes

    @property
    def has_masks(self) -> bool:
        return self.mask_head is not None

    def route_trunk_weights(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """ImageNet trunk tensors (ResNet names) -> this model's names, and the model prefixes the trunk fills.

        The C4 res5 head took the trunk's last stage (`take_res5`), so its `layer4.*` (and v2 `post_norm.*`)
        tensors go to `stages.0.head.res5.*`; everything else goes to `backbone.*`.
        """
        head = self.stages[0].head
        moved = head.trunk_names() if hasattr(head, "trunk_names") else {}
        out = {}
        for key, value in state.items():
            prefix = next((p for p in moved if key.startswith(p)), None)
            out[f"stages.0.head.{moved[prefix]}{key[len(prefix):]}" if prefix else f"backbone.{key}"] = value
        return out, ("backbone.", *(f"stages.0.head.{name}" for name in moved.values()))

    def forward(self, images: Tensor, image_sizes: Tensor, targets: list | None = None, *,
                image_scales: Tensor | None = None) -> dict[str, Tensor] | list[Detections]:
        """Args:
            images: (N, 3, H, W) uint8 RGB batch, zero-padded bottom/right.
            image_sizes: (N, 2) (height, width) before padding.
            targets: in training, per image `boxes`, `labels`, `ignore_boxes` (and `masks` for Mask R-CNN).
            image_scales: (N,) network pixels per original-image pixel (`Batch.image_scales`); only TridentNet's
                size ranges use it (they are in original pixels; None: taken as 1).

        Returns:
            training: the losses; eval: one `Detections` per image in network-input pixels (with `mask_probs`).
        """
        if self.training and targets is None:
            raise ValueError("a two-stage detector needs targets in training mode")
        with record_function("detkit.backbone"):
            x = normalize(images, image_sizes, self.input_cfg, mean=self.pixel_mean, std=self.pixel_std)
            features = self.backbone(x)
        if self.neck is not None:
            with record_function("detkit.neck"):
                features = self.neck(features)
        num_images, ranges = images.shape[0], None
        if self.trident is not None:
            # the maps hold B rows per image, branch-major (row b * N + n): every per-image input follows
            num_branches = features[self.rpn_features[0]].shape[0] // num_images
            image_sizes, targets = self.trident.fold(image_sizes, targets, num_branches)
            ranges = self.trident.ranges(num_images, num_branches, image_scales, images.device)  # (B*N, 2) or None
        gt_boxes = [t.boxes for t in targets] if self.training else None
        with record_function("detkit.rpn"):
            # the ranges filter proposals in training only, as SimpleDet's test RPN keeps every proposal
            proposals, losses = self.rpn([features[f] for f in self.rpn_features], image_sizes, gt_boxes,
                                         [t.ignore_boxes for t in targets] if self.training else None,
                                         image_size=tuple(images.shape[-2:]),
                                         valid_ranges=ranges if self.training else None)
        roi_maps = [features[f] for f in self.roi_features]
        if self.training:
            losses.update(self._train_roi_heads(roi_maps, proposals, image_sizes, targets, ranges))
            return losses
        with record_function("detkit.roi_heads"):
            return self._infer(roi_maps, proposals, image_sizes, num_images, ranges)

    def _train_roi_heads(self, roi_maps: list[Tensor], proposals: list[Tensor], image_sizes: Tensor,
                         targets: list, ranges: Tensor | None = None) -> dict[str, Tensor]:
        cfg, losses = self.cfg, {}
        gt_boxes, gt_labels = [t.boxes for t in targets], [t.labels for t in targets]
        boxes, valid = pad_per_image([p.detach().float() for p in proposals], 4)
        gt, gt_valid = pad_per_image([b.float() for b in gt_boxes], 4)  # appended to every stage's proposals
        if ranges is not None:  # TridentNet appends only a branch's in-range boxes (SimpleDet filter_scales)
            gt_valid &= box_scale_in_range(gt, ranges[:, None, :])
        first_sample, res5_map = None, None
        for i, stage in enumerate(self.stages):
            if cfg.append_gt:
                boxes, valid = torch.cat([boxes, gt], 1), torch.cat([valid, gt_valid], 1)
            with record_function("detkit.sample_rois"):
                sample = label_and_sample_padded(
                    boxes, valid, gt_boxes, gt_labels, num_classes=self.num_classes, fg_iou=stage.fg_iou,
                    batch_size_per_image=cfg.batch_size_per_image, positive_fraction=cfg.positive_fraction)
            pooled = self.box_pooler(roi_maps, list(sample.boxes.unbind(0)))
            if i == 0 and self.has_masks and self.mask_pooler is None:
                feats, res5_map = stage.head(pooled, return_map=True)
                class_logits, deltas = stage.predictor(feats)
            else:
                class_logits, deltas = stage(pooled)
            suffix = f"_stage{i + 1}" if len(self.stages) > 1 else ""
            for name, value in fast_rcnn_losses(class_logits, deltas, sample, stage.box_coder,
                                                box_loss=cfg.box_loss, beta=cfg.box_loss_beta).items():
                losses[name + suffix] = value * stage.loss_weight
            if first_sample is None:
                first_sample = sample
            if i + 1 < len(self.stages):
                # the next stage starts from this stage's refined boxes (class-agnostic), without gradient
                refined = stage.decode(deltas.detach(), sample.boxes)[:, :, 0]
                boxes, valid = clip_boxes_per_image(refined, image_sizes), sample.valid
        if self.has_masks:
            losses["loss_mask"] = self._mask_loss(roi_maps, first_sample, res5_map, targets)
        return losses

    def _mask_loss(self, roi_maps: list[Tensor], sample: SampledRoIs, res5_map: Tensor | None,
                   targets: list) -> Tensor:
        n, s = sample.valid.shape
        # foreground RoIs come first in each image's row, at most ceil(S * positive_fraction) of them: a fixed
        # (N, F) slice holds them all, so no host synchronisation picks them out
        f = min(s, math.ceil(self.cfg.batch_size_per_image * self.cfg.positive_fraction))
        fg = sample.foreground[:, :f]  # (N, F)
        boxes = sample.boxes[:, :f]
        if res5_map is not None:  # C4: the box head's res5 output of those RoIs
            features = res5_map.view(n, s, *res5_map.shape[1:])[:, :f].flatten(0, 1)
        else:
            features = self.mask_pooler(roi_maps, list(boxes.unbind(0)))
        logits = self.mask_head(features)  # (N*F, K or 1, M, M)
        classes = sample.gt_classes[:, :f].clamp(max=self.num_classes - 1).flatten()
        logits = select_class_masks(logits, classes)  # (N*F, M, M)
        with torch.no_grad():
            # the ground-truth polygons and bitmaps live on the host: rasterise the foreground RoIs there
            rows = [r.nonzero().squeeze(1) for r in fg.cpu()]
            matched = sample.matched_idxs[:, :f].cpu()
            gt_fg = mask_targets([t.masks for t in targets], [m[r] for m, r in zip(matched, rows)],
                                 [b[r.to(b.device)] for b, r in zip(boxes, rows)], size=logits.shape[-1])
            gt = logits.new_zeros(logits.shape, dtype=torch.float32)
            gt[fg.flatten()] = gt_fg.to(gt.device)
        return mask_rcnn_loss(logits, gt, fg.flatten()) * self.mask_cfg.loss_weight

    @torch.no_grad()
    def _infer(self, roi_maps: list[Tensor], proposals: list[Tensor], image_sizes: Tensor, num_images: int,
               ranges: Tensor | None = None) -> list[Detections]:
        """Score and decode the proposals of every (folded) row, then post-process each of the `num_images`
        images (TridentNet: its branches' rows together, each filtered by its `ranges` row first)."""
        cfg = self.cfg
        boxes, valid = pad_per_image([p.float() for p in proposals], 4)  # (N, P, 4)
        n, p, _ = boxes.shape
        k = self.num_classes
        probs_sum = None
        for i, stage in enumerate(self.stages):
            class_logits, deltas = stage(self.box_pooler(roi_maps, list(boxes.unbind(0))))
            probs = F.softmax(class_logits.float(), dim=-1).view(n, p, k + 1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            decoded = clip_boxes_per_image(stage.decode(deltas.float(), boxes), image_sizes)  # (N, P, K or 1, 4)
            if i + 1 < len(self.stages):
                boxes = decoded[:, :, 0]
        # Cascade R-CNN scores each stage on its own input boxes and averages the class probabilities
        scores = (probs_sum / len(self.stages))[..., :k] * valid[..., None]
        if self.trident is not None:
            # (B*N, P, K) and (B*N, P, K or 1, 4) -> (N, B*P, ...): the branches of an image are merged
            scores, decoded = self.trident.merge(scores, decoded, ranges, num_images)
            image_sizes = image_sizes[:num_images]
        detections, _ = fast_rcnn_inference(scores, decoded, image_sizes, score_threshold=cfg.score_threshold,
                                            nms_threshold=cfg.nms_threshold, max_detections=cfg.max_detections,
                                            min_box_size=cfg.min_box_size)
        if self.has_masks:
            self._attach_masks(roi_maps, detections)
        return detections

    def _attach_masks(self, roi_maps: list[Tensor], detections: list[Detections]) -> None:
        counts = [len(d.boxes) for d in detections]
        if sum(counts) == 0:
            for d in detections:
                d.mask_probs = roi_maps[0].new_zeros((0, 1, 1), dtype=torch.float32)
            return
        rois = [d.boxes for d in detections]
        if self.mask_pooler is None:  # C4: res5 on the detections' pooled features, then the mask head
            _, features = self.stages[0].head(self.box_pooler(roi_maps, rois), return_map=True)
        else:
            features = self.mask_pooler(roi_maps, rois)
        logits = select_class_masks(self.mask_head(features), torch.cat([d.labels for d in detections]))
        for d, probs in zip(detections, torch.sigmoid(logits.float()).split(counts)):
            d.mask_probs = probs  # (D, M, M): pasted into the image by the caller

