"""Typed schemas of every detkit setting: model, data, solver, evaluation, runtime.

Configs are YAML of plain values loaded into these dataclasses by `detkit.config.load_config`; nothing in a
config is executed. Field comments say what each value means and in which units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Tuple

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


@dataclass
class ModelConfig:
    num_classes: int = 0  # 0: take the number of categories from the training set
    input: InputConfig = field(default_factory=InputConfig)

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")


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

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.test_batch_size <= 0:
            raise ConfigError("data.batch_size and data.test_batch_size must be > 0")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_image_pixels <= 0:
            raise ConfigError("data.max_image_pixels must be > 0")


@dataclass
class SolverConfig:
    """Optimisation. Lengths are in iterations unless `unit` is `epochs`."""

    optimizer: Literal["sgd"] = "sgd"
    base_lr: float = 0.01
    reference_batch_size: int = 16  # base_lr is for this total batch; the LR scales linearly with the real one
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: float = 0.0
    unit: Literal["iterations", "epochs"] = "iterations"
    max_length: int = 90_000
    schedule: Literal["step", "cosine"] = "step"
    steps: Tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    warmup_length: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0: off
    accumulate: int = 1  # gradient accumulation steps per optimiser step

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
    amp: Literal["none", "bf16", "fp16"] = "none"
    output_dir: str = "runs/default"
    log_period: int = 20
    checkpoint_period: int = 5000
    deterministic: bool = False


@dataclass
class Config:
    """A whole detkit config: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    name: str = ""  # a human name for the run; defaults to the config file's stem
