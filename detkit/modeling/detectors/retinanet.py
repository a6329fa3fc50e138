"""RetinaNet (Lin et al. 2017): a dense one-stage detector with focal loss, on any backbone + pyramid.

The detector only wires parts together; target assignment, the loss and post-processing are separate
functions so that each can be tested (and reused by other dense detectors) alone.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ...config.schema import InputConfig, RetinaNetConfig
from ...data.transforms import normalize
from ...ops.box_coder import BoxCoder
from ...ops.boxes import clip_boxes_per_image
from ...ops.losses import huber_loss, l1_loss, sigmoid_focal_loss_from_labels, smooth_l1_loss
from ..anchors import AnchorGenerator
from ..batching import Detections, nms_per_image, pad_per_image
from ..heads.retina_head import flatten_predictions
from ..matcher import FOREGROUND, IGNORE, Matcher, match_anchors


@torch.no_grad()
def assign_targets(anchors: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], ignore_boxes: list[Tensor],
                   matcher: Matcher, num_classes: int, crowd_ioa: float = 0.5) -> tuple[Tensor, Tensor]:
    """Match every anchor of every image to a ground-truth box, for the whole batch at once.

    Args:
        anchors: (A, 4) anchors of all levels, concatenated.
        gt_boxes, gt_labels: per image (G_i, 4) boxes and (G_i,) labels in 0..K-1.
        ignore_boxes: per image (M_i, 4) crowd regions; background anchors covered by more than `crowd_ioa`
            of their area are ignored instead (a crowd is neither an object to find nor background).
        matcher: IoU thresholds and labels.
        num_classes: K.

    Returns:
        gt_classes: (N, A) int64: the class in 0..K-1 for foreground, K for background, -1 for ignored.
        matched_boxes: (N, A, 4) float32 box of the matched ground truth (meaningful for foreground only).
    """
    matched_idxs, match_labels, matched_boxes = match_anchors(anchors, gt_boxes, ignore_boxes, matcher, crowd_ioa)
    labels, _ = pad_per_image([lab.view(-1, 1) for lab in gt_labels], 1)  # (N, G, 1)
    gt_classes = torch.full(match_labels.shape, num_classes, dtype=torch.int64, device=anchors.device)
    if labels.shape[1] > 0:
        matched_classes = labels[..., 0].gather(1, matched_idxs)  # (N, A)
        gt_classes = torch.where(match_labels == FOREGROUND, matched_classes, gt_classes)
    return gt_classes.masked_fill(match_labels == IGNORE, -1), matched_boxes


def retinanet_losses(pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor, gt_classes: Tensor,
                     matched_boxes: Tensor, box_coder: BoxCoder, cfg: RetinaNetConfig,
                     normalizer: Tensor) -> dict[str, Tensor]:
    """Focal loss over all non-ignored anchors and box loss over foreground anchors, both divided by `normalizer`.

    Args:
        pred_logits: (N, A, K); pred_deltas: (N, A, 4); anchors: (A, 4).
        gt_classes, matched_boxes: from `assign_targets`.
        normalizer: scalar tensor (e.g. the number of foreground anchors).

    Written with masks rather than boolean indexing so that the step needs no host synchronisation.
    """
    num_classes = pred_logits.shape[-1]
    valid = gt_classes >= 0
    foreground = valid & (gt_classes < num_classes)
    # (N, A, K) -> (N, A): the one-hot targets of gt_classes, background rows all zero
    cls_loss = sigmoid_focal_loss_from_labels(pred_logits, gt_classes, cfg.focal_alpha, cfg.focal_gamma)
    cls_loss = (cls_loss * valid).sum()
    n, a = gt_classes.shape
    reference = anchors[None].expand(n, a, 4)
    # non-foreground anchors encode against themselves: zero targets, and no log(0) from empty rows
    target_boxes = torch.where(foreground[..., None], matched_boxes, reference)
    box_targets = box_coder.encode(reference.reshape(-1, 4), target_boxes.reshape(-1, 4)).view(n, a, 4)
    if cfg.box_loss == "smooth_l1":
        box_loss = smooth_l1_loss(pred_deltas, box_targets, beta=cfg.box_loss_beta)
    elif cfg.box_loss == "huber":
        box_loss = huber_loss(pred_deltas, box_targets, delta=cfg.box_loss_beta)
    else:
        box_loss = l1_loss(pred_deltas, box_targets)
    box_loss = (box_loss * foreground[..., None]).sum() * cfg.box_loss_weight
    return {"loss_cls": cls_loss / normalizer, "loss_box": box_loss / normalizer}


class RetinaNetLoss(nn.Module):
    """`retinanet_losses` with its box coder and settings bound: no state, a module so that `runtime.compile`
    compiles it in place like the other dense parts (its passes over (N, A, K) logits then fuse)."""

    def __init__(self, box_coder: BoxCoder, cfg: RetinaNetConfig):
        super().__init__()
        self.box_coder, self.cfg = box_coder, cfg

    def forward(self, pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor, gt_classes: Tensor,
                matched_boxes: Tensor, normalizer: Tensor) -> dict[str, Tensor]:
        return retinanet_losses(pred_logits, pred_deltas, anchors, gt_classes, matched_boxes, self.box_coder,
                                self.cfg, normalizer)


@torch.no_grad()
def postprocess(pred_logits_per_level: list[Tensor], pred_deltas_per_level: list[Tensor],
                anchors_per_level: list[Tensor], image_sizes: Tensor, box_coder: BoxCoder, *,
                score_threshold: float, topk_per_level: int, nms_threshold: float,
                max_detections: int) -> list[Detections]:
    """Per level keep the top-k (anchor, class) pairs above the score threshold, decode and clip them, then
    class-wise NMS over all levels and the best `max_detections` per image; batched over images.

    Args:
        pred_logits_per_level: per level (N, A_l, K); pred_deltas_per_level: per level (N, A_l, 4).
        anchors_per_level: per level (A_l, 4).
        image_sizes: (N, 2) (height, width) to clip to.
    """
    n = image_sizes.shape[0]
    device = pred_logits_per_level[0].device
    num_classes = pred_logits_per_level[0].shape[-1]
    all_boxes, all_scores, all_labels = [], [], []
    for logits, deltas, anchors in zip(pred_logits_per_level, pred_deltas_per_level, anchors_per_level):
        # (N, A_l, K) -> (N, A_l*K): candidates are (anchor, class) pairs
        scores = torch.sigmoid(logits.float()).flatten(1)
        k = min(topk_per_level, scores.shape[1])
        top_scores, top_idxs = scores.topk(k, dim=1)  # (N, k)
        anchor_idxs, labels = top_idxs // num_classes, top_idxs % num_classes
        # (N, A_l, 4) gathered at (N, k) -> (N, k, 4)
        top_deltas = deltas.gather(1, anchor_idxs[..., None].expand(n, k, 4))
        boxes = box_coder.decode(top_deltas.reshape(-1, 4), anchors[anchor_idxs.reshape(-1)]).view(n, k, 4)
        all_boxes.append(boxes)
        all_scores.append(top_scores)
        all_labels.append(labels)
    boxes = torch.cat(all_boxes, dim=1)  # (N, C, 4)
    scores = torch.cat(all_scores, dim=1)  # (N, C)
    labels = torch.cat(all_labels, dim=1)
    image_idxs = torch.arange(n, device=device)[:, None].expand_as(labels)
    boxes = clip_boxes_per_image(boxes, image_sizes)
    keep = scores.flatten() > score_threshold
    boxes, scores = boxes.view(-1, 4)[keep], scores.flatten()[keep]
    labels, image_idxs = labels.flatten()[keep], image_idxs.flatten()[keep]
    kept, per_image = nms_per_image(boxes, scores, labels, image_idxs, n, num_classes, nms_threshold=nms_threshold,
                                    max_detections=max_detections)
    return [Detections(b, s, lab) for b, s, lab in zip(boxes[kept].split(per_image), scores[kept].split(per_image),
                                                       labels[kept].split(per_image))]


def fg_normalizer(kind: str, num_fg: Tensor, num_images: int | Tensor) -> Tensor:
    """The loss normaliser of the non-EMA kinds from the foreground anchor count: "num_fg_plus_one" num_fg + 1,
    "num_fg_plus_images" num_fg + num_images, else ("num_fg") num_fg clamped to at least 1."""
    if kind == "num_fg_plus_one":
        return num_fg + 1
    if kind == "num_fg_plus_images":
        if isinstance(num_images, Tensor):
            num_images = torch.as_tensor(num_images, dtype=num_fg.dtype, device=num_fg.device)
        return num_fg + num_images
    return num_fg.clamp(min=1)


class RetinaNet(nn.Module):
    """Backbone -> pyramid -> RetinaHead; focal + box loss in training, decoded detections in eval mode.

    Args (keyword-only):
        backbone: returns a dict of feature maps.
        neck: maps them to the ordered pyramid {"p3": ..., "p7": ...}.
        head: a RetinaHead over those levels.
        anchor_generator: anchors per level, in the head's layout.
        matcher: anchor-to-ground-truth assignment.
        box_coder: box regression parameterisation.
        input_cfg: pixel normalisation of the uint8 input.
        cfg: loss and post-processing settings.
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module, head: nn.Module,
                 anchor_generator: AnchorGenerator, matcher: Matcher, box_coder: BoxCoder,
                 input_cfg: InputConfig, cfg: RetinaNetConfig):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.anchor_generator, self.matcher, self.box_coder = anchor_generator, matcher, box_coder
        self.input_cfg, self.cfg = input_cfg, cfg
        self.num_classes = head.num_classes
        # the losses over every anchor, a stateless module so that runtime.compile compiles it like the heads
        self.loss = RetinaNetLoss(box_coder, cfg)
        # detectron2's normaliser state; a buffer so that it is checkpointed and resumes exactly
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        # (1, 3, 1, 1) normalisation constants on the model's device: not in the state dict
        self.register_buffer("pixel_mean", torch.tensor(input_cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(input_cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor, targets: list | None = None, *,
                image_scales: Tensor | None = None,
                loss_normalizer: Tensor | None = None) -> dict[str, Tensor] | list[Detections]:
        """Args:
            images: (N, 3, H, W) uint8 RGB batch, zero-padded bottom/right.
            image_sizes: (N, 2) (height, width) before padding.
            targets: in training, per image an object with `boxes`, `labels`, `ignore_boxes` (loader Targets).
            image_scales: unused (RetinaNet does not depend on the original image size); accepted so that every
                detector takes the same batch fields.
            loss_normalizer: scalar; when given, both losses are divided by it instead of this batch's own
                normaliser and the EMA is left alone: the step normaliser of accumulation and DDP (see
                `step_normalizer`).

        Returns:
            training: {"loss_cls", "loss_box", "num_fg"} (+ "num_fg_total" with `loss_normalizer`); eval: one
            `Detections` per image in network-input pixels.
        """
        if self.training and targets is None:
            raise ValueError("RetinaNet needs targets in training mode")
        # the named ranges let the profiler (benchmarks/retinanet.py) attribute time to each stage
        with record_function("detkit.backbone"):
            x = normalize(images, image_sizes, self.input_cfg, mean=self.pixel_mean, std=self.pixel_std)
            features = self.backbone(x)
        with record_function("detkit.neck"):
            features = list(self.neck(features).values())
        with record_function("detkit.head"):
            logits_per_level, deltas_per_level = self.head(features)
        with record_function("detkit.anchors"):
            anchors_per_level = self.anchor_generator.grid_anchors([f.shape[-2:] for f in features], images.device,
                                                                   image_size=images.shape[-2:])
        k = self.num_classes
        if self.training:
            return self.losses(flatten_predictions(logits_per_level, k), flatten_predictions(deltas_per_level, 4),
                               torch.cat(anchors_per_level), targets, loss_normalizer)
        cfg = self.cfg
        with record_function("detkit.postprocess"):
            return postprocess([flatten_predictions([x], k) for x in logits_per_level],
                               [flatten_predictions([x], 4) for x in deltas_per_level], anchors_per_level,
                               image_sizes, self.box_coder, score_threshold=cfg.score_threshold,
                               topk_per_level=cfg.topk_per_level, nms_threshold=cfg.nms_threshold,
                               max_detections=cfg.max_detections)

    def losses(self, pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor, targets: list,
               loss_normalizer: Tensor | None = None) -> dict[str, Tensor]:
        with record_function("detkit.assign_targets"):
            gt_classes, matched_boxes = assign_targets(
                anchors, [t.boxes for t in targets], [t.labels for t in targets], [t.ignore_boxes for t in targets],
                self.matcher, self.num_classes, self.cfg.crowd_ioa)
        num_fg = ((gt_classes >= 0) & (gt_classes < self.num_classes)).sum().float()
        kind = self.cfg.normalizer
        if loss_normalizer is not None:
            normalizer = loss_normalizer.detach().to(num_fg)
        elif kind == "ema":  # the EMA's update and value, as for a whole step
            normalizer = self.step_normalizer(num_fg, len(targets))
        else:
            normalizer = fg_normalizer(kind, num_fg, len(targets))
        with record_function("detkit.losses"):
            losses = self.loss(pred_logits, pred_deltas, anchors, gt_classes, matched_boxes, normalizer)
        losses["num_fg"] = num_fg.detach() / len(targets)  # logged, not optimised
        if loss_normalizer is not None:
            losses["num_fg_total"] = num_fg.detach()  # summed over the step for `step_normalizer`
        return losses

    @torch.no_grad()
    def step_normalizer(self, num_fg: Tensor, num_images: int | Tensor) -> Tensor:
        """The loss normaliser of a whole optimiser step (all micro-batches on all ranks), per `cfg.normalizer`.

        Losses computed with `loss_normalizer=d_est` have gradients exactly d_true / d_est times too large, where
        d_true is what this returns: the trainer scales the gradients by d_est / d_true. The buffer is updated
        once per step: for "ema" with the step's foreground count (the normaliser itself), for the other kinds
        towards d_true, so that `normalizer_estimate` follows the scale of the loss.

        Args:
            num_fg: scalar, foreground anchors of the step (the sum of every micro-batch's "num_fg_total").
            num_images: images in the step.

        Returns:
            d_true: scalar float32 tensor on the buffer's device.
        """
        buffer = self.loss_normalizer
        num_fg = torch.as_tensor(num_fg, dtype=torch.float32, device=buffer.device)
        m = self.cfg.ema_momentum
        kind = self.cfg.normalizer
        if kind == "ema":
            buffer.mul_(m).add_((1 - m) * num_fg.clamp(min=1))
            return buffer.clone()
        normalizer = fg_normalizer(kind, num_fg, num_images)
        buffer.mul_(m).add_((1 - m) * normalizer)
        return normalizer

    def normalizer_estimate(self) -> Tensor:
        """The current normaliser estimate (a copy of the buffer): the `loss_normalizer` to pass for a step."""
        return self.loss_normalizer.detach().clone()
