"""Folding frozen batch norms into their convolutions changes no output."""
import pytest
import torch
from torch import nn

from detkit.config import Config, from_dict
from detkit.modeling.build import build_model
from detkit.modeling.fold import fold_batchnorms
from detkit.modeling.norm import FrozenBatchNorm2d


def _randomise_norms(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5


def _model(arch, style, norm, **extra):
    model = {"arch": arch, "backbone": {"depth": 50, "style": style, "norm": norm, "freeze_at": 2},
             "fpn": {"out_channels": 32}, "retinanet": {"head_width": 32, "num_convs": 1}, **extra}
    if arch == "faster_rcnn":
        model["roi_heads"] = {"fc_dim": 64}
    cfg = from_dict(Config, {"model": model})
    torch.manual_seed(0)
    return build_model(cfg.model, 3)


@pytest.mark.parametrize("arch, style, norm, folds", [
    ("retinanet", "pytorch", "FrozenBN", 53),  # stem + 16 blocks x 3 + 4 projections
    ("retinanet", "caffe", "BN", 53),  # trainable BN in eval mode folds too
    ("faster_rcnn", "pytorch", "FrozenBN", 53),
    ("retinanet", "v2", "FrozenBN", 1),  # pre-activation blocks: only the stem's conv -> norm
])
def test_folding_changes_no_output(arch, style, norm, folds):
    model = _model(arch, style, norm)
    _check_folding(model, folds, (96, 128))


def test_spinenet_folds_every_backbone_norm_and_keeps_the_per_level_head_norms():
    cfg = from_dict(Config, {"model": {
        "arch": "retinanet",
        "backbone": {"name": "spinenet", "norm": "BN", "freeze_at": 0, "spinenet": {"model_id": "49S"}},
        "retinanet": {"head_width": 32, "num_convs": 1, "head_norm": "BN"}}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    backbone_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    head_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.head.modules())
    assert backbone_norms > 100 and head_norms > 0
    report = _check_folding(model, backbone_norms, (128, 128))
    assert report.kept == head_norms  # one conv shared by the levels, a norm per level: nothing to fold into


def _check_folding(model, folds, size):
    _randomise_norms(model)
    model.eval()
    images = torch.randint(0, 255, (1, 3, *size), dtype=torch.uint8)
    sizes = torch.tensor([list(size)])
    with torch.no_grad():
        before_features = model.backbone(model.normalize(images) if hasattr(model, "normalize") else images.float())
        before = model(images, sizes)
        report = fold_batchnorms(model)
        after_features = model.backbone(model.normalize(images) if hasattr(model, "normalize") else images.float())
        after = model(images, sizes)
    assert report.folded == folds
    for name, value in before_features.items():  # float32 rounding, relative to the feature map's scale
        assert (after_features[name] - value).abs().max() <= 1e-5 * value.abs().max(), name
    assert len(before) == len(after) == 1
    for a, b in zip(before, after):
        assert a.scores.shape == b.scores.shape
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-2)  # a hundredth of a pixel
    return report


def test_what_is_not_foldable_is_kept():
    training = _model("retinanet", "pytorch", "BN", **{"backbone": {"depth": 50, "norm": "BN", "freeze_at": 0}})
    training.train()
    assert fold_batchnorms(training).folded == 0  # batch statistics are not constants
    gn = _model("retinanet", "pytorch", "GN")
    gn.eval()
    report = fold_batchnorms(gn)
    assert report.folded == 0 and report.kept > 0


def test_sequential_pairs_fold_only_where_the_norm_takes_the_conv_output():
    class Custom(nn.Sequential):  # a Sequential whose own forward does not chain its children
        def forward(self, x):
            return self[1](x) + self[0](x)

    plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.ReLU(), nn.BatchNorm2d(4))
    custom = Custom(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    for model in (plain, custom):
        _randomise_norms(model)
        model.eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = plain(x)
        assert fold_batchnorms(plain).folded == 1  # the first pair; the last norm follows a ReLU
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(plain[1], nn.Identity) and isinstance(plain[5], nn.BatchNorm2d)
    assert fold_batchnorms(custom).folded == 0


def test_mask_head_convs_fold():
    from detkit.modeling.roi_heads.mask_head import MaskRCNNHead

    head = MaskRCNNHead(16, num_classes=3, conv_dim=8, num_convs=2, norm="BN")
    _randomise_norms(head)
    head.eval()
    x = torch.randn(3, 16, 14, 14)
    with torch.no_grad():
        expected = head(x)
        report = fold_batchnorms(head)
        assert report.folded == 2 and report.kept == 1  # the transposed conv's norm stays
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
