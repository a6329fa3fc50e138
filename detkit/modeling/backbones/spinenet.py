"""SpineNet (Du et al., CVPR 2020): a scale-permuted ResNet trunk that outputs P3-P7 itself, without an FPN.

Built as the TPU reference implementation (tensorflow/tpu `modeling/architecture/spinenet.py`) builds it, reference
sheet section 1: a ResNet stem with two L2 bottleneck groups, then 15 block groups whose levels, block kinds and
inputs were found by architecture search. Each block group resamples its two parent features to its own level and
input width, sums them and runs `block_repeats` ResNet blocks; the five output blocks also take in any earlier
feature nothing has used yet. A 1x1 conv + norm + activation per output level gives the pyramid.

Inputs of any size work: level l is ceil(size / 2^l) wide, the size every stride-2 conv and TF-"SAME" max-pool
here produces. The reference pads inputs to a multiple of 2^7 = 128, where both agree exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..norm import make_norm

NormFactory = Callable[[int], nn.Module]
ActivationFactory = Callable[[], nn.Module]
MIN_LEVEL, MAX_LEVEL = 3, 7
STEM_CHANNELS = 64  # the 7x7 stem conv is not scaled by filter_size_scale


@dataclass(frozen=True)
class BlockSpec:
    """One scale-permuted block group.

    `parents` index the running list of features: 0 and 1 are the stem's two L2 groups, k >= 2 the output of
    spec k - 2. `is_output` marks the block that becomes pyramid level `level`.
    """

    level: int
    block: Literal["bottleneck", "residual"]
    parents: tuple[int, int]
    is_output: bool


# The searched architecture (TPU `SPINENET_BLOCK_SPECS`; Du et al. 2020, table 1).
BLOCK_SPECS = (
    BlockSpec(2, "bottleneck", (0, 1), False),
    BlockSpec(4, "residual", (0, 1), False),
    BlockSpec(3, "bottleneck", (2, 3), False),
    BlockSpec(4, "bottleneck", (2, 4), False),
    BlockSpec(6, "residual", (3, 5), False),
    BlockSpec(4, "bottleneck", (3, 5), False),
    BlockSpec(5, "residual", (6, 7), False),
    BlockSpec(7, "residual", (6, 8), False),
    BlockSpec(5, "bottleneck", (8, 9), False),
    BlockSpec(5, "bottleneck", (8, 10), False),
    BlockSpec(4, "bottleneck", (5, 10), True),
    BlockSpec(3, "bottleneck", (4, 10), True),
    BlockSpec(5, "bottleneck", (7, 12), True),
    BlockSpec(7, "bottleneck", (5, 14), True),
    BlockSpec(6, "bottleneck", (12, 14), True),
)

# Block width per level before `filter_size_scale` (TPU `FILTER_SIZE_MAP`); a bottleneck outputs 4x its width.
FILTER_SIZES = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}


@dataclass(frozen=True)
class Scaling:
    """How a SpineNet size scales the base architecture (TPU `SCALING_MAP`; Du et al. 2020, table 2)."""

    endpoints_num_filters: int  # width of every output level
    filter_size_scale: float  # block widths are int(FILTER_SIZES[level] * this)
    resample_alpha: float  # a resampled parent is reduced to int(its block width * this) channels
    block_repeats: int  # blocks per block group


SCALING = {
    "49S": Scaling(128, 0.65, 0.5, 1),
    "49": Scaling(256, 1.0, 0.5, 1),
    "96": Scaling(256, 1.0, 0.5, 2),
    "143": Scaling(256, 1.0, 1.0, 3),
    "143L": Scaling(256, 1.3, 1.0, 3),
    "190": Scaling(512, 1.3, 1.0, 4),
}
EXPANSION = {"bottleneck": 4, "residual": 1}


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero each sample's residual branch with probability `rate`, scale the kept ones by
    1 / (1 - rate) (TPU `nn_ops.drop_connect`). The identity outside training or at rate 0."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), device=x.device).bernoulli_(keep).to(x.dtype)  # (N, 1, 1, 1)
    return x * mask / keep


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018): in training, zero block_size x block_size squares of each sample's and
    channel's map and rescale what is left so the mean is kept; the identity in eval or at keep_prob 1.

    Block centres (seeds) are drawn only where the whole block fits, with probability
    gamma = (1 - keep_prob) / b^2 * H*W / ((H - b + 1) * (W - b + 1)), so about 1 - keep_prob of the map is
    dropped before overlaps; b is block_size clamped to the map. A stride-1 max-pool grows each seed into its
    block. The rescale is numel / kept over the whole tensor (TPU `nn_ops.Dropblock`), not per sample.
    """

    def __init__(self, keep_prob: float = 1.0, block_size: int = 7):
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"DropBlock keep_prob must be in (0, 1], got {keep_prob}")
        if block_size < 1:
            raise ValueError(f"DropBlock block_size must be >= 1, got {block_size}")
        self.keep_prob, self.block_size = keep_prob, block_size

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if not self.training or self.keep_prob >= 1.0 or x.numel() == 0:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        valid_h, valid_w = height - size + 1, width - size + 1  # seed positions whose block fits
        gamma = (1.0 - self.keep_prob) / size ** 2 * height * width / (valid_h * valid_w)
        # a max-pool with padding size // 2 reaches size // 2 pixels below/right of a seed and size - 1 - size // 2
        # above/left: the seeds whose block fits start `before` pixels in (even sizes included)
        before = size - 1 - size // 2
        seeds = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        seeds[..., before:before + valid_h, before:before + valid_w] = (
            torch.rand((*x.shape[:2], valid_h, valid_w), device=x.device) < gamma).float()
        dropped = F.max_pool2d(seeds, size, stride=1, padding=size // 2)[..., :height, :width]  # even: H+1 -> H
        mask = 1.0 - dropped
        scale = mask.numel() / mask.sum().clamp(min=1.0)  # a tensor: no host synchronisation
        return x * (mask * scale).to(x.dtype)


def max_pool2d_same(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """Max-pool with TF "SAME" padding: output ceil(size / stride), the padding (never counted in the max) split
    with the odd pixel at the bottom/right. For an even input PyTorch's symmetric padding would shift every
    window by one pixel."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel_size, stride)


def _projection(in_channels: int, out_channels: int, norm: NormFactory) -> nn.Module | None:
    """The shortcut of a stride-1 block: a 1x1 conv + norm when the width changes, else None (identity)."""
    if in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm(out_channels))


class Block(nn.Module):
    """A SpineNet block at stride 1 (TPU `bottleneck_block` / `residual_block`): convs with a norm each, the
    activation after every norm but the last, stochastic depth on the branch, the shortcut sum, the activation.

    kind "bottleneck": 1x1 -> 3x3 -> 1x1 convs, output 4 x width; kind "residual": two 3x3 convs, output width.
    The shortcut projects (1x1 conv + norm) only when the input width differs from the output. DropBlock, as in
    TPU `nn_blocks`, follows every norm (after its activation) and the shortcut, projected or not."""

    KERNELS = {"bottleneck": (1, 3, 1), "residual": (3, 3)}

    def __init__(self, kind: str, in_channels: int, width: int, norm: NormFactory, activation: ActivationFactory,
                 drop_rate: float = 0.0, dropblock_keep_prob: float = 1.0, dropblock_size: int = 7):
        super().__init__()
        self.kind = kind
        kernels = self.KERNELS[kind]
        out = width * EXPANSION[kind]
        channels = in_channels
        for i, kernel in enumerate(kernels, start=1):
            out_i = out if i == len(kernels) else width
            setattr(self, f"conv{i}", nn.Conv2d(channels, out_i, kernel, padding=kernel // 2, bias=False))
            setattr(self, f"bn{i}", norm(out_i))
            channels = out_i
        self.num_layers = len(kernels)
        self.downsample = _projection(in_channels, out, norm)
        self.act = activation()
        self.drop_rate = drop_rate
        self.dropblock = DropBlock(dropblock_keep_prob, dropblock_size)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.dropblock(x if self.downsample is None else self.downsample(x))
        y = x
        for i in range(1, self.num_layers + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.num_layers:
                y = self.act(y)
            y = self.dropblock(y)
        y = drop_connect(y, self.drop_rate, self.training)
        return self.act(y + shortcut)


def block_group(kind: str, in_channels: int, width: int, repeats: int, norm: NormFactory,
                activation: ActivationFactory, drop_rate: float = 0.0, dropblock_keep_prob: float = 1.0,
                dropblock_size: int = 7) -> nn.Sequential:
    """`repeats` blocks of one kind; only the first may project its shortcut, all share the drop rate and
    DropBlock settings."""
    out = width * EXPANSION[kind]
    return nn.Sequential(*(Block(kind, in_channels if i == 0 else out, width, norm, activation, drop_rate,
                                 dropblock_keep_prob, dropblock_size) for i in range(repeats)))


class Resample(nn.Module):
    """Bring one parent feature to a block's level and input width (TPU `resample_with_alpha`, sheet 1.4).

    1x1 conv to int(parent block width * alpha) + norm + activation; to go down, a 3x3 stride-2 conv + norm +
    activation and, for a ratio above 2, ONE max-pool (kernel 3 up to ratio 4, else 5; stride ratio / 2; TF
    "SAME"); to go up, nearest-neighbour upsampling by the ratio; then a 1x1 conv to the target's input width +
    norm, without activation.

    Args:
        in_channels, in_block, in_level: the parent's width, block kind and level.
        out_channels, out_level: the target block's input width (4 x width for a bottleneck) and level.
        alpha: the resample_alpha of the model size.
    """

    def __init__(self, in_channels: int, in_block: str, in_level: int, out_channels: int, out_level: int,
                 alpha: float, norm: NormFactory, activation: ActivationFactory):
        super().__init__()
        width = int(in_channels / EXPANSION[in_block] * alpha)
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), norm(width), activation())
        self.down, self.pool, self.up_factor = None, None, 1
        if out_level > in_level:
            self.down = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1, bias=False), norm(width), activation())
            ratio = 2 ** (out_level - in_level)
            if ratio > 2:
                self.pool = (3 if ratio <= 4 else 5, ratio // 2)  # (kernel, stride)
        elif out_level < in_level:
            self.up_factor = 2 ** (in_level - out_level)
        self.expand = nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False), norm(out_channels))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """(N, C_in, h, w) at the parent's level -> (N, C_out, *size) at the target's."""
        x = self.reduce(x)
        if self.down is not None:
            x = self.down(x)
            if self.pool is not None:
                x = max_pool2d_same(x, *self.pool)
        elif self.up_factor > 1:
            # ceil sizes: the upsampled map can be a row or column larger than the target level
            x = F.interpolate(x, scale_factor=self.up_factor, mode="nearest")[..., :size[0], :size[1]]
        return self.expand(x)


def _trunc_normal_fan_in_(weight: Tensor) -> None:
    # TF's default VarianceScaling (scale 1, fan_in, truncated normal): the std of the normal before truncation at
    # two standard deviations is sqrt(1 / fan_in) / 0.8796...
    std = math.sqrt(1.0 / (weight.shape[1] * weight.shape[2] * weight.shape[3])) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class SpineNet(nn.Module):
    """SpineNet-49S/49/96/143/143L/190 returning {"p3": P3, ..., "p7": P7} (strides 8..128), each
    `endpoints_num_filters` wide.

    Args:
        model_id: "49S", "49", "96", "143", "143L" or "190" (`SCALING`).
        norm: FrozenBN, BN, SyncBN or GN (GN needs every width divisible by 32: 49, 96 and 143 only).
        norm_momentum: BatchNorm momentum in PyTorch's convention (TF 0.99 -> 0.01, TF 0.997 -> 0.003).
        norm_eps: norm epsilon (1e-3 in Model Garden and the PyTorch port; the TPU RetinaNet yamls use 1e-4).
        activation: "swish" (SiLU) or "relu", everywhere in the trunk.
        drop_connect_rate: stochastic depth of scale-permuted block group i (0-based) of N is
            rate * (i + 1) / N; the stem has none. 0 turns it off.
        dropblock_keep_prob, dropblock_size: DropBlock in every block of every group, stem included, after each
            norm and on the shortcut (TPU `nn_blocks`; the TPU SpineNet wires it so but hard-codes it off).
            Not in the resampling or output convs. keep_prob 1 turns it off.
        block_specs: the architecture (default: the published one).

    Convolutions have no bias and start from TF's default VarianceScaling (truncated normal, fan-in); norms start
    at weight 1, bias 0 (the reference never zero-initialises a block's last norm).
    """

    def __init__(self, model_id: str = "49", *, norm: str = "BN", norm_momentum: float = 0.01,
                 norm_eps: float = 1e-3, activation: Literal["swish", "relu"] = "swish",
                 drop_connect_rate: float = 0.0, dropblock_keep_prob: float = 1.0, dropblock_size: int = 7,
                 block_specs: Sequence[BlockSpec] = BLOCK_SPECS):
        super().__init__()
        if model_id not in SCALING:
            raise ValueError(f"unknown SpineNet model_id {model_id!r}; choose one of {list(SCALING)}")
        if activation not in ("swish", "relu"):
            raise ValueError(f"SpineNet activation must be 'swish' or 'relu', got {activation!r}")
        if not 0.0 <= drop_connect_rate < 1.0:
            raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate}")
        scaling = SCALING[model_id]
        self.model_id, self.block_specs = model_id, tuple(block_specs)
        widths = {level: int(base * scaling.filter_size_scale) for level, base in FILTER_SIZES.items()}

        def norm_fn(num_channels: int) -> nn.Module:
            if norm == "GN" and num_channels % 32:
                raise ValueError(f"SpineNet-{model_id} has a {num_channels}-channel layer: GN with 32 groups "
                                 "needs multiples of 32 (49, 96 and 143 fit); use BN or SyncBN")
            return make_norm(norm, num_channels, momentum=norm_momentum, eps=norm_eps)

        dropblock = dict(dropblock_keep_prob=dropblock_keep_prob, dropblock_size=dropblock_size)
        act_fn = nn.SiLU if activation == "swish" else nn.ReLU
        self.act = act_fn()

        # stem: 7x7/2 conv, norm, activation, 3x3/2 max-pool, two L2 bottleneck groups (features 0 and 1)
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 7, 2, 3, bias=False), norm_fn(STEM_CHANNELS), act_fn())
        stem_out = 4 * widths[2]
        self.stem_groups = nn.ModuleList(
            block_group("bottleneck", STEM_CHANNELS if i == 0 else stem_out, widths[2], scaling.block_repeats,
                        norm_fn, act_fn, **dropblock) for i in range(2))
        levels, kinds, channels, uses = [2, 2], ["bottleneck"] * 2, [stem_out] * 2, [0, 0]

        self.resamples, self.blocks = nn.ModuleList(), nn.ModuleList()
        self.merges: list[tuple[int, ...]] = []  # per spec: unused features summed in (output blocks only)
        outputs: dict[int, int] = {}  # level -> feature index
        for i, spec in enumerate(self.block_specs):
            if any(not 0 <= p < len(levels) for p in spec.parents):
                raise ValueError(f"block spec {i} reads {spec.parents}, but only {len(levels)} features exist")
            width = widths[spec.level]
            in_channels = width * EXPANSION[spec.block]  # a block group's input and output widths are equal
            self.resamples.append(nn.ModuleList(
                Resample(channels[p], kinds[p], levels[p], in_channels, spec.level, scaling.resample_alpha, norm_fn,
                         act_fn) for p in spec.parents))
            for p in spec.parents:  # counted as used before the merge check, as the reference does
                uses[p] += 1
            merged: tuple[int, ...] = ()
            if spec.is_output:
                # an output block also absorbs every feature nothing has read yet at its level and input width
                merged = tuple(j for j in range(len(levels))
                               if uses[j] == 0 and levels[j] == spec.level and channels[j] == in_channels)
                for j in merged:
                    uses[j] += 1
            self.merges.append(merged)
            rate = drop_connect_rate * (i + 1) / len(self.block_specs)
            self.blocks.append(block_group(spec.block, in_channels, width, scaling.block_repeats, norm_fn, act_fn,
                                           rate, **dropblock))
            levels.append(spec.level)
            kinds.append(spec.block)
            channels.append(in_channels)
            uses.append(0)
            if spec.is_output:
                if spec.level in outputs:
                    raise ValueError(f"two output blocks at level {spec.level}")
                outputs[spec.level] = len(levels) - 1
        if sorted(outputs) != list(range(MIN_LEVEL, MAX_LEVEL + 1)):
            raise ValueError(f"the output blocks must cover levels {MIN_LEVEL}..{MAX_LEVEL}, got {sorted(outputs)}")

        self.output_indices = {f"p{level}": outputs[level] for level in range(MIN_LEVEL, MAX_LEVEL + 1)}
        endpoints = scaling.endpoints_num_filters
        self.endpoints = nn.ModuleDict({
            name: nn.Sequential(nn.Conv2d(channels[index], endpoints, 1, bias=False), norm_fn(endpoints), act_fn())
            for name, index in self.output_indices.items()})
        self.out_features = tuple(self.output_indices)
        self.out_channels = {name: endpoints for name in self.out_features}
        self.out_strides = {name: 2 ** int(name[1:]) for name in self.out_features}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _trunc_normal_fan_in_(m.weight)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) normalised images -> {"p3": (N, C, ceil(H/8), ceil(W/8)), ..., "p7": (..., /128)}."""
        height, width = x.shape[-2:]
        x = max_pool2d_same(self.stem(x), 3, 2)
        features = []
        for group in self.stem_groups:
            x = group(x)
            features.append(x)
        for spec, resamples, block, merged in zip(self.block_specs, self.resamples, self.blocks, self.merges):
            size = (-(-height // 2 ** spec.level), -(-width // 2 ** spec.level))
            y = resamples[0](features[spec.parents[0]], size) + resamples[1](features[spec.parents[1]], size)
            for j in merged:
                y = y + features[j]
            features.append(block(self.act(y)))
        return {name: self.endpoints[name](features[index]) for name, index in self.output_indices.items()}
