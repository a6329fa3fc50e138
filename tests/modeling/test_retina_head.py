import math

import pytest
import torch

from detkit.modeling.anchors import AnchorGenerator
from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.heads.retina_head import RetinaHead, flatten_predictions
from detkit.modeling.necks.fpn import FPN


def test_retinanet_r50_fpn_has_torchvision_parameter_count():
    # torchvision retinanet_resnet50_fpn (91 classes): 34,014,999 parameters (its FrozenBN affine values are buffers)
    parts = [ResNet(50, norm="FrozenBN", freeze_at=0), FPN([512, 1024, 2048], ["res3", "res4", "res5"],
                                                           extra_source="p5"), RetinaHead(256, 9, 91)]
    assert sum(p.numel() for m in parts for p in m.parameters()) == 34_014_999


def test_outputs_prior_and_flattening_order():
    head = RetinaHead(32, num_anchors=3, num_classes=5, num_convs=2, width=16)
    feats = [torch.randn(2, 32, 4, 6), torch.randn(2, 32, 2, 3)]
    logits, deltas = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 15, 4, 6), (2, 15, 2, 3)]
    assert [tuple(x.shape) for x in deltas] == [(2, 12, 4, 6), (2, 12, 2, 3)]
    assert head.cls_logits.bias[0].item() == pytest.approx(-math.log(99))
    flat = flatten_predictions(logits, 5)
    assert flat.shape == (2, (24 + 6) * 3, 5)
    # row r = (y * W + x) * A + a of level 0 holds channels a*K : (a+1)*K at (y, x)
    y, x, a = 2, 5, 1
    torch.testing.assert_close(flat[:, (y * 6 + x) * 3 + a], logits[0][:, a * 5:(a + 1) * 5, y, x])
    # and that order is the anchor generator's
    gen = AnchorGenerator([8, 16], [(32.0,), (64.0,)], aspect_ratios=(0.5, 1.0, 2.0))  # 3 per location
    anchors = torch.cat(gen.grid_anchors([(4, 6), (2, 3)]))
    assert anchors.shape[0] == flat.shape[1]


@pytest.mark.parametrize("norm_per_level", [True, False])
def test_spinenet_head_with_per_level_bn(norm_per_level):
    head = RetinaHead(16, 9, 3, num_convs=2, width=8, norm="BN", norm_per_level=norm_per_level, num_levels=3,
                      activation="swish")
    assert len(head.cls_norms) == (3 if norm_per_level else 1)
    logits, _ = head([torch.randn(2, 16, s, s) for s in (8, 4, 2)])
    sum(x.sum() for x in logits).backward()
    assert head.cls_convs[0].weight.grad is not None
