"""Config -> model, by plain code: one place where every part is chosen and wired."""
from __future__ import annotations

from ..config.schema import ModelConfig
from ..ops.box_coder import BoxCoder
from .anchors import AnchorGenerator, octave_sizes
from .backbones.resnet import ResNet
from .detectors.retinanet import RetinaNet
from .heads.retina_head import RetinaHead
from .matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from .necks.fpn import FPN


def build_resnet_fpn(cfg: ModelConfig) -> tuple[ResNet, FPN]:
    """A ResNet trunk and an FPN over its C{min_level}..C5 outputs with P6.. up to max_level."""
    f = cfg.fpn
    if not 2 <= f.min_level <= 5 or f.max_level < 5:
        raise ValueError(f"model.fpn levels must satisfy 2 <= min_level <= 5 <= max_level, got "
                         f"{f.min_level}..{f.max_level}")
    in_features = [f"res{level}" for level in range(f.min_level, 6)]
    b = cfg.backbone
    backbone = ResNet(depth=b.depth, style=b.style, norm=b.norm, freeze_at=b.freeze_at, out_features=in_features,
                      norm_eps=b.norm_eps)
    neck = FPN([backbone.out_channels[name] for name in in_features], in_features, out_channels=f.out_channels,
               first_level=f.min_level, extra_levels=f.max_level - 5, extra_source=f.extra_source)
    return backbone, neck


def build_anchor_generator(cfg: ModelConfig, strides: list[int]) -> AnchorGenerator:
    a = cfg.anchors
    sizes = [octave_sizes(a.base_size * s / strides[0], a.num_scales, a.truncate_sizes) for s in strides]
    return AnchorGenerator(strides=strides, sizes=sizes, aspect_ratios=a.aspect_ratios, offset=a.offset,
                           order=a.order, round_base=a.round_base, stride_mode=a.stride_mode)


def build_retinanet(cfg: ModelConfig, num_classes: int) -> RetinaNet:
    backbone, neck = build_resnet_fpn(cfg)
    strides = [neck.out_strides[name] for name in neck.out_features]
    anchor_generator = build_anchor_generator(cfg, strides)
    r = cfg.retinanet
    head = RetinaHead(neck.out_channels, anchor_generator.num_anchors, num_classes, num_convs=r.num_convs,
                      width=r.head_width, norm=r.head_norm, norm_per_level=r.norm_per_level,
                      num_levels=len(strides), prior_prob=r.prior_prob, activation=r.activation)
    if r.bg_iou < r.fg_iou:
        matcher = Matcher((r.bg_iou, r.fg_iou), (BACKGROUND, IGNORE, FOREGROUND), r.allow_low_quality_matches)
    else:
        matcher = Matcher((r.fg_iou,), (BACKGROUND, FOREGROUND), r.allow_low_quality_matches)
    return RetinaNet(backbone=backbone, neck=neck, head=head, anchor_generator=anchor_generator, matcher=matcher,
                     box_coder=BoxCoder(tuple(r.box_coder_weights)), input_cfg=cfg.input, cfg=r)


# the one table from config names to builders
ARCHITECTURES = {"retinanet": build_retinanet}


def build_model(cfg: ModelConfig, num_classes: int | None = None):
    """Build the detector `cfg.arch` for `num_classes` (default: cfg.num_classes, which must then be set)."""
    num_classes = num_classes or cfg.num_classes
    if not num_classes:
        raise ValueError("the number of classes is unknown: set model.num_classes or pass the dataset's")
    return ARCHITECTURES[cfg.arch](cfg, num_classes)
