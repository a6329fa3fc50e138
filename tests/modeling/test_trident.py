"""TridentNet: shared-weight dilated branches, branch folding, scale-aware ranges, Trident-Fast, configs."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detkit.config import Config, ConfigError, load_config
from detkit.data.loader import ImageMeta, Targets, collate
from detkit.data.transforms import Sample
from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.backbones.trident import TridentConv2d, TridentStage, fold_branches, make_trident
from detkit.modeling.build import build_model
from detkit.modeling.matcher import BACKGROUND, FOREGROUND, IGNORE
from detkit.modeling.rpn import RPN_MATCHER, generate_proposals, label_and_sample_anchors
from detkit.modeling.trident import (TridentBranches, box_scale_in_range, branch_ranges, ignore_out_of_range_anchors,
                                     unfold_branches)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_trident_conv_is_one_weight_run_with_each_branch_dilation():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=True)
    trident = TridentConv2d(conv, (1, 2, 3)).train()
    # one parameter set, the conv's own tensors
    assert [id(p) for p in trident.parameters()] == [id(p) for p in conv.parameters()]
    x = torch.randn(3 * 2, 4, 11, 9)  # 3 branches x 2 images, branch-major
    out = trident(x)
    assert out.shape == (6, 5, 11, 9)
    for b, d in enumerate((1, 2, 3)):
        hand = nn.Conv2d(4, 5, 3, padding=d, dilation=d)  # a hand-built dilated conv with the same weights
        hand.load_state_dict(conv.state_dict())
        torch.testing.assert_close(out[2 * b:2 * b + 2], hand(x[2 * b:2 * b + 2]))
    # the three branches see the same input: they differ only by dilation
    same = x[:2].repeat(3, 1, 1, 1)
    out = trident(same)
    assert not torch.allclose(out[:2], out[2:4])
    # Trident-Fast testing: one branch, no folding
    trident.test_branch = 1
    trident.eval()
    hand = nn.Conv2d(4, 5, 3, padding=2, dilation=2)
    hand.load_state_dict(conv.state_dict())
    torch.testing.assert_close(trident(x[:2]), hand(x[:2]))


def test_trident_conv_gradients_reach_the_one_shared_weight():
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    trident = TridentConv2d(conv, (1, 2, 3))
    trident(torch.randn(3, 2, 7, 7)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_folding_and_unfolding_shapes_and_order():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # N = 2 images
    folded = fold_branches(x, 3)
    assert folded.shape == (6, 3, 4)
    for b in range(3):  # branch-major: row b * N + n is image n
        assert torch.equal(folded[2 * b:2 * b + 2], x)
    per_row = torch.arange(6 * 5 * 2, dtype=torch.float32).view(6, 5, 2)  # (B*N, P, K)
    merged = unfold_branches(per_row, 2)
    assert merged.shape == (2, 15, 2)
    for n in range(2):
        for b in range(3):
            assert torch.equal(merged[n, 5 * b:5 * b + 5], per_row[b * 2 + n])
    sizes, targets = TridentBranches.fold(torch.tensor([[64, 96], [60, 80]]), ["t0", "t1"], 3)
    assert sizes.tolist() == [[64, 96], [60, 80]] * 3 and targets == ["t0", "t1"] * 3
    assert TridentBranches.fold(sizes[:2], None, 3)[1] is None


@pytest.mark.parametrize("depth,style", [(50, "pytorch"), (50, "v2"), (50, "caffe"), (18, "pytorch")])
def test_trident_resnet_branches_equal_plain_resnets_with_that_dilation(depth, style):
    torch.manual_seed(0)
    plain = ResNet(depth, style=style, out_features=("res4",)).eval()  # FrozenBN: deterministic
    for m in plain.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    trident = make_trident(copy.deepcopy(plain))
    # no new parameters and unchanged names: ImageNet trunks and C4 checkpoints load as they are
    assert list(trident.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in trident.parameters()) == sum(p.numel() for p in plain.parameters())
    stage = trident.layer3
    assert isinstance(stage, TridentStage) and stage.first_trident == 1  # SimpleDet: all units but the first
    assert not any(isinstance(m, TridentConv2d) for m in stage[0].modules())
    per_unit = 1 if depth == 50 else 2  # a bottleneck has one 3x3 conv, a basic block two
    assert all(sum(isinstance(m, TridentConv2d) for m in unit.modules()) == per_unit for unit in stage[1:])
    x = torch.randn(2, 3, 64, 96)
    out = trident(x)["res4"]
    assert out.shape == (6, 1024 if depth == 50 else 256, 4, 6)
    for b, d in enumerate((1, 2, 3)):
        dilated = copy.deepcopy(plain)
        for unit in dilated.layer3[1:]:
            for m in unit.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    m.dilation, m.padding = (d, d), (d, d)
        torch.testing.assert_close(out[2 * b:2 * b + 2], dilated(x)["res4"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[:2], out[4:], rtol=1e-3, atol=1e-3)  # the branches do differ


def test_make_trident_block_counts_and_errors():
    model = make_trident(ResNet(50, out_features=("res4",)), num_blocks=6)  # every unit (detectron2)
    assert model.layer3.first_trident == 0 and model(torch.zeros(1, 3, 64, 64))["res4"].shape[0] == 3
    assert make_trident(ResNet(101, out_features=("res4",))).layer3.first_trident == 1  # 22 of 23
    with pytest.raises(ValueError, match="num_blocks"):
        make_trident(ResNet(50, out_features=("res4",)), num_blocks=7)
    with pytest.raises(ValueError, match="test_branch"):
        make_trident(ResNet(50, out_features=("res4",)), test_branch=3)


def test_box_scale_ranges_in_original_pixels():
    boxes = torch.tensor([[0.0, 0, 20, 20], [0, 0, 100, 100], [0, 0, 300, 200]])
    assert box_scale_in_range(boxes, torch.tensor([0.0, 90.0])).tolist() == [True, False, False]
    assert box_scale_in_range(boxes, torch.tensor([20.0, 100.0])).tolist() == [True, True, False]  # inclusive
    # image 0 was upscaled 2x, image 1 kept: ranges in network pixels are branch-major (B*N, 2)
    ranges = branch_ranges(torch.tensor([[0.0, 90], [30, 160], [90, 1e9]]), torch.tensor([2.0, 1.0]))
    assert ranges.tolist() == [[0, 180], [0, 90], [60, 320], [30, 160], [180, 2e9], [90, 1e9]]
    branches = TridentBranches(((0.0, 90.0), (30.0, 160.0), (90.0, 1e9)))
    torch.testing.assert_close(branches.ranges(2, 3, torch.tensor([2.0, 1.0]), torch.device("cpu")), ranges)
    assert branches.ranges(2, 3, None, torch.device("cpu"))[:2].tolist() == [[0, 90], [0, 90]]  # scale 1
    assert branches.ranges(2, 1, None, torch.device("cpu")) is None  # Trident-Fast testing: one branch, no ranges
    assert TridentBranches(branches.valid_ranges, scale_aware=False).ranges(2, 3, None, torch.device("cpu")) is None


def _anchors_and_gt():
    # a small (20 px) and a large (100 px) object; anchors: 0 on the small one, 1 on the large one, 2 overlapping
    # the large one at IoU 0.25 (background for the matcher), 3 far away, 4 overlapping it at IoU 0.36
    gt = torch.tensor([[10.0, 10, 30, 30], [100, 100, 200, 200]])
    anchors = torch.tensor([[10.0, 10, 30, 30], [100, 100, 200, 200], [100, 100, 150, 150], [300, 300, 320, 320],
                            [100, 100, 160, 160]])
    return anchors, gt


def test_rpn_anchors_near_out_of_range_boxes_are_ignored_per_branch():
    anchors, gt = _anchors_and_gt()
    # three branches of one image (branch-major, N = 1): [0, 40] keeps the small box, [30, 160] keeps the large one,
    # [40, inf) the large one
    ranges = torch.tensor([[0.0, 40.0], [30.0, 160.0], [40.0, 1e9]])
    labels = torch.tensor([[FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND]] * 3, dtype=torch.int8)
    out = ignore_out_of_range_anchors(labels, anchors, [gt] * 3, ranges, 0.3)
    assert out.tolist() == [[FOREGROUND, IGNORE, BACKGROUND, BACKGROUND, IGNORE],  # large box out of range
                            [IGNORE, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND],  # small box out of range
                            [IGNORE, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND]]
    # in the RPN's target assignment, before sampling (everything is sampled here); the matcher already
    # ignores anchor 4 (IoU 0.36 is between 0.3 and 0.7)
    plain, _ = label_and_sample_anchors(anchors, [gt] * 3, None, RPN_MATCHER, batch_size_per_image=5,
                                        positive_fraction=1.0)
    assert plain.tolist() == [[FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND, IGNORE]] * 3
    sampled, _ = label_and_sample_anchors(anchors, [gt] * 3, None, RPN_MATCHER, batch_size_per_image=5,
                                          positive_fraction=1.0, valid_ranges=ranges)
    assert sampled.tolist() == [[FOREGROUND, IGNORE, BACKGROUND, BACKGROUND, IGNORE],
                                [IGNORE, FOREGROUND, BACKGROUND, BACKGROUND, IGNORE],
                                [IGNORE, FOREGROUND, BACKGROUND, BACKGROUND, IGNORE]]
    # no ground truth: nothing to ignore
    assert torch.equal(ignore_out_of_range_anchors(labels[:1], anchors, [torch.zeros(0, 4)], ranges[:1]),
                       labels[:1])


def test_training_proposals_outside_the_branch_range_are_dropped_before_nms():
    anchors = torch.tensor([[0.0, 0, 16, 16], [40, 40, 104, 104], [0, 0, 200, 200], [110, 110, 130, 130]])
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(2, 1)
    deltas = torch.zeros(2, 4, 4)  # proposals = anchors
    sizes = torch.tensor([[256, 256]] * 2)
    kwargs = dict(pre_nms_topk=10, post_nms_topk=10)
    ranges = torch.tensor([[0.0, 30.0], [30.0, 100.0]])  # two branches of one image
    (small, _), (medium, _) = generate_proposals([logits], [deltas], [anchors], sizes, valid_ranges=ranges, **kwargs)
    assert small.tolist() == [[0, 0, 16, 16], [110, 110, 130, 130]]
    assert medium.tolist() == [[40, 40, 104, 104]]
    (all_boxes, _), _ = generate_proposals([logits], [deltas], [anchors], sizes, **kwargs)
    assert len(all_boxes) == 4


def test_test_time_branch_filter_and_merge():
    # N = 1 image, B = 3 branches, P = 2 RoIs, K = 2 classes, class-agnostic boxes
    boxes = torch.tensor([[0.0, 0, 20, 20], [0, 0, 120, 120]]).view(1, 2, 1, 4).repeat(3, 1, 1, 1)
    scores = torch.full((3, 2, 2), 0.5)
    ranges = torch.tensor([[0.0, 90.0], [30.0, 160.0], [90.0, 1e9]])
    merged_scores, merged_boxes = TridentBranches.merge(scores, boxes, ranges, 1)
    assert merged_scores.shape == (1, 6, 2) and merged_boxes.shape == (1, 6, 1, 4)
    # branch 0 keeps the 20 px box, branches 1 and 2 the 120 px one
    assert (merged_scores[0, :, 0] > 0).tolist() == [True, False, False, True, False, True]
    unfiltered, _ = TridentBranches.merge(scores, boxes, None, 1)
    assert (unfiltered > 0).all()


def _tiny(name: str, overrides=()):
    return load_config(Config, CONFIGS / f"{name}.yaml", list(overrides))


def _batch():
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    sizes = torch.tensor([[64, 96], [60, 80]])
    targets = [Targets(torch.tensor([[4.0, 6, 40, 50], [50, 10, 90, 60]]), torch.tensor([0, 2]), torch.zeros(0, 4)),
               Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor([[0.0, 0, 20, 20]]))]
    return images, sizes, targets


def test_rois_are_sampled_per_image_and_branch(monkeypatch):
    import detkit.modeling.detectors.rcnn as rcnn

    seen = []
    original = rcnn.label_and_sample_padded

    def spy(boxes, valid, gt_boxes, gt_labels, **kwargs):
        sample = original(boxes, valid, gt_boxes, gt_labels, **kwargs)
        seen.append((len(gt_boxes), kwargs["batch_size_per_image"], kwargs["positive_fraction"], sample.boxes.shape))
        return sample

    monkeypatch.setattr(rcnn, "label_and_sample_padded", spy)
    cfg = _tiny("trident-resnet18-c4-demo", ["model.rpn.post_nms_topk_train=40"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    model(*_batch(), image_scales=torch.tensor([1.0, 1.0]))
    (num_rows, per_image, fraction, shape), = seen
    assert (num_rows, per_image, fraction) == (6, 16, 0.5) and shape[0] == 6 and shape[1] <= 16


def test_scale_aware_test_filter_is_wired_into_the_detector():
    cfg = _tiny("trident-resnet18-c4-demo", ["model.roi_heads.score_threshold=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    images, sizes, _ = _batch()
    with torch.no_grad():
        dets = model(images, sizes, image_scales=torch.tensor([1.0, 1.0]))
        assert sum(len(d.boxes) for d in dets) > 0
        # ranges no box can meet: every branch's detections are filtered out before the merge
        model.trident.valid_ranges = ((0.0, 0.5), (0.0, 0.5), (0.0, 0.5))
        assert sum(len(d.boxes) for d in model(images, sizes, image_scales=torch.tensor([1.0, 1.0]))) == 0
        # the scale turns original-pixel ranges into network pixels: a 100x upscale lets every box through
        kept = model(images, sizes, image_scales=torch.tensor([100.0, 100.0]))
    assert [len(d.boxes) for d in kept] == [len(d.boxes) for d in dets]


def test_trident_fast_tests_with_the_middle_branch_only():
    cfg = _tiny("trident-resnet18-c4-demo", ["model.trident.test_branch=1", "model.trident.scale_aware=false",
                                             "model.roi_heads.score_threshold=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    model.train()
    images, sizes, targets = _batch()
    model(images, sizes, targets)  # trains with all three branches (BatchNorm statistics move)
    model.eval()
    # the same detector without trident units, its last res4 unit's 3x3 convs dilated by 2, same weights
    plain_cfg = _tiny("trident-resnet18-c4-demo", ["model.trident.enabled=false",
                                                   "model.roi_heads.score_threshold=0.0"])
    plain = build_model(plain_cfg.model, 3)
    plain.load_state_dict(model.state_dict())
    for m in plain.backbone.layer3[1].modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.dilation, m.padding = (2, 2), (2, 2)
    plain.eval()
    with torch.no_grad():
        fast, reference = model(images, sizes), plain(images, sizes)
    assert sum(len(d.boxes) for d in fast) > 0
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.labels, b.labels)


def test_collate_exposes_the_resize_scale():
    image = np.zeros((20, 30, 3), np.uint8)
    empty = np.zeros((0, 4), np.float32)
    from PIL import Image

    items = []
    for affine in [(2.0, 0.0, 2.0, 0.0), (-1.5, 60.0, 1.5, 0.0)]:  # a 2x resize; a flipped 1.5x resize
        sample = Sample(image=Image.fromarray(image), boxes=empty, labels=np.zeros(0, np.int64), ignore_boxes=empty,
                        affine=affine)
        items.append((sample, ImageMeta(index=0, image_id=0, orig_size=(10, 15), affine=affine)))
    batch = collate(items)
    torch.testing.assert_close(batch.image_scales, torch.tensor([2.0, 1.5]))
    assert batch.to("cpu").image_scales is not None


@pytest.mark.parametrize("override,match", [
    ("model.trident.dilations=[1,2]", "dilations"),
    ("model.trident.valid_ranges=[[0,90],[30,160]]", "valid_ranges"),
    ("model.trident.valid_ranges=[[0,90],[160,30],[90,1000]]", "low < high"),
    ("model.trident.test_branch=3", "test_branch"),
    ("model.trident.num_blocks=0", "num_blocks"),
    ("model.roi_heads.head=2mlp", "model.trident needs arch faster_rcnn"),
    ("model.arch=mask_rcnn", "model.trident needs arch faster_rcnn"),
])
def test_config_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        _tiny("trident-resnet50v2-c4-c5-128roi-1x", [override])


def test_parameter_counts_equal_the_faster_rcnn_v2_c4_models():
    # every branch shares the trunk's weights: TridentNet adds no parameters to Faster R-CNN C4 (SimpleDet's 81
    # classes = 80 foreground + background; class-agnostic regression)
    counts = {}
    for name in ("trident-resnet50v2-c4-c5-128roi-1x", "faster-rcnn-resnet50v2-c4-c5-256roi-1x",
                 "trident-resnet101v2-c4-c5-128roi-1x", "trident-fast-resnet101v2-c4-c5-128roi-1x"):
        counts[name] = sum(p.numel() for p in build_model(_tiny(name).model, 80).parameters())
    assert counts["trident-resnet50v2-c4-c5-128roi-1x"] == counts["faster-rcnn-resnet50v2-c4-c5-256roi-1x"]
    assert counts["trident-resnet50v2-c4-c5-128roi-1x"] == 28_386_656
    assert counts["trident-resnet101v2-c4-c5-128roi-1x"] == counts["trident-fast-resnet101v2-c4-c5-128roi-1x"]
    assert counts["trident-resnet101v2-c4-c5-128roi-1x"] == 47_326_560
