import torch

from detkit.modeling.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from detkit.ops import box_iou


def test_intervals_and_low_quality_hand_made():
    iou = torch.tensor([[0.6, 0.45, 0.3, 0.1, 0.0],
                        [0.1, 0.2, 0.35, 0.05, 0.0]])
    matched, labels = Matcher((0.4, 0.5), (BACKGROUND, IGNORE, FOREGROUND), True)(iou)
    assert matched.tolist()[:4] == [0, 0, 1, 0]
    # anchor 2 is GT 1's best match (0.35): foreground although below 0.5
    assert labels.tolist() == [FOREGROUND, IGNORE, FOREGROUND, BACKGROUND, BACKGROUND]
    _, strict = Matcher((0.4, 0.5), (BACKGROUND, IGNORE, FOREGROUND), False)(iou)
    assert strict.tolist() == [FOREGROUND, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND]
    _, tf = Matcher((0.5,), (BACKGROUND, FOREGROUND), True)(iou)  # no ignore band
    assert tf.tolist() == [FOREGROUND, BACKGROUND, FOREGROUND, BACKGROUND, BACKGROUND]


def test_ties_all_become_foreground_and_unreachable_gt_changes_nothing():
    iou = torch.tensor([[0.3, 0.3, 0.1], [0.0, 0.0, 0.0]])
    _, labels = Matcher()(iou)
    assert labels.tolist() == [FOREGROUND, FOREGROUND, BACKGROUND]


def test_empty_ground_truth_is_all_background():
    matched, labels = Matcher()(torch.zeros(0, 7))
    assert matched.shape == (7,) and (labels == BACKGROUND).all()
    matched, labels = Matcher()(torch.zeros(3, 0, 7))
    assert labels.shape == (3, 7) and (labels == BACKGROUND).all()


def test_batched_with_padding_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    anchors = torch.cat([torch.rand(50, 2, generator=g) * 80, torch.rand(50, 2, generator=g) * 80 + 90], 1)
    gts = [torch.cat([torch.rand(n, 2, generator=g) * 80, torch.rand(n, 2, generator=g) * 80 + 90], 1)
           for n in (3, 0, 5)]
    padded = torch.zeros(3, 5, 4)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for i, gt in enumerate(gts):
        padded[i, :len(gt)] = gt
        valid[i, :len(gt)] = True
    iou = torch.stack([box_iou(p, anchors) for p in padded])  # (N, G, A)
    matcher = Matcher()
    matched, labels = matcher(iou, valid)
    for i, gt in enumerate(gts):
        m, lab = matcher(box_iou(gt, anchors))
        assert torch.equal(lab, labels[i])
        fg = lab == FOREGROUND
        assert torch.equal(m[fg], matched[i][fg])
