import math
from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.config import Config, ConfigError, load_config
from detkit.config.schema import SPINENET_MODEL_IDS, BackboneConfig, ModelConfig, RoIHeadsConfig, SpineNetConfig
from detkit.modeling.backbones import spinenet
from detkit.modeling.backbones.spinenet import (BLOCK_SPECS, SCALING, Block, DropBlock, Resample, Scaling,
                                                SpineNet, drop_connect, max_pool2d_same)
from detkit.modeling.build import build_model
from detkit.modeling.norm import FrozenBatchNorm2d

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# reference sheet 1.2: (level, block, parents, is_output) of features 2..16
SHEET_SPECS = [
    (2, "bottleneck", (0, 1), False), (4, "residual", (0, 1), False), (3, "bottleneck", (2, 3), False),
    (4, "bottleneck", (2, 4), False), (6, "residual", (3, 5), False), (4, "bottleneck", (3, 5), False),
    (5, "residual", (6, 7), False), (7, "residual", (6, 8), False), (5, "bottleneck", (8, 9), False),
    (5, "bottleneck", (8, 10), False), (4, "bottleneck", (5, 10), True), (3, "bottleneck", (4, 10), True),
    (5, "bottleneck", (7, 12), True), (7, "bottleneck", (5, 14), True), (6, "bottleneck", (12, 14), True),
]


def test_block_specs_are_the_published_architecture():
    assert [(s.level, s.block, s.parents, s.is_output) for s in BLOCK_SPECS] == SHEET_SPECS
    assert [i + 1 for i, s in enumerate(BLOCK_SPECS) if s.block == "residual"] == [2, 5, 7, 8]
    assert set(SCALING) == set(SPINENET_MODEL_IDS)


@pytest.mark.parametrize("model_id, widths", [
    ("49S", (41, 83, 166)), ("49", (64, 128, 256)), ("96", (64, 128, 256)), ("143", (64, 128, 256)),
    ("143L", (83, 166, 332)), ("190", (83, 166, 332))])
def test_block_widths_truncate(model_id, widths):
    with torch.device("meta"):
        net = SpineNet(model_id)
    repeats = SCALING[model_id].block_repeats
    # bottleneck widths at L2 (stem), L3 (spec 3) and L4 (spec 4); int() truncation: 64 * 0.65 = 41.6 -> 41
    assert net.stem_groups[0][0].conv1.out_channels == widths[0]
    assert net.blocks[2][0].conv1.out_channels == widths[1]
    assert net.blocks[3][0].conv1.out_channels == widths[2]
    assert len(net.blocks[0]) == len(net.stem_groups[1]) == repeats
    # the only projection shortcut of the trunk is the first stem block's (64 -> 4 x L2 width)
    projections = [name for name, m in net.named_modules() if isinstance(m, Block) and m.kind == "bottleneck"
                   and m.downsample is not None]
    assert projections == ["stem_groups.0.0"]


@pytest.mark.parametrize("model_id", SPINENET_MODEL_IDS)
def test_one_zero_out_degree_merge_feat11_into_the_l5_output(model_id):
    with torch.device("meta"):
        net = SpineNet(model_id)
    # spec 13 (0-based 12) makes feature 14, the L5 output; feature 11 (spec 10, L5 bottleneck) is never a parent
    assert {i: m for i, m in enumerate(net.merges) if m} == {12: (11,)}
    assert net.output_indices == {"p3": 13, "p4": 12, "p5": 14, "p6": 16, "p7": 15}


@pytest.mark.parametrize("model_id", SPINENET_MODEL_IDS)
def test_outputs_have_the_published_levels_strides_and_widths(model_id):
    with torch.device("meta"):  # shapes only: no weights to initialise, no arithmetic
        net = SpineNet(model_id)
        out = net(torch.zeros(2, 3, 256, 192))
    width = SCALING[model_id].endpoints_num_filters
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert net.out_strides == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert net.out_channels == dict.fromkeys(out, width)
    for name, x in out.items():
        stride = net.out_strides[name]
        assert x.shape == (2, width, math.ceil(256 / stride), math.ceil(192 / stride))


def test_real_forward_and_backward_at_128_px_and_an_odd_size():
    torch.manual_seed(0)
    net = SpineNet("49S", norm="BN", drop_connect_rate=0.2)
    out = net(torch.randn(2, 3, 128, 128))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p3": (16, 16), "p4": (8, 8), "p5": (4, 4), "p6": (2, 2), "p7": (1, 1)}
    sum(x.float().square().mean() for x in out.values()).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():  # not a multiple of 128: level l is ceil(size / 2^l)
        out = net(torch.randn(1, 3, 100, 72))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p3": (13, 9), "p4": (7, 5), "p5": (4, 3), "p6": (2, 2), "p7": (1, 1)}


def _resample(in_level, out_level, in_block="bottleneck", in_channels=1024, out_channels=1024, alpha=0.5):
    return Resample(in_channels, in_block, in_level, out_channels, out_level, alpha,
                    lambda c: nn.BatchNorm2d(c), nn.ReLU)


def test_resample_down_up_and_same_level_shapes():
    x = torch.randn(1, 1024, 40, 40)  # L4 of a 640 input
    # L4 -> L7 (ratio 8): 3x3 stride-2 conv, then ONE max-pool with kernel 5 and stride 4 (the TPU rule)
    r = _resample(4, 7)
    assert r.reduce[0].out_channels == 128 and r.pool == (5, 4) and r.up_factor == 1
    assert r(x, (5, 5)).shape == (1, 1024, 5, 5)
    # L4 -> L6 (ratio 4): kernel 3, stride 2; L4 -> L5 (ratio 2): the strided conv only
    assert _resample(4, 6).pool == (3, 2) and _resample(4, 6)(x, (10, 10)).shape == (1, 1024, 10, 10)
    assert _resample(4, 5).pool is None and _resample(4, 5)(x, (20, 20)).shape == (1, 1024, 20, 20)
    # a residual parent keeps its full width as the base: 256 * 0.5; a residual target takes 256 channels
    r = _resample(5, 3, in_block="residual", in_channels=256, out_channels=256)
    assert r.reduce[0].out_channels == 128 and r.down is None and r.up_factor == 4
    assert r(torch.randn(1, 256, 20, 20), (80, 80)).shape == (1, 256, 80, 80)
    # up-sampling is nearest-neighbour, cropped to the target's ceil size (100 px input: L5 4 -> L3 13)
    r = _resample(5, 3, in_block="residual", in_channels=256, out_channels=256).eval()
    assert r(torch.randn(1, 256, 4, 3), (13, 9)).shape == (1, 256, 13, 9)
    r = _resample(4, 4, alpha=1.0)
    assert r.down is None and r.up_factor == 1 and r.reduce[0].out_channels == 256
    assert r(x, (40, 40)).shape == (1, 1024, 40, 40)


def test_upsampling_is_nearest_neighbour():
    r = _resample(5, 4, in_block="residual", in_channels=8, out_channels=8, alpha=1.0).eval()
    x = torch.randn(1, 8, 2, 3)
    y = r.reduce(x)
    expected = r.expand(y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    torch.testing.assert_close(r(x, (4, 6)), expected)


def test_max_pool_same_pads_like_tensorflow():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF "SAME", even input: no padding on top/left, one row/column at the bottom/right
    assert max_pool2d_same(x, 3, 2).flatten().tolist() == [10.0, 11.0, 14.0, 15.0]
    # (PyTorch's symmetric padding would give [5, 7, 13, 15])
    assert nn.MaxPool2d(3, 2, 1)(x).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    # kernel 5 stride 4 on 8 px: windows [0, 5) and [4, 9) with one padded column
    y = torch.arange(64.0).view(1, 1, 8, 8)
    assert max_pool2d_same(y, 5, 4).flatten().tolist() == [36.0, 39.0, 60.0, 63.0]
    # an odd input pads symmetrically, as PyTorch does
    z = torch.randn(1, 2, 5, 7)
    torch.testing.assert_close(max_pool2d_same(z, 3, 2), nn.MaxPool2d(3, 2, 1)(z))
    assert max_pool2d_same(torch.randn(1, 1, 7, 7), 5, 4).shape == (1, 1, 2, 2)


def test_drop_connect_rates_and_behaviour():
    with torch.device("meta"):
        net = SpineNet("49S", drop_connect_rate=0.3)
    for i, group in enumerate(net.blocks):
        assert all(block.drop_rate == pytest.approx(0.3 * (i + 1) / 15) for block in group)
    assert all(block.drop_rate == 0 for group in net.stem_groups for block in group)
    x = torch.ones(1000, 1, 1, 1)
    assert drop_connect(x, 0.5, training=False) is x
    torch.manual_seed(0)
    y = drop_connect(x, 0.25, training=True)
    assert sorted(set(y.flatten().tolist())) == pytest.approx([0.0, 1 / 0.75])  # dropped, or rescaled
    assert 0.2 < (y == 0).float().mean() < 0.3


def test_initialisation_follows_tf_variance_scaling():
    torch.manual_seed(0)
    net = SpineNet("49")
    w = net.blocks[3][0].conv2.weight  # 3x3, 256 -> 256: fan_in 2304
    std = math.sqrt(1 / 2304) / 0.87962566103423978
    assert w.abs().max() <= 2 * std + 1e-7
    assert w.std().item() == pytest.approx(math.sqrt(1 / 2304), rel=0.02)  # the truncated normal's std
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_norm_choices():
    net = SpineNet("49S", norm="BN", norm_momentum=0.01, norm_eps=1e-3, activation="relu")
    bn = net.stem[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == 0.01 and bn.eps == 1e-3
    assert isinstance(net.act, nn.ReLU)
    with torch.device("meta"):
        frozen = SpineNet("49S", norm="FrozenBN")
        assert isinstance(frozen.stem[1], FrozenBatchNorm2d)
        assert isinstance(SpineNet("49", norm="GN").stem[1], nn.GroupNorm)
        with pytest.raises(ValueError, match="GN"):
            SpineNet("49S", norm="GN")  # 41-channel layers


def test_config_validation():
    cfg = SpineNetConfig(model_id=49)  # a bare 49 in YAML
    assert cfg.model_id == "49"
    assert SpineNetConfig(model_id="49s").model_id == "49S"
    with pytest.raises(ConfigError, match="model_id"):
        SpineNetConfig(model_id="50")
    with pytest.raises(ConfigError, match="drop_connect_rate"):
        SpineNetConfig(drop_connect_rate=1.0)
    with pytest.raises(ConfigError, match="freeze_at"):
        BackboneConfig(name="spinenet")  # freeze_at defaults to 2
    model = ModelConfig(arch="faster_rcnn", backbone=BackboneConfig(name="spinenet", norm="BN", freeze_at=0),
                        roi_heads=RoIHeadsConfig(head="res5"))
    with pytest.raises(ValueError, match="res4/res5"):
        build_model(model, 3)


def _count(path: str, num_classes: int) -> float:
    cfg = load_config(Config, CONFIGS / path)
    with torch.device("meta"):  # counted as built: no initialisation, no forward pass
        model = build_model(cfg.model, num_classes)
    return sum(p.numel() for p in model.parameters()) / 1e6


# published-numbers.md, TPU MODEL_ZOO: RetinaNet with 91 sigmoid outputs, Mask R-CNN with 91 softmax classes
# (background included, so detkit's 90 + 1)
@pytest.mark.parametrize("path, num_classes, published", [
    ("retinanet-spinenet-49-640.yaml", 91, 28.5),
    ("retinanet-spinenet-96-1024.yaml", 91, 43.0),
    ("retinanet-spinenet-143-1280.yaml", 91, 67.0),
    ("retinanet-spinenet-190-1280-protocol-c.yaml", 91, 163.6),
    ("mask-rcnn-spinenet-49s.yaml", 90, 13.9),
    ("mask-rcnn-spinenet-49.yaml", 90, 40.8),
    ("mask-rcnn-spinenet-96.yaml", 90, 55.2),
    ("mask-rcnn-spinenet-143.yaml", 90, 79.2),
])
def test_parameter_counts_match_the_published_ones(path, num_classes, published):
    assert _count(path, num_classes) == pytest.approx(published, rel=0.02)


def test_spinenet_49s_retinanet_parameter_count(monkeypatch):
    # As released (TPU yaml, Model Garden, the PyTorch port): P3-P7 of 128 and a 128-wide head, 11.27 M at 91
    # classes. The PyTorch port measures 11.15 M with its 80 classes; so do we.
    assert _count("retinanet-spinenet-49s-640.yaml", 91) == pytest.approx(11.266, abs=0.001)
    assert _count("retinanet-spinenet-49s-640.yaml", 80) == pytest.approx(11.15, rel=0.002)
    # The published 11.9 M (and 33.8 B multiply-adds) are those of the same model with 256-wide outputs: 11.945 M
    monkeypatch.setitem(spinenet.SCALING, "49S", Scaling(256, 0.65, 0.5, 1))
    assert _count("retinanet-spinenet-49s-640.yaml", 91) == pytest.approx(11.9, rel=0.005)


def test_dropblock_is_the_identity_in_eval_and_at_keep_prob_1():
    x = torch.randn(2, 3, 16, 16)
    assert DropBlock(0.5, 3).eval()(x) is x
    assert DropBlock(1.0, 3).train()(x) is x
    assert DropBlock(0.5, 3).train()(torch.empty(0, 3, 16, 16)).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="keep_prob"):
        DropBlock(0.0, 3)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock(0.9, 0)


def test_dropblock_drops_about_1_minus_keep_prob_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 256, 256) + 0.5  # positive, mean 1
    y = DropBlock(0.9, 7).train()(x)
    dropped = (y == 0).float().mean().item()
    # gamma makes the expected area of all blocks exactly 10% of the map; overlapping blocks count once, so the
    # zeroed fraction is a little lower: 1 - (1 - gamma)^49 = 9.96% inside the map, less near the border. About
    # 4,300 blocks are drawn, a relative sampling error of ~1.5% (0.0015 absolute); 0.09-0.105 leaves room for both.
    assert 0.09 < dropped < 0.105
    kept = y != 0
    scale = y[kept] / x[kept]  # every kept value is scaled by numel / kept
    torch.testing.assert_close(scale, torch.full_like(scale, 1 / (1 - dropped)))
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)  # rescaled: the mean is kept
    ones = torch.ones(1, 8, 64, 64)
    assert DropBlock(0.8, 5).train()(ones).mean().item() == pytest.approx(1.0, rel=1e-5)  # exactly, for constants


@pytest.mark.parametrize("block_size", [3, 4, 7])
def test_dropblock_zeros_whole_squares_inside_the_map(block_size):
    torch.manual_seed(1)
    y = DropBlock(0.99, block_size).train()(torch.ones(4, 64, 40, 40))  # ~0.4 blocks per channel
    zeros = (y == 0).flatten(0, 1)  # (N*C, H, W)
    counts = zeros.sum((1, 2))
    # every block lies wholly inside the map: a channel with any zero has at least one full square
    assert ((counts == 0) | (counts >= block_size ** 2)).all()
    isolated = torch.nonzero(counts == block_size ** 2).flatten()  # channels holding exactly one block
    assert len(isolated) > 10
    for i in isolated.tolist():
        rows, cols = torch.nonzero(zeros[i], as_tuple=True)
        assert rows.max() - rows.min() + 1 == block_size and cols.max() - cols.min() + 1 == block_size


def test_dropblock_clamps_the_block_to_small_maps():
    torch.manual_seed(0)
    # block 7 on a 3x3 map becomes 3x3 with one seed position, drawn with gamma = 1 - keep_prob: all or nothing
    y = DropBlock(0.5, 7).train()(torch.ones(1, 2000, 3, 3))
    counts = (y == 0).sum((2, 3)).flatten()
    assert ((counts == 0) | (counts == 9)).all()
    assert 0.45 < (counts == 9).float().mean() < 0.55
    # an even block on a small odd map keeps the shape; a 1x1 map is dropped per channel
    assert DropBlock(0.9, 4).train()(torch.ones(2, 3, 5, 7)).shape == (2, 3, 5, 7)
    assert DropBlock(0.9, 7).train()(torch.ones(2, 3, 1, 1)).shape == (2, 3, 1, 1)


def test_spinenet_with_dropblock_runs_forward_and_backward():
    torch.manual_seed(0)
    net = SpineNet("49S", norm="BN", activation="relu", dropblock_keep_prob=0.9, dropblock_size=3)
    blocks = [m for m in net.modules() if isinstance(m, DropBlock)]
    assert len(blocks) == 17  # one per block: 2 stem groups + 15 scale-permuted groups, one repeat each
    assert all(m.keep_prob == 0.9 and m.block_size == 3 for m in blocks)
    out = net(torch.randn(2, 3, 128, 128))
    sum(x.float().square().mean() for x in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        first, second = net(x), net(x)
    assert all(torch.equal(first[k], second[k]) for k in first)  # no DropBlock at eval


def test_dropblock_config_validation():
    assert SpineNetConfig().dropblock_keep_prob == 1.0 and SpineNetConfig().dropblock_size == 7
    for keep_prob in (0.0, 1.5):
        with pytest.raises(ConfigError, match="dropblock_keep_prob"):
            SpineNetConfig(dropblock_keep_prob=keep_prob)
    for size in (0, 2.5):
        with pytest.raises(ConfigError, match="dropblock_size"):
            SpineNetConfig(dropblock_size=size)


@pytest.mark.parametrize("size", ["49s-640", "49-640", "96-1024", "143-1280"])
def test_protocol_a_configs(size):
    a = load_config(Config, CONFIGS / f"retinanet-spinenet-{size}-protocol-a.yaml")
    b = load_config(Config, CONFIGS / f"retinanet-spinenet-{size}.yaml")
    s = a.model.backbone.spinenet
    assert (s.activation, s.drop_connect_rate, s.dropblock_keep_prob, s.dropblock_size) == ("relu", 0.0, 0.9, 7)
    assert a.data.train_transform.scale_range == (0.8, 1.2)
    # 250 epochs of 463 steps at batch 256, x0.1 at the last 30 and 10 epochs
    assert a.solver.unit == "epochs" and a.solver.max_length == 250 and tuple(a.solver.steps) == (220, 240)
    assert [e * 463 for e in (250, *a.solver.steps)] == [115750, 101860, 111120]
    assert (s.model_id, a.data.train_transform.output_size) == (b.model.backbone.spinenet.model_id,
                                                                b.data.train_transform.output_size)
    assert a.model.retinanet == b.model.retinanet and a.model.anchors == b.model.anchors
    with torch.device("meta"):
        model = build_model(a.model, 91)
    blocks = [m for m in model.modules() if isinstance(m, DropBlock)]
    assert blocks and all(m.keep_prob == 0.9 and m.block_size == 7 for m in blocks)
