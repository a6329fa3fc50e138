import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkit.modeling.backbones.resnet import InputBatchNorm, PreActBasicBlock, PreActBottleneck, ResNet
from detkit.modeling.norm import FrozenBatchNorm2d, convert_frozen_batchnorm
from detkit.modeling.roi_heads.box_head import Res5Head, take_res5


# torchvision's ImageNet classifiers without the 1000-way fc layer (weight + bias)
TORCHVISION_TRUNK = {18: 11_689_512 - 513_000, 34: 21_797_672 - 513_000, 50: 25_557_032 - 2_049_000,
                     101: 44_549_160 - 2_049_000}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_match_torchvision(depth):
    model = ResNet(depth, freeze_at=0, norm="BN", out_features=("res2", "res3", "res4", "res5"))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_TRUNK[depth]


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_shapes_strides_and_where_the_stride_goes(style):
    model = ResNet(50, style=style, out_features=("res2", "res3", "res4", "res5")).eval()
    out = model(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "res2": (256, 16, 24), "res3": (512, 8, 12), "res4": (1024, 4, 6), "res5": (2048, 2, 3)}
    block = model.layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == (((2, 2), (1, 1)) if style == "caffe" else ((1, 1), (2, 2)))
    assert model.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_freeze_at():
    model = ResNet(18, norm="BN", freeze_at=2)
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in ResNet(18, norm="BN", freeze_at=0).parameters())


def test_frozen_bn_equals_batchnorm_in_eval_and_loads_its_state():
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 8, 5, 5)
    frozen = convert_frozen_batchnorm(bn)
    torch.testing.assert_close(frozen(x), bn(x))
    again = FrozenBatchNorm2d(8)
    again.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and dropped
    torch.testing.assert_close(again(x), bn(x))


@pytest.mark.parametrize("norm", ["FrozenBN", "BN", "GN"])
def test_forward_backward_each_norm(norm):
    model = ResNet(18, norm=norm, freeze_at=1)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert model.layer4[0].conv1.weight.grad is not None


def test_state_dict_uses_torchvision_names():
    keys = set(ResNet(50, norm="BN", freeze_at=0).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
                "layer4.2.conv3.weight", "layer3.5.bn2.bias"):
        assert key in keys


# ---- ResNet v2 (pre-activation, MXNet model zoo / SimpleDet R50v2, R101v2) ----

V2_UNITS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True)}


def mxnet_v2_trunk_params(depth):
    """Trainable parameters of MXNet's resnet v2 symbol without `fc1` and `bn_data`, counted from its definition:
    conv0 7x7 + bn0; per unit bn1 over the input, (1x1, 3x3, 1x1 | 3x3, 3x3) convs and their bn2 (bn3); a 1x1
    `_sc` projection (no BN) in the first unit of every stage; the final bn1 over the last width."""
    units, bottleneck = V2_UNITS[depth]
    total, c = 3 * 64 * 7 * 7 + 2 * 64, 64
    for num_units, width in zip(units, (64, 128, 256, 512)):
        out = 4 * width if bottleneck else width
        for unit in range(num_units):
            total += 2 * c  # bn1 gamma, beta
            if bottleneck:
                total += c * width + 2 * width + 9 * width * width + 2 * width + width * out
            else:
                total += 9 * c * width + 2 * width + 9 * width * out
            if unit == 0:
                total += c * out
            c = out
    return total + 2 * c


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_v2_parameter_counts_match_mxnet_definition(depth):
    model = ResNet(depth, style="v2", norm="BN", freeze_at=0, out_features=("res2", "res3", "res4", "res5"))
    # R50v2 23,500,480 and R101v2 42,492,608: with fc1 (2048 * 1000 + 1000) and bn_data's gamma and beta the MXNet
    # classifiers have 25,549,486 and 44,541,614, 7,546 fewer than torchvision's v1 (no BN on the shortcuts)
    assert sum(p.numel() for p in model.parameters()) == mxnet_v2_trunk_params(depth)


def _bn(x, norm):
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def _randomise_norms(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("projection", [False, True])
def test_v2_bottleneck_is_pre_activation(projection):
    torch.manual_seed(0)
    in_channels = 16 if projection else 32
    block = PreActBottleneck(in_channels, 8, 2 if projection else 1, "FrozenBN", projection=projection)
    _randomise_norms(block)
    x = torch.randn(2, in_channels, 8, 8)
    act = F.relu(_bn(x, block.bn1))
    y = F.conv2d(act, block.conv1.weight)
    y = F.conv2d(F.relu(_bn(y, block.bn2)), block.conv2.weight, stride=block.conv2.stride, padding=1)
    y = F.conv2d(F.relu(_bn(y, block.bn3)), block.conv3.weight)
    # identity: the raw input; projection: a strided 1x1 conv of the pre-activated input, no norm
    shortcut = F.conv2d(act, block.downsample.weight, stride=2) if projection else x
    torch.testing.assert_close(block(x), y + shortcut)
    assert block.conv2.stride == ((2, 2) if projection else (1, 1)) and block.conv1.stride == (1, 1)


def test_v2_identity_norms_give_conv_path_plus_input():
    torch.manual_seed(0)
    block = PreActBasicBlock(8, 8, 1, "FrozenBN", projection=False)
    for m in block.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = 0.0
    x = torch.randn(2, 8, 6, 6)
    y = F.conv2d(F.relu(F.conv2d(F.relu(x), block.conv1.weight, padding=1)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), y + x)


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_v2_shapes_strides_channels_and_one_final_norm(depth):
    torch.manual_seed(0)
    model = ResNet(depth, style="v2", norm="BN", freeze_at=0, out_features=("res2", "res3", "res4", "res5")).eval()
    _randomise_batchnorms(model)
    out = model(torch.rand(1, 3, 32, 64) * 255)
    e = 4 if depth >= 50 else 1
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "res2": (64 * e, 8, 16), "res3": (128 * e, 4, 8), "res4": (256 * e, 2, 4), "res5": (512 * e, 1, 2)}
    assert model.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.out_channels == {"res2": 64 * e, "res3": 128 * e, "res4": 256 * e, "res5": 512 * e}
    # MXNet projects in the first unit of every stage (res2 of ResNet-18 too), never later
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        assert isinstance(stage[0].downsample, nn.Conv2d) and all(b.downsample is None for b in stage[1:])
    strided = model.layer2[0].conv2 if depth >= 50 else model.layer2[0].conv1
    assert strided.kernel_size == (3, 3) and strided.stride == (2, 2)
    assert sum(name.endswith("post_norm") for name, _ in model.named_modules()) == 1
    assert sum(isinstance(m, InputBatchNorm) for m in model.modules()) == 1
    assert out["res4"].min() < 0  # raw stage sums ...
    raw5 = model.layer4(out["res4"])
    torch.testing.assert_close(out["res5"], F.relu(model.post_norm(raw5)))  # ... res5 with the final BN + ReLU


def _randomise_batchnorms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


def test_v1_has_no_v2_layers():
    model = ResNet(18, out_features=("res5",))
    assert not any(name.endswith(("post_norm", "bn_data")) for name, _ in model.named_modules())


def test_v2_bn_data_normalises_raw_pixels_with_unit_scale():
    model = ResNet(18, style="v2", norm_eps=0.0)
    mean, var, beta = torch.tensor([120.0, 110, 100]), torch.tensor([3600.0, 3025, 3364]), torch.tensor([0.5, 0, -1])
    state = {"bn_data.weight": torch.full((3,), 7.0), "bn_data.bias": beta, "bn_data.running_mean": mean,
             "bn_data.running_var": var}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(model.bn_data.weight, torch.ones(3))  # fix_gamma: a checkpoint's gamma is never applied
    x = torch.rand(1, 3, 4, 4) * 255
    expected = (x - mean.view(1, 3, 1, 1)) / var.sqrt().view(1, 3, 1, 1) + beta.view(1, 3, 1, 1)
    torch.testing.assert_close(model.bn_data(x), expected)


def test_v2_freeze_at():
    model = ResNet(50, style="v2", norm="BN", freeze_at=1)
    assert isinstance(model.bn_data, FrozenBatchNorm2d) and isinstance(model.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert all(p.requires_grad for p in model.layer1.parameters())
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d) and isinstance(model.post_norm, nn.BatchNorm2d)
    model = ResNet(50, style="v2", norm="BN", freeze_at=0)
    assert all(p.requires_grad for p in model.parameters()) and isinstance(model.bn1, nn.BatchNorm2d)
    assert isinstance(model.bn_data, FrozenBatchNorm2d)  # input normalisation: always fixed (SimpleDet's whiten)
    model = ResNet(50, style="v2", norm="BN", freeze_at=5)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("norm", ["FrozenBN", "BN", "SyncBN", "GN"])
def test_v2_each_norm_constructs_and_runs(norm):
    torch.manual_seed(0)
    model = ResNet(18, style="v2", norm=norm, freeze_at=1, out_features=("res4", "res5"))
    kind = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm, "GN": nn.GroupNorm}[norm]
    assert isinstance(model.layer2[0].bn1, kind) and isinstance(model.post_norm, kind)
    if norm == "SyncBN":  # needs a process group to train; in eval it is a BatchNorm
        model.eval()
    out = model(torch.rand(2, 3, 32, 32) * 255)
    if norm != "SyncBN":
        sum(v.mean() for v in out.values()).backward()
        assert model.layer4[0].conv1.weight.grad is not None and model.layer1[0].conv1.weight.grad is not None


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_v2_batchnorms_convert_to_frozen(norm):
    torch.manual_seed(0)
    model = ResNet(18, style="v2", norm=norm, freeze_at=0, out_features=("res4", "res5")).eval()
    _randomise_batchnorms(model)
    x = torch.rand(1, 3, 64, 64) * 255
    expected = model(x)
    frozen = convert_frozen_batchnorm(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in frozen.modules())
    for name, value in frozen(x).items():  # the raw residual stream reaches ~1e4: compare relative to its size
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6 * expected[name].abs().max().item())


@pytest.fixture(scope="module")
def v2_c4_parts():
    """An R50v2 C4 trunk and the res5 head stage taken from it (random norm statistics)."""
    torch.manual_seed(0)
    backbone = ResNet(50, style="v2", out_features=("res4",))
    res5 = take_res5(backbone)
    _randomise_norms(res5)
    return backbone, res5


def test_v2_take_res5_moves_the_final_norm(v2_c4_parts):
    backbone, res5 = v2_c4_parts
    assert not hasattr(backbone, "layer4") and not hasattr(backbone, "post_norm")
    assert backbone(torch.rand(1, 3, 64, 64) * 255)["res4"].shape == (1, 1024, 4, 4)
    assert len(res5) == 5 and isinstance(res5[3], FrozenBatchNorm2d) and isinstance(res5[4], nn.ReLU)
    assert sum(isinstance(m, FrozenBatchNorm2d) and m.num_features == 2048 for m in res5[3:]) == 1


@pytest.mark.parametrize("stride,size", [(1, 7), (2, 14), (2, 7)])
def test_v2_c4_res5_head_ends_with_final_norm_and_relu(v2_c4_parts, stride, size):
    head = Res5Head(copy.deepcopy(v2_c4_parts[1]), stride=stride)
    assert head.out_features == 2048
    first = head.res5[0]
    assert first.conv2.stride == first.downsample.stride == (stride, stride)
    x = torch.randn(2, 1024, size, size)
    pooled, feature_map = head(x, return_map=True)
    out_size = (size + stride - 1) // stride
    assert feature_map.shape == (2, 2048, out_size, out_size) and pooled.shape == (2, 2048)
    raw = head.res5[2](head.res5[1](head.res5[0](x)))
    torch.testing.assert_close(feature_map, F.relu(_bn(raw, head.res5[3])))
    torch.testing.assert_close(pooled, feature_map.mean(dim=(2, 3)))


def test_v1_take_res5_is_unchanged():
    backbone = ResNet(50, out_features=("res4",))
    layer4 = backbone.layer4
    assert take_res5(backbone) is layer4
    assert Res5Head(layer4, stride=1).out_features == 2048


def test_v2_state_dict_names():
    keys = set(ResNet(50, style="v2", norm="BN", freeze_at=0).state_dict())
    for key in ("bn_data.running_mean", "bn_data.bias", "conv1.weight", "bn1.weight", "layer1.0.bn1.weight",
                "layer1.0.downsample.weight", "layer4.2.conv3.weight", "layer3.5.bn3.running_var",
                "post_norm.weight"):
        assert key in keys
    assert "layer1.1.downsample.weight" not in keys and not any(".downsample.1." in k for k in keys)


def test_v2_from_config_builds_a_c4_detector():
    from detkit.config.schema import ModelConfig
    from detkit.modeling.build import build_model

    cfg = ModelConfig(arch="faster_rcnn", num_classes=3)
    cfg.backbone.style, cfg.backbone.depth, cfg.roi_heads.head, cfg.roi_heads.res5_stride = "v2", 50, "res5", 1
    cfg.rpn.anchor_sizes = (32.0, 64.0, 128.0, 256.0, 512.0)
    model = build_model(cfg)
    assert model.backbone.preact and not hasattr(model.backbone, "post_norm")
    res5 = model.stages[0].head.res5
    assert isinstance(res5[-2], FrozenBatchNorm2d) and res5[0].conv2.stride == (1, 1)
