"""Pure tensor ops: boxes, box coding, NMS, losses. CPU and CUDA, safe under autocast."""
from .box_coder import BoxCoder
from .boxes import (box_area, box_ioa, box_iou, clip_boxes, clip_boxes_per_image, cxcywh_to_xyxy, nonempty,
                    xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh)
from .losses import huber_loss, l1_loss, sigmoid_focal_loss, sigmoid_focal_loss_from_labels, smooth_l1_loss
from .nms import batched_nms, nms
from .roi_align import roi_align

__all__ = ["BoxCoder", "batched_nms", "box_area", "box_ioa", "box_iou", "clip_boxes", "clip_boxes_per_image",
           "cxcywh_to_xyxy", "huber_loss", "l1_loss", "nms", "nonempty", "roi_align", "sigmoid_focal_loss",
           "sigmoid_focal_loss_from_labels", "smooth_l1_loss", "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh"]
