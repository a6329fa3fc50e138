"""Config -> model, by plain code: one place where every part is chosen and wired."""
from __future__ import annotations

from torch import nn

from ..config.schema import ModelConfig
from ..ops.box_coder import BoxCoder
from .anchors import AnchorGenerator, octave_sizes
from .backbones.resnet import ResNet
from .backbones.spinenet import SpineNet
from .backbones.trident import make_trident
from .detectors.rcnn import BoxStage, TwoStageDetector
from .detectors.retinanet import RetinaNet
from .heads.retina_head import RetinaHead
from .matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from .necks.fpn import FPN
from .poolers import MultiScaleRoIPooler
from .roi_heads.box_head import BoxPredictor, ConvFCHead, Res5Head, TwoMLPHead, take_res5
from .roi_heads.mask_head import MaskRCNNHead
from .rpn import RPN, RPNHead
from .trident import TridentBranches


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


def build_pyramid(cfg: ModelConfig) -> tuple[nn.Module, nn.Module | None, dict[str, int], int]:
    """The trunk and neck that make the feature pyramid: ResNet + FPN, or SpineNet, which outputs P3-P7 itself
    (neck None).

    Returns:
        backbone, neck, the pyramid levels {"p3": stride, ...} finest first, and their (common) width.
    """
    b = cfg.backbone
    if b.name == "spinenet":
        s = b.spinenet
        backbone = SpineNet(s.model_id, norm=b.norm, norm_momentum=s.norm_momentum, norm_eps=s.norm_eps,
                            activation=s.activation, drop_connect_rate=s.drop_connect_rate,
                            dropblock_keep_prob=s.dropblock_keep_prob, dropblock_size=s.dropblock_size)
        return backbone, None, dict(backbone.out_strides), backbone.out_channels[backbone.out_features[0]]
    backbone, neck = build_resnet_fpn(cfg)
    return backbone, neck, {name: neck.out_strides[name] for name in neck.out_features}, neck.out_channels


def build_anchor_generator(cfg: ModelConfig, strides: list[int]) -> AnchorGenerator:
    a = cfg.anchors
    sizes = [octave_sizes(a.base_size * s / strides[0], a.num_scales, a.truncate_sizes) for s in strides]
    return AnchorGenerator(strides=strides, sizes=sizes, aspect_ratios=a.aspect_ratios, offset=a.offset,
                           order=a.order, round_base=a.round_base, stride_mode=a.stride_mode)


def build_retinanet(cfg: ModelConfig, num_classes: int) -> RetinaNet:
    backbone, neck, levels, channels = build_pyramid(cfg)
    strides = list(levels.values())
    anchor_generator = build_anchor_generator(cfg, strides)
    r = cfg.retinanet
    head = RetinaHead(channels, anchor_generator.num_anchors, num_classes, num_convs=r.num_convs,
                      width=r.head_width, norm=r.head_norm, norm_per_level=r.norm_per_level,
                      num_levels=len(strides), prior_prob=r.prior_prob, activation=r.activation,
                      norm_momentum=r.head_norm_momentum, norm_eps=r.head_norm_eps, predictor_std=r.predictor_std)
    neck = nn.Identity() if neck is None else neck  # SpineNet's outputs are the pyramid
    if r.bg_iou < r.fg_iou:
        matcher = Matcher((r.bg_iou, r.fg_iou), (BACKGROUND, IGNORE, FOREGROUND), r.allow_low_quality_matches)
    else:
        matcher = Matcher((r.fg_iou,), (BACKGROUND, FOREGROUND), r.allow_low_quality_matches)
    return RetinaNet(backbone=backbone, neck=neck, head=head, anchor_generator=anchor_generator, matcher=matcher,
                     box_coder=BoxCoder(tuple(r.box_coder_weights)), input_cfg=cfg.input, cfg=r)


def build_two_stage(cfg: ModelConfig, num_classes: int) -> TwoStageDetector:
    """Faster, Mask or Cascade R-CNN (`cfg.arch`) with a pyramid head ("2mlp", "convfc") on ResNet-FPN or SpineNet,
    or the C4 "res5" head."""
    r, rp, b = cfg.roi_heads, cfg.rpn, cfg.backbone
    if b.name == "spinenet" and r.head == "res5":
        raise ValueError("SpineNet has no res4/res5 stages: use model.roi_heads.head 2mlp or convfc")
    if r.head != "res5":
        backbone, neck, levels, channels = build_pyramid(cfg)
        rpn_features = list(levels)  # FPN: P2-P6; SpineNet: P3-P7
        if b.name == "spinenet":  # TF pools RoIs from all its levels (maskrcnn_model.py): P3-P7, 224 -> P4
            roi_features = list(rpn_features)
        else:
            roi_features = [name for name in rpn_features if int(name[1:]) <= 5]  # RoIs pool from P2-P5
        strides = list(levels.values())
        if len(rp.anchor_sizes) != len(strides):
            raise ValueError(f"model.rpn.anchor_sizes needs one size per RPN level ({len(strides)}: "
                             f"{rpn_features}), got {list(rp.anchor_sizes)}")
        sizes = [(size,) for size in rp.anchor_sizes]
    else:  # C4: RPN and RoIs on res4, res5 runs per RoI in the box head
        backbone, neck = ResNet(depth=b.depth, style=b.style, norm=b.norm, freeze_at=b.freeze_at,
                                out_features=["res4"], norm_eps=b.norm_eps), None
        t = cfg.trident
        if t.enabled:  # res4's last units run once per branch, folded into the batch
            make_trident(backbone, dilations=t.dilations, num_blocks=t.num_blocks, test_branch=t.test_branch)
        rpn_features = roi_features = ["res4"]
        strides, channels = [backbone.out_strides["res4"]], backbone.out_channels["res4"]
        sizes = [tuple(rp.anchor_sizes)]
    a = cfg.anchors
    anchor_generator = AnchorGenerator(strides=strides, sizes=sizes, aspect_ratios=rp.aspect_ratios, offset=a.offset,
                                       order=a.order, round_base=a.round_base, stride_mode=a.stride_mode)
    rpn = RPN(head=RPNHead(channels, anchor_generator.num_anchors, rp.head_channels, norm=rp.norm,
                           num_levels=len(strides), norm_momentum=rp.norm_momentum, norm_eps=rp.norm_eps),
              anchor_generator=anchor_generator,
              matcher=Matcher((rp.bg_iou, rp.fg_iou), (BACKGROUND, IGNORE, FOREGROUND), True),
              box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)), pre_nms_topk_train=rp.pre_nms_topk_train,
              pre_nms_topk_test=rp.pre_nms_topk_test, post_nms_topk_train=rp.post_nms_topk_train,
              post_nms_topk_test=rp.post_nms_topk_test, nms_threshold=rp.nms_threshold,
              min_box_size=rp.min_box_size, batch_size_per_image=rp.batch_size_per_image,
              positive_fraction=rp.positive_fraction, box_loss=rp.box_loss, box_loss_beta=rp.box_loss_beta,
              loss_weight=rp.loss_weight, crowd_ioa=rp.crowd_ioa, range_ignore_iou=cfg.trident.anchor_ignore_iou)
    roi_strides = [strides[rpn_features.index(name)] for name in roi_features]

    def pooler(resolution: int, sampling_ratio: int) -> MultiScaleRoIPooler:
        return MultiScaleRoIPooler(resolution, [1.0 / s for s in roi_strides], sampling_ratio=sampling_ratio,
                                   aligned=r.aligned, mode=r.pooler_mode, canonical_size=r.canonical_size,
                                   canonical_level=r.canonical_level, eps=r.level_eps)

    cascade = cfg.arch == "cascade_rcnn"
    if cascade:
        ious, coders, weights = cfg.cascade.ious, cfg.cascade.box_coder_weights, cfg.cascade.stage_loss_weights
    else:
        ious, coders, weights = (r.fg_iou,), (r.box_coder_weights,), (1.0,)
    stages = []
    res5_channels = 0
    for iou, coder, weight in zip(ious, coders, weights):
        if r.head == "2mlp":
            head = TwoMLPHead(channels, r.pooler_resolution, r.fc_dim)
        elif r.head == "convfc":
            head = ConvFCHead(channels, r.pooler_resolution, num_convs=r.num_convs, conv_dim=r.conv_dim,
                              num_fcs=r.num_fcs, fc_dim=r.fc_dim, norm=r.norm, norm_momentum=r.norm_momentum,
                              norm_eps=r.norm_eps)
        else:
            if cascade:
                raise ValueError("Cascade R-CNN needs a pyramid head (model.roi_heads.head: 2mlp or convfc)")
            head = Res5Head(take_res5(backbone), stride=r.res5_stride)
            res5_channels = head.out_features
        predictor = BoxPredictor(head.out_features, num_classes, class_agnostic=cascade or r.class_agnostic)
        stages.append(BoxStage(head, predictor, BoxCoder(tuple(coder)), iou, weight))
    mask_pooler = mask_head = None
    if cfg.arch == "mask_rcnn":
        m = cfg.mask_head
        if r.head != "res5":
            mask_pooler = pooler(m.pooler_resolution, m.sampling_ratio)
            mask_head = MaskRCNNHead(channels, num_classes, num_convs=m.num_convs, conv_dim=m.conv_dim,
                                     class_agnostic=m.class_agnostic, norm=m.norm, norm_momentum=m.norm_momentum,
                                     norm_eps=m.norm_eps)
        else:  # C4: the mask head reads the box head's res5 map
            mask_head = MaskRCNNHead(res5_channels, num_classes, num_convs=0, conv_dim=m.conv_dim,
                                     class_agnostic=m.class_agnostic)
    return TwoStageDetector(backbone=backbone, neck=neck, rpn=rpn, rpn_features=rpn_features,
                            roi_features=roi_features, box_pooler=pooler(r.pooler_resolution, r.sampling_ratio),
                            stages=stages, input_cfg=cfg.input, cfg=r, mask_pooler=mask_pooler, mask_head=mask_head,
                            mask_cfg=cfg.mask_head,
                            trident=TridentBranches(cfg.trident.valid_ranges, cfg.trident.scale_aware)
                            if cfg.trident.enabled else None)


# the one table from config names to builders
ARCHITECTURES = {"retinanet": build_retinanet, "faster_rcnn": build_two_stage, "mask_rcnn": build_two_stage,
                 "cascade_rcnn": build_two_stage}


def build_model(cfg: ModelConfig, num_classes: int | None = None):
    """Build the detector `cfg.arch` for `num_classes` (default: cfg.num_classes, which must then be set)."""
    num_classes = num_classes or cfg.num_classes
    if not num_classes:
        raise ValueError("the number of classes is unknown: set model.num_classes or pass the dataset's")
    return ARCHITECTURES[cfg.arch](cfg, num_classes)
