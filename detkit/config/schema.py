"""Typed schemas of every detkit setting: model, data, solver, evaluation, runtime.

Configs are YAML of plain values loaded into these dataclasses by `detkit.config.load_config`; nothing in a
config is executed. Field comments say what each value means and in which units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Tuple, Union

from .load import ConfigError

# Pixel statistics in 0-255 units, in the channel order the network sees.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
CAFFE_MEAN_BGR = (103.53, 116.28, 123.675)


@dataclass
class InputConfig:
    """How images are normalised before the backbone: (pixel - mean) / std in 0-255 units.

    `imagenet` is the torchvision convention (RGB, 0-1 with ImageNet mean/std, written here in 0-255 units);
    `caffe` the Detectron/MSRA one (BGR, 0-255, pixel means, std 1); `custom` uses channel_order, mean, std.
    """

    normalization: Literal["imagenet", "caffe", "raw", "custom"] = "imagenet"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    pixel_mean: Tuple[float, float, float] = IMAGENET_MEAN_RGB
    pixel_std: Tuple[float, float, float] = IMAGENET_STD_RGB

    def __post_init__(self) -> None:
        if self.normalization == "imagenet":
            self.channel_order, self.pixel_mean, self.pixel_std = "RGB", IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
        elif self.normalization == "caffe":
            self.channel_order, self.pixel_mean, self.pixel_std = "BGR", CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)
        elif self.normalization == "raw":  # ResNet v2 (MXNet zoo): the network's own bn_data normalises
            self.channel_order, self.pixel_mean, self.pixel_std = "RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if any(s <= 0 for s in self.pixel_std):
            raise ConfigError(f"model.input.pixel_std: every value must be > 0, got {self.pixel_std}")


SPINENET_MODEL_IDS = ("49S", "49", "96", "143", "143L", "190")


@dataclass
class SpineNetConfig:
    """SpineNet's size and training-time settings (Du et al. 2020, and the TPU detection configs). Momentum is
    PyTorch's: TF 0.99 -> 0.01 (Model Garden, the PyTorch port, the TPU Mask R-CNN yamls, eps 1e-3); TF 0.997 ->
    0.003 (the TPU RetinaNet yamls, eps 1e-4)."""

    model_id: Union[str, int] = "49"  # 49S, 49, 96, 143, 143L or 190 (a bare 49 in YAML is read as "49")
    activation: Literal["swish", "relu"] = "swish"
    drop_connect_rate: float = 0.0  # stochastic depth of block group i of 15: rate * (i + 1) / 15; 0 is off
    norm_momentum: float = 0.01
    norm_eps: float = 1e-3
    # DropBlock after every norm and on the shortcut of every block (protocol A); keep_prob 1.0 is off
    dropblock_keep_prob: float = 1.0
    dropblock_size: int = 7  # block side in pixels, clamped to each feature map

    def __post_init__(self) -> None:
        self.model_id = str(self.model_id).upper()
        if self.model_id not in SPINENET_MODEL_IDS:
            raise ConfigError(f"model.backbone.spinenet.model_id must be one of {list(SPINENET_MODEL_IDS)}, got "
                              f"{self.model_id!r}")
        if not 0.0 <= self.drop_connect_rate < 1.0:
            raise ConfigError(f"model.backbone.spinenet.drop_connect_rate must be in [0, 1), got "
                              f"{self.drop_connect_rate}")
        if not 0.0 < self.dropblock_keep_prob <= 1.0:
            raise ConfigError(f"model.backbone.spinenet.dropblock_keep_prob must be in (0, 1] (1.0 is off), got "
                              f"{self.dropblock_keep_prob}")
        if isinstance(self.dropblock_size, bool) or not isinstance(self.dropblock_size, int) or self.dropblock_size < 1:
            raise ConfigError(f"model.backbone.spinenet.dropblock_size must be an integer >= 1, got "
                              f"{self.dropblock_size!r}")
        if not 0.0 < self.norm_momentum <= 1.0 or self.norm_eps <= 0:
            raise ConfigError("model.backbone.spinenet: norm_momentum must be in (0, 1] (PyTorch's convention: "
                              "TF 0.99 is 0.01) and norm_eps > 0")


@dataclass
class BackboneConfig:
    """The trunk. `weights`: a local ImageNet checkpoint (torchvision ResNet names, .pth or .safetensors).

    `resnet` feeds an FPN (`model.fpn`); `spinenet` (trained from scratch, `freeze_at: 0`) outputs P3-P7 itself and
    replaces the FPN. depth, style and norm_eps are ResNet's; SpineNet's own settings are in `spinenet`.
    """

    name: Literal["resnet", "spinenet"] = "resnet"
    depth: int = 50
    # "pytorch": v1b, stride on the 3x3; "caffe": v1 MSRA, stride on the 1x1; "v2": pre-activation (MXNet zoo),
    # which normalises its own raw 0-255 RGB input: use it with model.input.normalization: raw
    style: Literal["pytorch", "caffe", "v2"] = "pytorch"
    norm: Literal["FrozenBN", "BN", "SyncBN", "GN"] = "FrozenBN"
    freeze_at: int = 2  # 0 trains all; 1 freezes the stem; k >= 2 also res2..res{k}
    norm_eps: float = 1e-5  # torchvision's COCO detection weights were trained with 0
    weights: str = ""
    spinenet: SpineNetConfig = field(default_factory=SpineNetConfig)

    def __post_init__(self) -> None:
        if self.depth not in (18, 34, 50, 101):
            raise ConfigError(f"model.backbone.depth must be 18, 34, 50 or 101, got {self.depth}")
        if not 0 <= self.freeze_at <= 5:
            raise ConfigError(f"model.backbone.freeze_at must be in 0..5, got {self.freeze_at}")
        if self.name == "spinenet" and self.freeze_at != 0:
            raise ConfigError(f"model.backbone.freeze_at must be 0 with SpineNet (it has no stages to freeze), got "
                              f"{self.freeze_at}")


@dataclass
class FPNConfig:
    out_channels: int = 256
    # P6 (and P7) by a stride-2 conv from C5 (paper, Detectron) or from P5 (torchvision, TF), or "pool": P6 as
    # a stride-2 subsampling of P5 (Faster/Mask R-CNN FPN)
    extra_source: Literal["c5", "p5", "pool"] = "c5"
    min_level: int = 3
    max_level: int = 7


@dataclass
class AnchorConfig:
    """Anchors per level: side = base_size * 2^(level - min_level) * 2^(k / num_scales), k < num_scales.

    base_size 32 on P3 is the paper's 4 x stride (TF writes it as anchor_size 4; SpineNet uses 3 -> 24).
    """

    base_size: float = 32.0
    num_scales: int = 3
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    offset: float = 0.0  # anchor centres at (i + offset) * stride: 0 (Detectron, torchvision), 0.5 (TF)
    order: Literal["ratio_major", "size_major"] = "ratio_major"
    truncate_sizes: bool = False  # torchvision rounds sizes down to integers
    round_base: bool = False  # torchvision rounds the base anchors
    # "nominal": level l's anchors are 2^l apart; "image_over_grid" (torchvision): padded image size // grid
    # size per axis, which differs on P6/P7 when the padded size is not a multiple of 128
    stride_mode: Literal["nominal", "image_over_grid"] = "nominal"


@dataclass
class RetinaNetConfig:
    """Head, target assignment, losses and post-processing of RetinaNet (defaults: the paper / Detectron)."""

    num_convs: int = 4
    head_width: int = 256
    head_norm: Literal["", "BN", "SyncBN", "GN"] = ""
    norm_per_level: bool = True  # SpineNet's head: shared convs, one BatchNorm per level
    head_norm_momentum: float = 0.1  # PyTorch's convention (TF 0.99 -> 0.01); SpineNet: the backbone's
    head_norm_eps: float = 1e-5
    activation: Literal["relu", "swish"] = "relu"
    prior_prob: float = 0.01
    predictor_std: float = 0.01  # init std of the two 3x3 predictor convs (TF RetinaNet/SpineNet: 1e-5)
    # matcher: IoU < fg_iou ignored from bg_iou up; fg_iou == bg_iou means no ignore band (TF)
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa: float = 0.5  # background anchors covered more than this by a crowd region are ignored
    box_coder_weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: Literal["smooth_l1", "l1", "huber"] = "smooth_l1"
    box_loss_beta: float = 0.11  # smooth-L1 beta or Huber delta
    box_loss_weight: float = 1.0
    # normaliser of both losses: "num_fg" (positives in the batch, at least 1), "num_fg_plus_one" (TF; Detectron
    # adds 1 per image: "num_fg_plus_images"), or "ema" (detectron2: an EMA of num_fg, init 100, momentum 0.9)
    normalizer: Literal["num_fg", "num_fg_plus_one", "num_fg_plus_images", "ema"] = "num_fg_plus_images"
    ema_momentum: float = 0.9
    # post-processing
    score_threshold: float = 0.05
    topk_per_level: int = 1000
    nms_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        if self.bg_iou > self.fg_iou:
            raise ConfigError(f"model.retinanet.bg_iou ({self.bg_iou}) must be <= fg_iou ({self.fg_iou})")
        if not 0 < self.prior_prob < 1:
            raise ConfigError(f"model.retinanet.prior_prob must be in (0, 1), got {self.prior_prob}")
        if self.max_detections <= 0 or self.topk_per_level <= 0:
            raise ConfigError("model.retinanet.max_detections and topk_per_level must be > 0")


@dataclass
class RPNConfig:
    """Region proposal network (defaults: detectron2's FPN; the C4 configs raise the top-k, as detectron2's do).

    Anchors: one size per pyramid level (FPN: 32 on P2 ... 512 on P6, `anchor_sizes` has one entry per level) or
    all sizes on the single C4 level (32..512, 15 anchors per location).
    """

    anchor_sizes: Tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    crowd_ioa: float = 0.5  # background anchors covered more than this by a crowd region are ignored
    pre_nms_topk_train: int = 2000  # per level (FPN) / per image (C4)
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000  # per image
    post_nms_topk_test: int = 1000
    nms_threshold: float = 0.7
    min_box_size: float = 0.0  # proposals with a side not above this are dropped (torchvision: 1e-3)
    head_channels: int = 0  # width of the 3x3 conv; 0: the input's (detectron2); SimpleDet's C4 RPN uses 512
    # a norm after the 3x3 conv, one per level (SpineNet's TF Mask R-CNN: BN), momentum in PyTorch's convention
    norm: Literal["", "BN", "SyncBN", "GN"] = ""
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5
    box_loss: Literal["smooth_l1", "l1"] = "l1"
    box_loss_beta: float = 0.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.bg_iou > self.fg_iou:
            raise ConfigError(f"model.rpn.bg_iou ({self.bg_iou}) must be <= fg_iou ({self.fg_iou})")
        if not 0 < self.positive_fraction <= 1 or self.batch_size_per_image <= 0:
            raise ConfigError("model.rpn.positive_fraction must be in (0, 1] and batch_size_per_image > 0")


@dataclass
class RoIHeadsConfig:
    """The second stage: RoI sampling, pooling, box head and predictor, losses and post-processing.

    `head`: "2mlp" (FPN: RoIAlign 7x7 on P2-P5, two 1024-d fc layers) or "res5" (C4: RoIAlign on res4, then the
    ResNet's res5 stage and global average pooling; Detectron pools 14x14 with res5 stride 2, SimpleDet's
    C5-*ROI heads pool 7x7 with `res5_stride: 1`), or "convfc": like 2mlp on the pyramid, but `num_convs` 3x3
    convs of `conv_dim` then `num_fcs` fc layers of `fc_dim`, each with `norm` (SpineNet's TF Mask R-CNN:
    4 convs, 1 fc, BatchNorm). SpineNet's pyramid is P3-P7, and RoIs pool from all five levels.
    """

    head: Literal["2mlp", "res5", "convfc"] = "2mlp"
    fc_dim: int = 1024
    num_convs: int = 4  # convfc only
    conv_dim: int = 256  # convfc only
    num_fcs: int = 1  # convfc only
    norm: Literal["", "BN", "SyncBN", "GN"] = ""  # convfc only; momentum in PyTorch's convention
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5
    res5_stride: int = 2
    pooler_resolution: int = 7
    sampling_ratio: int = 0  # samples per bin and axis; 0: adaptive, ceil(roi size / output size)
    aligned: bool = True  # half-pixel RoIAlign (detectron2); False: the legacy form (Detectron, torchvision)
    # how each bin combines its samples: "avg" (RoIAlign) or "max" (SimpleDet's ROIAlign_v2, with sampling_ratio 2
    # and aligned false)
    pooler_mode: Literal["avg", "max"] = "avg"
    canonical_size: float = 224.0  # FPN level assignment: level = floor(4 + log2(sqrt(area) / canonical_size))
    canonical_level: int = 4
    level_eps: float = 1e-8  # added inside that log2: detectron2 1e-8, torchvision 1e-6
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5  # IoU >= fg_iou: foreground; below: background
    append_gt: bool = True  # ground-truth boxes join the proposals during training
    class_agnostic: bool = False  # one box regression for all classes (SimpleDet C4, Cascade R-CNN)
    box_coder_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_loss: Literal["smooth_l1", "l1"] = "l1"
    box_loss_beta: float = 0.0
    # post-processing
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_detections: int = 100
    min_box_size: float = 0.0  # > 0: detections narrower or shorter than this are dropped before NMS (torchvision 0.01)

    def __post_init__(self) -> None:
        if not 0 < self.positive_fraction <= 1 or self.batch_size_per_image <= 0:
            raise ConfigError("model.roi_heads.positive_fraction must be in (0, 1] and batch_size_per_image > 0")
        if self.res5_stride not in (1, 2):
            raise ConfigError(f"model.roi_heads.res5_stride must be 1 or 2, got {self.res5_stride}")
        if self.num_convs < 0 or self.num_fcs < 1:
            raise ConfigError(f"model.roi_heads: convfc needs num_convs >= 0 and num_fcs >= 1, got "
                              f"{self.num_convs} and {self.num_fcs}")


@dataclass
class MaskHeadConfig:
    """Mask R-CNN's mask branch: RoIAlign `pooler_resolution` -> `num_convs` 3x3 convs -> 2x deconv -> per-class
    logits at twice the pooled size (FPN: 14 -> 28). With the res5 head (C4) it runs on the box branch's res5
    output (7x7 -> 14x14) and `num_convs` is 0."""

    num_convs: int = 4
    conv_dim: int = 256
    pooler_resolution: int = 14
    sampling_ratio: int = 0
    class_agnostic: bool = False
    loss_weight: float = 1.0
    threshold: float = 0.5  # probability at which a pasted mask pixel belongs to the object
    # how a 28x28 mask is resampled into the image: "detectron2" (bilinear at pixel centres over the box) or
    # "torchvision" (zero border, box grown by 30/28 and truncated to integer pixels; see mask_ops.paste_masks)
    paste: Literal["detectron2", "torchvision"] = "detectron2"
    # a norm before every ReLU of the head (SpineNet's TF Mask R-CNN: BN), momentum in PyTorch's convention
    norm: Literal["", "BN", "SyncBN", "GN"] = ""
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5


@dataclass
class CascadeConfig:
    """Cascade R-CNN's stages (Cai & Vasconcelos 2018): each its own 2mlp head with class-agnostic regression."""

    ious: Tuple[float, ...] = (0.5, 0.6, 0.7)
    box_coder_weights: Tuple[Tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    stage_loss_weights: Tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        if not len(self.ious) == len(self.box_coder_weights) == len(self.stage_loss_weights):
            raise ConfigError("model.cascade: ious, box_coder_weights and stage_loss_weights need one entry per "
                              "stage")


@dataclass
class TridentConfig:
    """TridentNet (Li et al. 2019; SimpleDet's models/tridentnet) on Faster R-CNN C4: the last `num_blocks` res4
    units run once per branch, their 3x3 convs with the branch's dilation, every weight shared; the branches are
    folded into the batch, so the RPN and the RoI head run once over all of them (RoI sampling is per image and
    branch).

    `valid_ranges`: per branch [low, high] of a box's sqrt(w * h) in original-image pixels (1e9: no upper bound).
    With `scale_aware`, RPN anchors near an out-of-range ground-truth box (IoU > `anchor_ignore_iou`) are ignored
    and training proposals outside the range dropped, per branch; at test time with every branch each branch's
    detections outside its range are dropped before the branches are merged and NMS'd together.
    `test_branch`: -1 tests with every branch (TridentNet); k only with branch k (Trident-Fast: 1, dilation 2).
    """

    enabled: bool = False
    num_branches: int = 3
    dilations: Tuple[int, ...] = (1, 2, 3)
    num_blocks: int = -1  # trident units at the end of res4; -1: all but the first (SimpleDet: num_block - 1)
    valid_ranges: Tuple[Tuple[float, float], ...] = ((0.0, 90.0), (30.0, 160.0), (90.0, 1e9))
    scale_aware: bool = True
    anchor_ignore_iou: float = 0.3
    test_branch: int = -1

    def __post_init__(self) -> None:
        b = self.num_branches
        if b < 1:
            raise ConfigError(f"model.trident.num_branches must be >= 1, got {b}")
        if len(self.dilations) != b or min(self.dilations) < 1:
            raise ConfigError(f"model.trident.dilations needs num_branches ({b}) values >= 1, got {self.dilations}")
        if len(self.valid_ranges) != b:
            raise ConfigError(f"model.trident.valid_ranges needs one [low, high] per branch ({b}), got "
                              f"{len(self.valid_ranges)}")
        if any(not 0 <= low < high for low, high in self.valid_ranges):
            raise ConfigError(f"model.trident.valid_ranges must satisfy 0 <= low < high, got {self.valid_ranges}")
        if self.num_blocks == 0 or self.num_blocks < -1:
            raise ConfigError(f"model.trident.num_blocks must be -1 (all res4 units but the first) or >= 1, got "
                              f"{self.num_blocks}")
        if not -1 <= self.test_branch < b:
            raise ConfigError(f"model.trident.test_branch must be -1 (every branch) or in 0..{b - 1}, got "
                              f"{self.test_branch}")
        if not 0 <= self.anchor_ignore_iou <= 1:
            raise ConfigError(f"model.trident.anchor_ignore_iou must be in [0, 1], got {self.anchor_ignore_iou}")


@dataclass
class ModelConfig:
    arch: Literal["retinanet", "faster_rcnn", "mask_rcnn", "cascade_rcnn"] = "retinanet"
    num_classes: int = 0  # 0: take the number of categories from the training set
    # how class outputs map to categories: "dataset" (output k is the k-th category id of the dataset, sorted) or
    # "coco91" (output k is COCO category id k, torchvision's convention; use with num_classes 91)
    label_space: Literal["dataset", "coco91"] = "dataset"
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    retinanet: RetinaNetConfig = field(default_factory=RetinaNetConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    trident: TridentConfig = field(default_factory=TridentConfig)
    # a whole-detector checkpoint to start from: a detkit checkpoint or torchvision's retinanet_resnet50_fpn,
    # fasterrcnn_resnet50_fpn or maskrcnn_resnet50_fpn COCO weights (.pth read with weights_only=True, or
    # .safetensors); class-count mismatches are skipped
    weights: str = ""

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if self.trident.enabled and (self.arch != "faster_rcnn" or self.roi_heads.head != "res5"
                                     or self.backbone.name != "resnet"):
            raise ConfigError("model.trident needs arch faster_rcnn with the C4 head (model.roi_heads.head: res5) on "
                              f"a resnet backbone, got arch {self.arch}, head {self.roi_heads.head}, backbone "
                              f"{self.backbone.name}")


@dataclass
class DatasetConfig:
    """One COCO-format split: an instances JSON and the folder its `file_name`s are relative to."""

    annotations: str = ""
    images: str = ""


@dataclass
class TransformConfig:
    """Geometric transforms of one split.

    mode `resize_short` (Detectron): short side drawn from `short_sizes` (or uniformly in their range when
    `short_sample` is `range`), long side at most `max_size`; batches pad to a multiple of `size_divisibility`.
    mode `scale_jitter` (TF RetinaNet/SpineNet): scale s ~ U(scale_range); the image is resized to fit in
    round(s * output_size) squared, randomly cropped to output_size, and padded to output_size x output_size.
    """

    mode: Literal["resize_short", "scale_jitter"] = "resize_short"
    short_sizes: Tuple[int, ...] = (800,)
    short_sample: Literal["choice", "range"] = "choice"
    max_size: int = 1333
    output_size: int = 640
    scale_range: Tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        if not self.short_sizes or min(self.short_sizes) <= 0:
            raise ConfigError(f"short_sizes must be positive integers, got {self.short_sizes}")
        if self.max_size <= 0 or self.output_size <= 0 or self.size_divisibility <= 0:
            raise ConfigError("max_size, output_size and size_divisibility must be > 0")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


def _default_train_transform() -> TransformConfig:
    return TransformConfig(flip_prob=0.5)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    train_transform: TransformConfig = field(default_factory=_default_train_transform)
    test_transform: TransformConfig = field(default_factory=TransformConfig)
    batch_size: int = 2  # images per device and step
    test_batch_size: int = 1
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True  # drop training images without (non-crowd) annotations
    load_masks: bool = False
    min_box_size: float = 1.0  # boxes narrower or shorter than this many pixels (after clipping) are dropped
    on_invalid: Literal["drop", "error"] = "drop"  # what the reader does with invalid records
    max_image_pixels: int = 178_956_970  # decoding refuses larger images (decompression bombs)
    # training stops when more than this fraction of the training images cannot be decoded
    max_unreadable_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ConfigError(f"data.max_unreadable_fraction must be in [0, 1], got {self.max_unreadable_fraction}")
        if self.batch_size <= 0 or self.test_batch_size <= 0:
            raise ConfigError("data.batch_size and data.test_batch_size must be > 0")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_image_pixels <= 0:
            raise ConfigError("data.max_image_pixels must be > 0")


@dataclass
class DivergenceConfig:
    """What training does when steps stop being finite."""

    max_bad_steps: int = 5  # consecutive non-finite steps before rolling back to the last good checkpoint; 0: never
    max_rollbacks: int = 3  # rollbacks allowed before the run stops with an explanation
    lr_factor: float = 1.0  # multiplies the learning rate at each rollback, e.g. 0.5

    def __post_init__(self) -> None:
        if self.max_bad_steps < 0 or self.max_rollbacks < 0:
            raise ConfigError("solver.divergence.max_bad_steps and max_rollbacks must be >= 0")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"solver.divergence.lr_factor must be in (0, 1], got {self.lr_factor}")


@dataclass
class SolverConfig:
    """Optimisation. Lengths are in iterations unless `unit` is `epochs`."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.01
    reference_batch_size: int = 16  # base_lr is for this total batch; the LR scales linearly with the real one
    momentum: float = 0.9  # SGD only
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW only
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: float = 0.0
    unit: Literal["iterations", "epochs"] = "iterations"
    max_length: int = 90_000
    schedule: Literal["step", "cosine"] = "step"
    steps: Tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    warmup_iters: int = 1000  # always optimizer steps, whatever `unit` says (TF and Detectron both count steps)
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0: off
    accumulate: int = 1  # gradient accumulation steps per optimiser step
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)

    def __post_init__(self) -> None:
        if self.base_lr <= 0 or self.max_length <= 0 or self.reference_batch_size <= 0 or self.accumulate <= 0:
            raise ConfigError("solver.base_lr, max_length, reference_batch_size and accumulate must be > 0")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"solver.steps must be increasing, got {self.steps}")


@dataclass
class EvalConfig:
    iou_types: Tuple[Literal["bbox", "segm"], ...] = ("bbox",)
    period: int = 0  # evaluate every this many iterations during training; 0: only at the end
    max_detections: int = 100
    plots: bool = True


@dataclass
class RuntimeConfig:
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # mixed precision: bf16 or fp16 (with loss scaling) autocast; "auto" is bf16 where the device computes it
    # natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX) and none elsewhere
    amp: Literal["none", "bf16", "fp16", "auto"] = "none"
    channels_last: bool = False  # NHWC weights and activations: faster convolutions on recent CPUs and GPUs
    fold_bn: bool = True  # inference (eval, predict, benchmark): merge frozen batch norms into their convolutions
    # torch.compile the trunk, neck and dense heads (engine/compile.py) in training, evaluation and the benchmark
    compile: bool = False
    compile_backend: str = "inductor"  # a registered torch.compile backend; "eager" only traces (for tests)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    output_dir: str = "runs/default"
    log_period: int = 20
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3  # numbered checkpoints kept besides model_final.pth
    deterministic: bool = False
    # distributed training (torchrun): see engine/distributed.py
    sync_bn: bool = False  # convert BatchNorm layers to SyncBatchNorm (CUDA only)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails the run instead of hanging
    find_unused_parameters: bool = False  # DDP option for models with parameters some steps do not use

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError(f"runtime.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.dist_timeout_s <= 0:
            raise ConfigError("runtime.dist_timeout_s must be > 0")


@dataclass
class Config:
    """A whole detkit config: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    name: str = ""  # a human name for the run; defaults to the config file's stem

    def __post_init__(self) -> None:
        if self.model.arch == "mask_rcnn" and not self.data.load_masks:
            raise ConfigError("model.arch mask_rcnn learns from instance masks: set data.load_masks: true")
