import pytest
import torch

from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.necks.fpn import FPN


@pytest.mark.parametrize("source, p6_in", [("c5", 2048), ("p5", 256)])
def test_levels_shapes_and_p6_source(source, p6_in):
    backbone = ResNet(50).eval()
    fpn = FPN([512, 1024, 2048], ["res3", "res4", "res5"], extra_source=source)
    out = fpn(backbone(torch.zeros(1, 3, 100, 164)))  # odd sizes: upsampling must match the lateral
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(13, 21), (7, 11), (4, 6), (2, 3), (1, 2)]
    assert all(v.shape[1] == 256 for v in out.values())
    assert fpn.extra_convs[0].in_channels == p6_in
    assert fpn.out_strides == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def test_parameter_count_of_the_torchvision_retinanet_neck():
    # torchvision retinanet_resnet50_fpn: FPN on C3-C5 with P6/P7 from P5 (256 -> 256)
    fpn = FPN([512, 1024, 2048], ["res3", "res4", "res5"], extra_source="p5")
    laterals = (512 + 1024 + 2048) * 256 + 3 * 256
    outputs = 3 * (256 * 256 * 9 + 256)
    extras = 2 * (256 * 256 * 9 + 256)
    assert sum(p.numel() for p in fpn.parameters()) == laterals + outputs + extras


def test_no_extra_levels_and_gradients_flow():
    fpn = FPN([64, 128], ["a", "b"], out_channels=32, first_level=2, extra_levels=0)
    feats = {"a": torch.randn(2, 64, 8, 8, requires_grad=True), "b": torch.randn(2, 128, 4, 4, requires_grad=True)}
    out = fpn(feats)
    assert list(out) == ["p2", "p3"]
    sum(v.sum() for v in out.values()).backward()
    assert feats["b"].grad.abs().sum() > 0  # the coarse input reaches P2 through the top-down path


def test_pooled_p6_of_the_faster_rcnn_fpn():
    # Faster/Mask R-CNN FPN: P2-P5 plus P6 = 1x1 stride-2 max-pool of P5, no parameters (torchvision: 3.34 M)
    fpn = FPN([256, 512, 1024, 2048], ["res2", "res3", "res4", "res5"], first_level=2, extra_levels=1,
              extra_source="pool")
    feats = {f"res{i}": torch.randn(1, c, 2 ** (8 - i), 2 ** (8 - i))
             for i, c in zip(range(2, 6), (256, 512, 1024, 2048))}
    out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] and fpn.out_strides["p6"] == 64
    torch.testing.assert_close(out["p6"], out["p5"][..., ::2, ::2])
    laterals = (256 + 512 + 1024 + 2048) * 256 + 4 * 256
    assert sum(p.numel() for p in fpn.parameters()) == laterals + 4 * (256 * 256 * 9 + 256)
    with pytest.raises(ValueError, match="one level"):
        FPN([8], ["a"], extra_levels=2, extra_source="pool")
