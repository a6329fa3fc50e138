import pytest
import torch
from torch import nn

from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.norm import FrozenBatchNorm2d, convert_frozen_batchnorm


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
