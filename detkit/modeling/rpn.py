"""Region proposal network (Ren et al. 2015): objectness and box deltas per anchor, proposals for a second stage.

The pieces are kept apart, as in the dense detectors: `RPNHead` predicts, `label_and_sample_anchors` assigns and samples
targets (no gradient), `rpn_losses` computes the losses, `generate_proposals` post-processes. `RPN` ties them together.
The FPN and C4 variants differ only in their settings (as detectron2's FPN and C4 configs): FPN has one anchor size on
each of P2-P6 with pre-NMS top-k per level (2000 train / 1000 test) and 1000 proposals per image; C4 has 15 anchors per
location on one stride-16 level with pre-NMS top-k 12000 / 6000 and 2000 / 1000 proposals.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.box_coder import BoxCoder
from ..ops.boxes import clip_boxes_per_image
from ..ops.losses import l1_loss, smooth_l1_loss
from ..ops.nms import batched_nms
from .anchors import AnchorGenerator
from .matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher, match_anchors
from .norm import make_norm
from .trident import box_scale_in_range, ignore_out_of_range_anchors

# Anchors with IoU >= 0.7 are foreground, < 0.3 background, the best anchors of every box foreground too.
RPN_MATCHER = Matcher((0.3, 0.7), (BACKGROUND, IGNORE, FOREGROUND), allow_low_quality_matches=True)


class RPNHead(nn.Module):
    """A 3x3 conv (+ a per-level norm) + ReLU shared over levels, then 1x1 convs for objectness (A sigmoid logits)
    and deltas (4A).

    Args:
        in_channels: feature width (256 for FPN, 1024 for C4 on res4).
        num_anchors: anchors per location (A): 3 for FPN, 15 for C4.
        channels: width of the 3x3 conv; 0 keeps `in_channels` (detectron2), SimpleDet's C4 RPN uses 512.
        norm: "" (none) or a norm after the 3x3 conv, one per level (`num_levels`), as SpineNet's TF Mask R-CNN
            has; `norm_momentum` (PyTorch's convention) and `norm_eps` configure it.
    """

    def __init__(self, in_channels: int, num_anchors: int, channels: int = 0, norm: str = "", num_levels: int = 1,
                 norm_momentum: float = 0.1, norm_eps: float = 1e-5):
        super().__init__()
        self.num_anchors = num_anchors
        channels = channels or in_channels
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norms = None
        if norm:  # the conv is shared across levels, its norms are not
            self.norms = nn.ModuleList(make_norm(norm, channels, momentum=norm_momentum, eps=norm_eps)
                                       for _ in range(num_levels))
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level (N, C, H, W) maps -> per level (N, H*W*A) objectness logits and (N, H*W*A, 4) deltas.

        The anchor dimension follows `AnchorGenerator.grid_anchors`: location-major (y, then x), then anchor.
        """
        logits, deltas = [], []
        for level, x in enumerate(features):
            n, _, h, w = x.shape
            x = self.conv(x)
            x = F.relu(x if self.norms is None else self.norms[level](x))
            # (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A)
            logits.append(self.objectness(x).permute(0, 2, 3, 1).reshape(n, -1))
            # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
            deltas.append(self.deltas(x).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


def sample_labels(labels: Tensor, num_samples: int, positive_fraction: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Balanced random sampling of anchors, for every image of the batch at once.

    Per image, at most `int(num_samples * positive_fraction)` foreground anchors are kept at random, and
    background anchors fill the sample up to `num_samples` (fewer positives: more negatives). Everything not
    drawn becomes -1. Each kind is drawn with one `topk` over random keys, so there is no loop over images and no
    host synchronisation; the draw follows `generator` (or the global seed on the labels' device).

    Args:
        labels: (N, A) integer labels: 1 foreground, 0 background, -1 ignored.
        num_samples: anchors drawn per image (256 for the RPN).
        positive_fraction: the largest share of foreground in a sample (0.5).
        generator: optional random generator on the labels' device.

    Returns:
        (N, A) labels of the same dtype: 1 / 0 for sampled anchors, -1 for the rest.
    """
    n, a = labels.shape
    max_positive = int(num_samples * positive_fraction)
    keys = torch.rand((n, a), generator=generator, device=labels.device)  # in [0, 1)
    positive, negative = labels == FOREGROUND, labels == BACKGROUND

    # the max_positive positives with the largest keys; non-positives get key -1 and are drawn only when short
    top_keys, top_idxs = torch.where(positive, keys, -1.0).topk(min(max_positive, a), dim=1)  # (N, k_pos)
    positive_drawn = torch.zeros_like(positive).scatter_(1, top_idxs, top_keys >= 0)
    num_negative = num_samples - positive_drawn.sum(dim=1, keepdim=True)  # (N, 1)

    top_keys, top_idxs = torch.where(negative, keys, -1.0).topk(min(num_samples, a), dim=1)  # (N, k_neg)
    # topk is sorted, so column j is the (j+1)-th drawn negative: keep the first num_negative of them
    rank = torch.arange(top_idxs.shape[1], device=labels.device)[None]
    negative_drawn = torch.zeros_like(negative).scatter_(1, top_idxs, (top_keys >= 0) & (rank < num_negative))

    out = torch.full_like(labels, IGNORE)
    out = torch.where(negative_drawn, torch.full_like(labels, BACKGROUND), out)
    return torch.where(positive_drawn, torch.full_like(labels, FOREGROUND), out)


@torch.no_grad()
def label_and_sample_anchors(anchors: Tensor, gt_boxes: list[Tensor], ignore_boxes: list[Tensor] | None,
                             matcher: Matcher = RPN_MATCHER, *, batch_size_per_image: int = 256,
                             positive_fraction: float = 0.5, crowd_ioa: float = 0.5,
                             generator: torch.Generator | None = None, valid_ranges: Tensor | None = None,
                             range_ignore_iou: float = 0.3) -> tuple[Tensor, Tensor]:
    """Match the anchors of a batch to its ground truth, then draw the balanced sample the RPN is trained on.

    Args:
        anchors: (A, 4) anchors of all levels, concatenated.
        gt_boxes: per image (G_i, 4) boxes (G_i may be 0).
        ignore_boxes: per image (M_i, 4) crowd regions, or None: background anchors covered by more than
            `crowd_ioa` of their area are ignored (as in `retinanet.assign_targets`).
        matcher: `RPN_MATCHER` (0.3 / 0.7 with low-quality matches) for the published models.
        batch_size_per_image, positive_fraction, generator: see `sample_labels`.
        valid_ranges: TridentNet's scale-aware training, or None: (N, 2) per image the (low, high) sqrt(w * h)
            range in network pixels; before sampling, anchors whose IoU with a ground-truth box outside it
            exceeds `range_ignore_iou` are ignored (SimpleDet 0.3).

    Returns:
        labels: (N, A) int8: 1 sampled foreground, 0 sampled background, -1 not sampled (or ignored).
        matched_boxes: (N, A, 4) float32 matched ground truth (the anchor itself where there is none).
    """
    _, labels, matched_boxes = match_anchors(anchors, gt_boxes, ignore_boxes, matcher, crowd_ioa)
    if valid_ranges is not None:
        labels = ignore_out_of_range_anchors(labels, anchors, gt_boxes, valid_ranges, range_ignore_iou)
    return sample_labels(labels, batch_size_per_image, positive_fraction, generator), matched_boxes


def rpn_losses(pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor, labels: Tensor, matched_boxes: Tensor,
               box_coder: BoxCoder, *, box_loss: Literal["l1", "smooth_l1"] = "l1", box_loss_beta: float = 0.0,
               normalizer: float | Tensor) -> dict[str, Tensor]:
    """Objectness BCE over the sampled anchors and box regression over the sampled foreground, in float32.

    Both sums are divided by the same `normalizer`. Detectron2 uses batch_size_per_image * N (a constant, so an
    image with few anchors to sample does not weigh more); torchvision the number actually sampled. `RPN` picks
    one with its `normalizer` argument. Written with masks, not boolean indexing: no host synchronisation.

    Args:
        pred_logits: (N, A) objectness logits; pred_deltas: (N, A, 4); anchors: (A, 4).
        labels, matched_boxes: from `label_and_sample_anchors`.
        box_coder: weights (1, 1, 1, 1) for the RPN.
        box_loss: "l1" (detectron2; `box_loss_beta` unused) or "smooth_l1" with `box_loss_beta`
            (1/9 in Detectron, torchvision, SimpleDet; beta 0 is L1).
        normalizer: a number or scalar tensor.

    Returns:
        {"loss_rpn_cls", "loss_rpn_box"} float32 scalars.
    """
    n, a = labels.shape
    sampled = labels >= 0
    foreground = labels == FOREGROUND
    cls_loss = F.binary_cross_entropy_with_logits(pred_logits.float(), foreground.float(), reduction="none")
    cls_loss = (cls_loss * sampled).sum()
    reference = anchors.float()[None].expand(n, a, 4)
    # anchors without a box encode against themselves: zero targets and no log(0)
    target_boxes = torch.where(foreground[..., None], matched_boxes.float(), reference)
    # (N*A, 4) -> (N, A, 4)
    box_targets = box_coder.encode(reference.reshape(-1, 4), target_boxes.reshape(-1, 4)).view(n, a, 4)
    if box_loss == "l1":
        reg_loss = l1_loss(pred_deltas, box_targets)
    elif box_loss == "smooth_l1":
        reg_loss = smooth_l1_loss(pred_deltas, box_targets, beta=box_loss_beta)
    else:
        raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
    reg_loss = (reg_loss * foreground[..., None]).sum()
    return {"loss_rpn_cls": cls_loss / normalizer, "loss_rpn_box": reg_loss / normalizer}


@torch.no_grad()
def generate_proposals(logits_per_level: Sequence[Tensor], deltas_per_level: Sequence[Tensor],
                       anchors_per_level: Sequence[Tensor], image_sizes: Tensor | Sequence[tuple[int, int]],
                       box_coder: BoxCoder | None = None, *, pre_nms_topk: int, post_nms_topk: int,
                       nms_threshold: float = 0.7, min_size: float = 0.0,
                       post_nms_topk_mode: Literal["per_image", "per_batch"] = "per_image",
                       valid_ranges: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Decode the best anchors of every level into proposals, as detectron2's FPN and C4 RPNs do.

    Per image and level the `pre_nms_topk` anchors with the highest objectness are decoded and clipped to the
    image; boxes with a side <= `min_size` (or non-finite) get score -inf and are dropped. NMS then runs within
    each (image, level) pair, in one `batched_nms` call for the batch, and the `post_nms_topk` best survivors
    of each image are kept ("per_image": detectron2, torchvision, mmdetection) or of the whole batch
    ("per_batch": Detectron's legacy FPN training). The C4 RPN is the same call with a single level.

    Args:
        logits_per_level: per level (N, A_l) objectness logits.
        deltas_per_level: per level (N, A_l, 4) deltas.
        anchors_per_level: per level (A_l, 4) anchors, in the same order.
        image_sizes: (N, 2) (height, width) of each image before padding.
        box_coder: defaults to weights (1, 1, 1, 1).
        pre_nms_topk: candidates per image and level before NMS.
        post_nms_topk: proposals kept after NMS, per image or per batch (see `post_nms_topk_mode`).
        nms_threshold: IoU above which a lower-scoring box of the same image and level is removed.
        min_size: boxes whose width or height is not larger than this are dropped.
        valid_ranges: (N, 2) per image a (low, high) range of sqrt(w * h) in network pixels, or None: decoded
            and clipped boxes outside it are dropped before the pre-NMS top-k (TridentNet's scale-aware training).

    Returns:
        per image (boxes (P_i, 4) float32, objectness logits (P_i,) float32), by descending logit; no gradient.
    """
    box_coder = box_coder or BoxCoder()
    n = logits_per_level[0].shape[0]
    num_levels = len(logits_per_level)
    device = logits_per_level[0].device
    image_sizes = torch.as_tensor(image_sizes, device=device).reshape(n, 2)
    all_boxes, all_scores, all_groups = [], [], []
    image_idxs = torch.arange(n, device=device)[:, None]  # (N, 1)
    for level, (logits, deltas, anchors) in enumerate(zip(logits_per_level, deltas_per_level, anchors_per_level)):
        logits = logits.detach().float()
        if valid_ranges is not None:
            # TridentNet (SimpleDet's Proposal_v2): out-of-range boxes leave before the top-k, so each branch
            # keeps its own pre_nms_topk best in-range candidates; this decodes every anchor once
            a = anchors.shape[0]
            # (N*A_l, 4) decoded against their anchors -> (N, A_l, 4)
            every = box_coder.decode(deltas.detach().reshape(-1, 4), anchors[None].expand(n, a, 4).reshape(-1, 4))
            every = clip_boxes_per_image(every.view(n, a, 4), image_sizes)
            logits = logits.masked_fill(~box_scale_in_range(every, valid_ranges.to(every)[:, None, :]), float("-inf"))
        k = min(pre_nms_topk, logits.shape[1])
        top_logits, top_idxs = logits.topk(k, dim=1)  # (N, k)
        if valid_ranges is not None:  # every anchor is decoded already: (N, A_l, 4) gathered at (N, k)
            boxes = every.gather(1, top_idxs[..., None].expand(n, k, 4))
        else:
            # (N, A_l, 4) gathered at (N, k) -> (N, k, 4)
            top_deltas = deltas.detach().gather(1, top_idxs[..., None].expand(n, k, 4))
            # (N*k, 4) decoded against their anchors -> (N, k, 4)
            boxes = box_coder.decode(top_deltas.reshape(-1, 4), anchors[top_idxs.reshape(-1)]).view(n, k, 4)
        all_boxes.append(boxes)
        all_scores.append(top_logits)
        # NMS groups: boxes of different images or levels never suppress each other
        all_groups.append((image_idxs * num_levels + level).expand(n, k))
    boxes = clip_boxes_per_image(torch.cat(all_boxes, dim=1), image_sizes)  # (N, C, 4)
    scores = torch.cat(all_scores, dim=1)  # (N, C)
    groups = torch.cat(all_groups, dim=1)
    wh = boxes[..., 2:] - boxes[..., :2]
    usable = (wh > min_size).all(dim=-1) & torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores)
    scores = scores.masked_fill(~usable, float("-inf"))

    # NMS is data-dependent (and synchronises) anyway; compacting first spares it the unusable boxes
    keep = torch.isfinite(scores).flatten()
    boxes, scores, groups = boxes.view(-1, 4)[keep], scores.flatten()[keep], groups.flatten()[keep]
    kept = batched_nms(boxes, scores, groups, nms_threshold)  # by descending score over the batch
    if post_nms_topk_mode == "per_batch":
        kept = kept[:post_nms_topk]
    elif post_nms_topk_mode != "per_image":
        raise ValueError(f"post_nms_topk_mode must be 'per_image' or 'per_batch', got {post_nms_topk_mode!r}")
    kept_images = torch.div(groups[kept], num_levels, rounding_mode="floor")
    # a stable sort by image keeps the score order within each image
    order = torch.sort(kept_images, stable=True).indices
    kept, kept_images = kept[order], kept_images[order]
    counts = torch.bincount(kept_images, minlength=n)
    if post_nms_topk_mode == "per_image":
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(kept.numel(), device=device) - starts[kept_images]  # position within its image
        kept = kept[rank < post_nms_topk]
        counts = counts.clamp(max=post_nms_topk)
    per_image = counts.tolist()  # the one host synchronisation: the per-image split
    return list(zip(boxes[kept].split(per_image), scores[kept].split(per_image)))


class RPN(nn.Module):
    """Head, anchors, target assignment, losses and proposal generation of a region proposal network.

    Args (keyword-only):
        head: an `RPNHead` whose `num_anchors` equals the generator's.
        anchor_generator: anchors per level, in the head's layout (FPN: one size per level; C4: 15 on one level).
        matcher: anchor-to-ground-truth assignment, normally `RPN_MATCHER`.
        box_coder: weights (1, 1, 1, 1).
        pre_nms_topk_train, pre_nms_topk_test: candidates per image and level before NMS.
        post_nms_topk_train, post_nms_topk_test: proposals per image (or batch, see `post_nms_topk_mode`).
        nms_threshold: 0.7.
        min_box_size: proposals with a side not above this are dropped.
        batch_size_per_image, positive_fraction: the anchors sampled for the loss (256, 0.5).
        box_loss, box_loss_beta: "l1" (detectron2) or "smooth_l1" with beta (1/9: Detectron, torchvision).
        loss_weight: multiplies both losses.
        normalizer: "batch_size" divides both losses by batch_size_per_image * N (detectron2); "num_sampled" by
            the number of anchors actually sampled (torchvision), which differs when an image has too few.
        crowd_ioa: background anchors covered more than this by a crowd region are ignored.
        post_nms_topk_mode: "per_image" (detectron2) or "per_batch" (Detectron's legacy FPN training).
        range_ignore_iou: with `valid_ranges` (TridentNet), anchors above this IoU with an out-of-range
            ground-truth box are ignored.
    """

    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, matcher: Matcher, box_coder: BoxCoder,
                 pre_nms_topk_train: int = 2000, pre_nms_topk_test: int = 1000, post_nms_topk_train: int = 1000,
                 post_nms_topk_test: int = 1000, nms_threshold: float = 0.7, min_box_size: float = 0.0,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 box_loss: Literal["l1", "smooth_l1"] = "l1", box_loss_beta: float = 0.0, loss_weight: float = 1.0,
                 normalizer: Literal["batch_size", "num_sampled"] = "batch_size", crowd_ioa: float = 0.5,
                 post_nms_topk_mode: Literal["per_image", "per_batch"] = "per_image", range_ignore_iou: float = 0.3):
        super().__init__()
        if head.num_anchors != anchor_generator.num_anchors:
            raise ValueError(f"the head predicts {head.num_anchors} anchors per location, the generator makes "
                             f"{anchor_generator.num_anchors}")
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        if normalizer not in ("batch_size", "num_sampled"):
            raise ValueError(f"normalizer must be 'batch_size' or 'num_sampled', got {normalizer!r}")
        self.head, self.anchor_generator, self.matcher, self.box_coder = head, anchor_generator, matcher, box_coder
        self.pre_nms_topk_train, self.pre_nms_topk_test = pre_nms_topk_train, pre_nms_topk_test
        self.post_nms_topk_train, self.post_nms_topk_test = post_nms_topk_train, post_nms_topk_test
        self.nms_threshold, self.min_box_size = nms_threshold, min_box_size
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_loss, self.box_loss_beta, self.loss_weight = box_loss, box_loss_beta, loss_weight
        self.normalizer, self.crowd_ioa, self.post_nms_topk_mode = normalizer, crowd_ioa, post_nms_topk_mode
        self.range_ignore_iou = range_ignore_iou

    def forward(self, features: list[Tensor], image_sizes: Tensor, gt_boxes: list[Tensor] | None = None,
                ignore_boxes: list[Tensor] | None = None, image_size: tuple[int, int] | None = None,
                valid_ranges: Tensor | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Args:
            features: per level (N, C, H, W) maps, finest first, matching the anchor generator's levels.
            image_sizes: (N, 2) (height, width) of each image before padding; proposals are clipped to it.
            gt_boxes: per image (G_i, 4) boxes; needed in training.
            ignore_boxes: per image (M_i, 4) crowd regions, or None.
            image_size: the padded (height, width) of the batch, for stride_mode "image_over_grid" anchors.
            valid_ranges: (N, 2) per image a (low, high) sqrt(w * h) range in network pixels, or None
                (TridentNet's scale-aware training: it filters the proposals and the anchor labels).

        Returns:
            proposals: per image (P_i, 4) float32 boxes by descending objectness, detached.
            losses: {"loss_rpn_cls", "loss_rpn_box"} in training, else {}.
        """
        if self.training and gt_boxes is None:
            raise ValueError("the RPN needs gt_boxes in training mode")
        logits_per_level, deltas_per_level = self.head(features)
        anchors_per_level = self.anchor_generator.grid_anchors([tuple(f.shape[-2:]) for f in features],
                                                               features[0].device, image_size=image_size)
        train = self.training
        proposals = generate_proposals(logits_per_level, deltas_per_level, anchors_per_level, image_sizes,
                                       self.box_coder,
                                       pre_nms_topk=self.pre_nms_topk_train if train else self.pre_nms_topk_test,
                                       post_nms_topk=self.post_nms_topk_train if train else self.post_nms_topk_test,
                                       nms_threshold=self.nms_threshold, min_size=self.min_box_size,
                                       post_nms_topk_mode=self.post_nms_topk_mode, valid_ranges=valid_ranges)
        losses: dict[str, Tensor] = {}
        if train:
            anchors = torch.cat(anchors_per_level)  # (A, 4) over all levels
            labels, matched_boxes = label_and_sample_anchors(
                anchors, gt_boxes, ignore_boxes, self.matcher, batch_size_per_image=self.batch_size_per_image,
                positive_fraction=self.positive_fraction, crowd_ioa=self.crowd_ioa, valid_ranges=valid_ranges,
                range_ignore_iou=self.range_ignore_iou)
            if self.normalizer == "batch_size":
                normalizer: float | Tensor = float(self.batch_size_per_image * len(gt_boxes))
            else:
                normalizer = (labels >= 0).sum().clamp(min=1).float()
            # (N, A_l) and (N, A_l, 4) per level -> (N, A) and (N, A, 4)
            losses = rpn_losses(torch.cat(logits_per_level, dim=1), torch.cat(deltas_per_level, dim=1), anchors,
                                labels, matched_boxes, self.box_coder, box_loss=self.box_loss,
                                box_loss_beta=self.box_loss_beta, normalizer=normalizer)
            losses = {name: loss * self.loss_weight for name, loss in losses.items()}
        return [boxes for boxes, _ in proposals], losses
