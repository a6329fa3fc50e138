"""Whole detectors assembled from backbones, necks and heads."""
from .retinanet import Detections, RetinaNet, assign_targets, postprocess, retinanet_losses

__all__ = ["Detections", "RetinaNet", "assign_targets", "postprocess", "retinanet_losses"]
