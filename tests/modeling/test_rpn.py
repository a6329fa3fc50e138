import math

import pytest
import torch

from detkit.modeling.anchors import AnchorGenerator
from detkit.modeling.rpn import (RPN, RPN_MATCHER, RPNHead, generate_proposals, label_and_sample_anchors, rpn_losses,
                                 sample_labels)
from detkit.ops.box_coder import BoxCoder

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# ---------------------------------------------------------------- head


def test_head_layout_matches_the_anchor_generator():
    torch.manual_seed(0)
    head = RPNHead(in_channels=4, num_anchors=3)
    gen = AnchorGenerator(strides=[8, 16], sizes=[(32.0,), (64.0,)])
    features = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 2, 2)]
    logits, deltas = head(features)
    anchors = gen.grid_anchors([f.shape[-2:] for f in features])
    for level, x in enumerate(features):
        n, _, h, w = x.shape
        assert logits[level].shape == (n, h * w * 3) and deltas[level].shape == (n, h * w * 3, 4)
        assert anchors[level].shape[0] == logits[level].shape[1]
        hidden = torch.relu(head.conv(x))
        raw_logits, raw_deltas = head.objectness(hidden), head.deltas(hidden)  # (N, A, H, W), (N, 4A, H, W)
        stride = gen.strides[level]
        for y, xx, a in [(0, 0, 0), (0, 1, 2), (h - 1, w - 1, 1), (1, 0, 1)]:
            i = (y * w + xx) * 3 + a
            torch.testing.assert_close(logits[level][:, i], raw_logits[:, a, y, xx])
            torch.testing.assert_close(deltas[level][:, i], raw_deltas[:, 4 * a:4 * a + 4, y, xx])
            # the anchor at the same index sits on that location
            centre = (anchors[level][i, :2] + anchors[level][i, 2:]) / 2
            assert centre.tolist() == [xx * stride, y * stride]


def test_head_init():
    head = RPNHead(in_channels=8, num_anchors=15)
    assert head.objectness.out_channels == 15 and head.deltas.out_channels == 60
    for conv in (head.conv, head.objectness, head.deltas):
        assert conv.bias.abs().max() == 0
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.2)


# ---------------------------------------------------------------- sampling


def _labels(num_fg: int, num_bg: int, num_ignored: int, size: int = 2000) -> torch.Tensor:
    labels = torch.full((size,), -1, dtype=torch.int8)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(num_fg + 7 * num_bg))
    labels[order[:num_fg]] = 1
    labels[order[num_fg:num_fg + num_bg]] = 0
    assert num_fg + num_bg + num_ignored <= size
    return labels


def test_sample_labels_fractions():
    labels = torch.stack([_labels(300, 1000, 100), _labels(10, 1000, 100), _labels(5, 20, 100), _labels(0, 0, 50)])
    torch.manual_seed(0)
    sampled = sample_labels(labels, num_samples=256, positive_fraction=0.5)
    assert sampled.dtype == labels.dtype and sampled.shape == labels.shape
    num_fg, num_bg = (sampled == 1).sum(1).tolist(), (sampled == 0).sum(1).tolist()
    assert num_fg == [128, 10, 5, 0]
    assert num_bg == [128, 246, 20, 0]  # fewer positives: more negatives; too few negatives: all of them
    # every sampled anchor keeps its label; ignored anchors stay ignored
    drawn = sampled >= 0
    assert torch.equal(sampled[drawn], labels[drawn])
    assert (sampled[labels == -1] == -1).all()
    only_fg = sample_labels(labels, num_samples=256, positive_fraction=1.0)
    assert (only_fg == 1).sum(1).tolist() == [256, 10, 5, 0]
    assert (only_fg == 0).sum(1).tolist() == [0, 246, 20, 0]


def test_sample_labels_deterministic_and_random():
    labels = torch.stack([_labels(300, 1000, 100), _labels(40, 1000, 0)])
    torch.manual_seed(3)
    first = sample_labels(labels, 256, 0.5)
    torch.manual_seed(3)
    assert torch.equal(sample_labels(labels, 256, 0.5), first)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(sample_labels(labels, 256, 0.5, generator=generator),
                       sample_labels(labels, 256, 0.5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(sample_labels(labels, 256, 0.5), first)  # the global generator moved on
    # over many draws every foreground anchor of image 0 gets picked, at about the expected rate 128/300
    counts = sum((sample_labels(labels, 256, 0.5) == 1)[0].float() for _ in range(50))
    fg = labels[0] == 1
    assert (counts[fg] > 0).all()
    assert counts[fg].mean().item() == pytest.approx(50 * 128 / 300, rel=1e-6)


def test_sample_labels_fewer_anchors_than_samples():
    labels = torch.tensor([[1, 0, -1, 0], [-1, -1, -1, -1]], dtype=torch.int8)
    sampled = sample_labels(labels, 256, 0.5)
    assert torch.equal(sampled, labels)
    assert sample_labels(labels[:, :0], 256, 0.5).shape == (2, 0)


@CUDA
def test_sample_labels_cuda():
    labels = torch.stack([_labels(300, 1000, 100), _labels(10, 1000, 100)]).cuda()
    sampled = sample_labels(labels, 256, 0.5)
    assert (sampled == 1).sum(1).tolist() == [128, 10] and (sampled == 0).sum(1).tolist() == [128, 246]


# ---------------------------------------------------------------- targets and losses


def _grid_anchors() -> torch.Tensor:
    """A 10 x 10 grid of 10 x 10 boxes, 10 px apart: anchor i covers columns (i % 10), rows (i // 10)."""
    (anchors,) = AnchorGenerator(strides=[10], sizes=[(10.0,)], aspect_ratios=(1.0,), offset=0.5).grid_anchors(
        [(10, 10)])
    return anchors


def test_label_and_sample_hand_made():
    anchors = _grid_anchors()  # anchor 12 = (20, 10, 30, 20)
    gt = [torch.tensor([[20.0, 10, 30, 20], [62, 60, 72, 70]]), torch.zeros(0, 4)]
    crowd = [torch.zeros(0, 4), torch.tensor([[0.0, 0, 11, 20]])]  # covers anchors 0, 10 fully, 1, 11 by 10%
    labels, matched = label_and_sample_anchors(anchors, gt, crowd, RPN_MATCHER, batch_size_per_image=1000)
    assert labels.dtype == torch.int8 and labels.shape == (2, 100) and matched.shape == (2, 100, 4)
    # image 0: the box equal to anchor 12 makes it foreground; the shifted box (best IoU 0.67, with anchor 66)
    # is a low-quality match
    assert labels[0, 12] == 1 and labels[0, 66] == 1
    torch.testing.assert_close(matched[0, 12], gt[0][0])
    torch.testing.assert_close(matched[0, 66], gt[0][1])
    assert labels[0, 67] == 0  # IoU 20/180 < 0.3
    assert (labels[0] == 1).sum() == 2 and (labels[0] == 0).sum() == 98
    # image 1: no boxes, everything background except the anchors under the crowd region
    assert (labels[1, [0, 10]] == -1).all() and (labels[1] == 0).sum() == 98
    # sampling at 256 per image with 50% fg on a larger batch size keeps both foreground anchors
    labels, _ = label_and_sample_anchors(anchors, gt, None, RPN_MATCHER, batch_size_per_image=8)
    assert (labels[0] == 1).sum() == 2 and (labels[0] == 0).sum() == 6 and (labels[1] == 0).sum() == 8


def test_rpn_losses_hand_computed_and_gradients():
    anchors = _grid_anchors()
    gt = [torch.tensor([[22.0, 10, 32, 20]]), torch.zeros(0, 4)]  # anchor 12 shifted right by 2: dx = 0.2
    labels, matched = label_and_sample_anchors(anchors, gt, None, RPN_MATCHER, batch_size_per_image=16)
    assert labels[0, 12] == 1 and (labels == 1).sum() == 1 and (labels == 0).sum() == 31
    logits = torch.zeros(2, 100, requires_grad=True)
    deltas = torch.zeros(2, 100, 4, requires_grad=True)
    losses = rpn_losses(logits, deltas, anchors, labels, matched, BoxCoder(), box_loss="l1", normalizer=32.0)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert all(v.dtype == torch.float32 for v in losses.values())
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(math.log(2.0)))  # 32 sampled at p = 0.5
    torch.testing.assert_close(losses["loss_rpn_box"], torch.tensor(0.2 / 32))
    smooth = rpn_losses(logits, deltas, anchors, labels, matched, BoxCoder(), box_loss="smooth_l1",
                        box_loss_beta=1 / 9, normalizer=32.0)
    torch.testing.assert_close(smooth["loss_rpn_box"], torch.tensor((0.2 - 0.5 / 9) / 32))
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    # gradients reach exactly the sampled anchors (objectness) and the positive one (deltas)
    assert torch.equal(logits.grad != 0, labels >= 0)
    assert torch.equal(deltas.grad.abs().sum(-1) != 0, labels == 1)
    assert deltas.grad[0, 12, 0] == pytest.approx(-1 / 32)


def test_rpn_losses_empty_ground_truth():
    anchors = _grid_anchors()
    labels, matched = label_and_sample_anchors(anchors, [torch.zeros(0, 4)] * 2, None, RPN_MATCHER)
    assert (labels == 1).sum() == 0 and (labels == 0).sum() == 200  # all 100 per image (< 256)
    logits = torch.randn(2, 100, requires_grad=True)
    deltas = torch.randn(2, 100, 4, requires_grad=True)
    losses = rpn_losses(logits, deltas, anchors, labels, matched, BoxCoder(), normalizer=512.0)
    assert losses["loss_rpn_box"].item() == 0 and torch.isfinite(losses["loss_rpn_cls"])
    sum(losses.values()).backward()
    assert deltas.grad.abs().sum() == 0 and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- proposals


def _one_level_case():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [20, 20, 40, 40], [40, 30, 80, 70], [5, 5, 6, 6]])
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 2.0]])
    deltas = torch.zeros(1, 5, 4)
    deltas[0, 1] = torch.tensor([0.1, 0.0, math.log(2.0), 0.0])  # x centre +2, width x2 -> (12, 20, 52, 40)
    deltas[0, 2] = deltas[0, 1]  # a duplicate with a lower score
    return logits, deltas, anchors


def test_proposals_hand_made():
    logits, deltas, anchors = _one_level_case()
    (boxes, scores), = generate_proposals([logits], [deltas], [anchors], torch.tensor([[50, 60]]),
                                          pre_nms_topk=10, post_nms_topk=10)
    # anchor 1 comes first with its deltas applied; its duplicate (anchor 2) is suppressed; anchor 3 clipped to
    # the 50 x 60 image; the 1 x 1 box of anchor 4 survives min_size 0
    expected = torch.tensor([[12.0, 20, 52, 40], [5, 5, 6, 6], [40, 30, 60, 50], [0, 0, 10, 10]])
    torch.testing.assert_close(boxes, expected)
    torch.testing.assert_close(scores, torch.tensor([5.0, 2.0, 1.0, 0.0]))
    (boxes, scores), = generate_proposals([logits], [deltas], [anchors], torch.tensor([[50, 60]]),
                                          pre_nms_topk=10, post_nms_topk=2, min_size=1.0)
    torch.testing.assert_close(scores, torch.tensor([5.0, 1.0]))  # the 1 x 1 box is gone, then the top 2
    # pre-NMS top-k: only anchors 1 and 2 are candidates, and 2 is suppressed by 1
    (boxes, scores), = generate_proposals([logits], [deltas], [anchors], torch.tensor([[50, 60]]),
                                          pre_nms_topk=2, post_nms_topk=10)
    assert scores.tolist() == [5.0]


def test_proposals_nms_is_per_level_and_per_image():
    logits, deltas, anchors = _one_level_case()
    two_levels = generate_proposals([logits, logits - 10], [deltas, deltas], [anchors, anchors],
                                    torch.tensor([[50, 60]]), pre_nms_topk=10, post_nms_topk=100)
    (boxes, scores), = two_levels
    # the second level's copies are not suppressed by the first level's boxes
    assert scores.tolist() == [5.0, 2.0, 1.0, 0.0, -5.0, -8.0, -9.0, -10.0]
    two_images = generate_proposals([logits.repeat(2, 1)], [deltas.repeat(2, 1, 1)], [anchors],
                                    torch.tensor([[50, 60], [50, 60]]), pre_nms_topk=10, post_nms_topk=100)
    assert [s.tolist() for _, s in two_images] == [[5.0, 2.0, 1.0, 0.0]] * 2


def test_proposals_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    gen = AnchorGenerator(strides=[8, 16, 32], sizes=[(32.0,), (64.0,), (128.0,)])
    shapes = [(16, 20), (8, 10), (4, 5)]
    anchors = gen.grid_anchors(shapes)
    logits = [torch.randn(3, a.shape[0], generator=g) for a in anchors]
    deltas = [torch.randn(3, a.shape[0], 4, generator=g) * 0.3 for a in anchors]
    sizes = torch.tensor([[128, 160], [100, 150], [60, 90]])
    kwargs = dict(pre_nms_topk=300, post_nms_topk=150, min_size=2.0)
    batched = generate_proposals(logits, deltas, anchors, sizes, **kwargs)
    for i, (boxes, scores) in enumerate(batched):
        alone_boxes, alone_scores = generate_proposals([x[i:i + 1] for x in logits], [d[i:i + 1] for d in deltas],
                                                       anchors, sizes[i:i + 1], **kwargs)[0]
        assert boxes.shape[0] == 150  # post_nms_topk per image
        torch.testing.assert_close(boxes, alone_boxes)
        torch.testing.assert_close(scores, alone_scores)
        assert (scores[:-1] >= scores[1:]).all()
        assert (boxes[:, 2] <= sizes[i, 1]).all() and (boxes[:, 3] <= sizes[i, 0]).all() and (boxes >= 0).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 2.0).all()
        assert not boxes.requires_grad
    per_batch = generate_proposals(logits, deltas, anchors, sizes, **kwargs, post_nms_topk_mode="per_batch")
    assert sum(b.shape[0] for b, _ in per_batch) == 150
    # the best 150 of the batch: each image's list is a prefix of its per-image list
    all_scores = torch.cat([s for _, s in batched])
    threshold = all_scores.sort(descending=True).values[149]
    for (boxes, scores), (ref_boxes, ref_scores) in zip(per_batch, batched):
        assert (scores >= threshold).all()
        torch.testing.assert_close(scores, ref_scores[:scores.shape[0]])


def test_proposals_empty():
    logits, deltas, anchors = _one_level_case()
    out = generate_proposals([logits.repeat(2, 1)], [deltas.repeat(2, 1, 1)], [anchors],
                             torch.tensor([[50, 60], [50, 60]]), pre_nms_topk=10, post_nms_topk=10, min_size=100.0)
    assert [(b.shape, s.shape) for b, s in out] == [((0, 4), (0,))] * 2
    out = generate_proposals([torch.zeros(2, 0)], [torch.zeros(2, 0, 4)], [torch.zeros(0, 4)],
                             torch.tensor([[50, 60], [50, 60]]), pre_nms_topk=10, post_nms_topk=10)
    assert [b.shape for b, _ in out] == [(0, 4)] * 2


def test_proposals_detached():
    logits, deltas, anchors = _one_level_case()
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    (boxes, scores), = generate_proposals([logits], [deltas], [anchors], torch.tensor([[50, 60]]),
                                          pre_nms_topk=10, post_nms_topk=10)
    assert not boxes.requires_grad and not scores.requires_grad


# ---------------------------------------------------------------- the module


def _fpn_rpn(**kwargs) -> RPN:
    gen = AnchorGenerator(strides=[4, 8, 16, 32, 64], sizes=[(32.0,), (64.0,), (128.0,), (256.0,), (512.0,)])
    return RPN(head=RPNHead(8, 3), anchor_generator=gen, matcher=RPN_MATCHER, box_coder=BoxCoder(),
               **{"pre_nms_topk_train": 200, "pre_nms_topk_test": 100, "post_nms_topk_train": 100,
                  "post_nms_topk_test": 50, **kwargs})


def _features(n: int, height: int, width: int, strides=(4, 8, 16, 32, 64)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 8, math.ceil(height / s), math.ceil(width / s), generator=g) for s in strides]


def test_rpn_train_and_eval():
    torch.manual_seed(0)
    rpn = _fpn_rpn().train()
    features = _features(2, 128, 160)
    sizes = torch.tensor([[128, 160], [96, 120]])
    gt = [torch.tensor([[10.0, 20, 60, 90], [70, 40, 150, 120]]), torch.zeros(0, 4)]
    crowd = [torch.zeros(0, 4), torch.tensor([[0.0, 0, 50, 50]])]
    proposals, losses = rpn(features, sizes, gt, crowd)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2.0), rel=0.01)  # p ~ 0.5 at init
    assert losses["loss_rpn_box"].item() > 0
    assert [p.shape[0] for p in proposals] == [100, 100] and not proposals[0].requires_grad
    assert (proposals[1][:, 2] <= 120).all() and (proposals[1][:, 3] <= 96).all()
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rpn.head.parameters())

    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(features, sizes)
    assert losses == {} and [p.shape[0] for p in proposals] == [50, 50]


def test_rpn_normalizers_and_loss_weight():
    features = _features(2, 64, 64)
    sizes = torch.tensor([[64, 64], [64, 64]])
    gt = [torch.tensor([[10.0, 10, 40, 40]]), torch.zeros(0, 4)]
    torch.manual_seed(0)
    rpn = _fpn_rpn().train()
    torch.manual_seed(1)
    _, base = rpn(features, sizes, gt)
    # 64x64 at strides 4..64: 3 * (256 + 64 + 16 + 4 + 1) = 1023 anchors per image, so 256 sampled each
    rpn.normalizer = "num_sampled"
    torch.manual_seed(1)
    _, same = rpn(features, sizes, gt)
    torch.testing.assert_close(same["loss_rpn_cls"], base["loss_rpn_cls"])
    rpn.loss_weight = 2.0
    torch.manual_seed(1)
    _, doubled = rpn(features, sizes, gt)
    torch.testing.assert_close(doubled["loss_rpn_box"], 2 * base["loss_rpn_box"])


def test_rpn_empty_ground_truth():
    torch.manual_seed(0)
    rpn = _fpn_rpn().train()
    _, losses = rpn(_features(2, 64, 96), torch.tensor([[64, 96], [50, 70]]), [torch.zeros(0, 4)] * 2)
    assert losses["loss_rpn_box"].item() == 0 and torch.isfinite(losses["loss_rpn_cls"])
    with pytest.raises(ValueError, match="gt_boxes"):
        rpn(_features(1, 64, 96), torch.tensor([[64, 96]]))


def test_rpn_c4_single_level():
    torch.manual_seed(0)
    gen = AnchorGenerator(strides=[16], sizes=[(32.0, 64.0, 128.0, 256.0, 512.0)], order="size_major")
    rpn = RPN(head=RPNHead(8, 15), anchor_generator=gen, matcher=RPN_MATCHER, box_coder=BoxCoder(),
              pre_nms_topk_train=12000, pre_nms_topk_test=6000, post_nms_topk_train=2000, post_nms_topk_test=1000)
    features = _features(2, 160, 192, strides=(16,))
    gt = [torch.tensor([[10.0, 20, 100, 90]]), torch.tensor([[30.0, 30, 60, 60]])]
    proposals, losses = rpn.train()(features, torch.tensor([[160, 192], [150, 180]]), gt)
    assert len(proposals) == 2 and all(0 < p.shape[0] <= 2000 for p in proposals)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="anchors per location"):
        RPN(head=RPNHead(8, 3), anchor_generator=gen, matcher=RPN_MATCHER, box_coder=BoxCoder())
