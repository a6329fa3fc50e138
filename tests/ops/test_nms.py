import time

import pytest
import torch

from detkit.ops import batched_nms, nms
from detkit.ops.boxes import box_iou


def _slow_nms(boxes, scores, threshold, idxs=None):
    """The textbook loop: visit by descending score (ties: lower index first), keep unless suppressed."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    overlap = box_iou(boxes, boxes) > threshold
    if idxs is not None:
        idxs = torch.as_tensor(idxs)
        overlap &= idxs[:, None] == idxs[None, :]
    kept = []
    for i in order:
        if not kept or not overlap[i, kept].any():
            kept.append(i)
    return kept


def _clustered(n, seed, spread=60.0, groups=20):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(groups, 2, generator=g) * 500
    c = centers[torch.randint(0, groups, (n,), generator=g)] + torch.randn(n, 2, generator=g) * spread / 6
    wh = torch.rand(n, 2, generator=g) * spread + 8
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = torch.rand(n, generator=g)
    return boxes, scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_same_kept_set_and_order_as_the_slow_reference(seed, threshold):
    boxes, scores = _clustered(300, seed)
    expected = _slow_nms(boxes, scores, threshold)
    for block in (7, 64, 512):
        assert nms(boxes, scores, threshold, block_size=block).tolist() == expected


@pytest.mark.parametrize("seed", range(3))
def test_batched_equals_per_class_reference(seed):
    boxes, scores = _clustered(250, seed)
    idxs = torch.randint(0, 5, (250,), generator=torch.Generator().manual_seed(seed))
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == _slow_nms(boxes, scores, 0.5, idxs.tolist())


def test_hand_made_chain_and_ties():
    # a chain: 0 suppresses 1, 1 is gone so 2 survives although it overlaps 1
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.3).tolist() == [0, 2]
    # equal scores: the lower index wins
    same = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    assert nms(same, torch.tensor([0.5, 0.5]), 0.5).tolist() == [0]


def test_empty_max_output_and_half_inputs():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    boxes, scores = _clustered(200, 0)
    full = nms(boxes, scores, 0.5)
    assert nms(boxes, scores, 0.5, max_output=5, block_size=3).tolist() == full[:5].tolist()
    assert nms(boxes.half(), scores.half(), 0.5).tolist() == nms(boxes.half().float(), scores.half().float(),
                                                                 0.5).tolist()


def test_fast_enough_for_100k_boxes():
    boxes, scores = _clustered(100_000, 0, spread=40.0, groups=2000)
    idxs = torch.randint(0, 80, (100_000,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    kept = batched_nms(boxes, scores, idxs, 0.5)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"NMS of 100k boxes took {elapsed:.1f} s"  # 0.8 s on the 2-core dev machine
    assert batched_nms(boxes, scores, idxs, 0.5, max_output=1000).tolist() == kept[:1000].tolist()
    # spot-check exactness at this size on a few classes against the slow loop
    for c in (0, 41):
        sel = torch.nonzero(idxs == c).squeeze(1)
        expected = sel[_slow_nms(boxes[sel], scores[sel], 0.5)].tolist()
        assert [i for i in kept.tolist() if idxs[i] == c] == expected
