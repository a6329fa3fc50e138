"""Faster / Mask / Cascade R-CNN: RoI sampling, box losses, post-processing and every shipped config."""
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.config import Config, load_config
from detkit.data.loader import Targets
from detkit.modeling.build import build_model
from detkit.modeling.roi_heads.fast_rcnn import fast_rcnn_inference, fast_rcnn_losses, label_and_sample
from detkit.modeling.roi_heads.mask_head import mask_rcnn_loss, select_class_masks
from detkit.ops import BoxCoder

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 if p.name.split("-")[0] in ("faster", "mask", "cascade", "trident"))


def test_label_and_sample_hand_made():
    gt = [torch.tensor([[10.0, 10, 50, 50]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
    proposals = [torch.tensor([[12.0, 10, 50, 50], [100, 100, 140, 140], [11, 11, 49, 49], [0, 0, 5, 5]]),
                 torch.tensor([[0.0, 0, 10, 10]])]
    # 4 RoIs per image, at most 1 foreground: of the three foreground candidates (two proposals and the appended
    # ground truth) one is drawn, then the two background ones; the fourth slot is padding
    torch.manual_seed(0)
    s = label_and_sample(proposals, gt, labels, num_classes=3, fg_iou=0.5, batch_size_per_image=4,
                         positive_fraction=0.25, append_gt=True)
    assert s.boxes.shape == (2, 4, 4)
    assert s.valid[0].tolist() == [True, True, True, False]
    assert s.gt_classes[0].tolist()[:3] == [2, 3, 3]
    assert s.foreground[0].tolist() == [True, False, False, False]
    torch.testing.assert_close(s.matched_boxes[0, 0], gt[0][0])
    # image 1 has one proposal and no ground truth: one background RoI, the rest padding
    assert s.valid[1].tolist() == [True, False, False, False] and s.gt_classes[1, 0].item() == 3


def test_fast_rcnn_losses_hand_computed():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.manual_seed(0)
    s = label_and_sample([torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]])], [torch.tensor([[10.0, 10, 50, 50]])],
                         [torch.tensor([1])], num_classes=2, fg_iou=0.5, batch_size_per_image=2,
                         positive_fraction=0.5, append_gt=False)
    logits = torch.zeros(2, 3, requires_grad=True)
    deltas = torch.zeros(2, 8, requires_grad=True)
    losses = fast_rcnn_losses(logits, deltas, s, coder)
    # uniform logits over 3 classes: CE log 3 per RoI; the foreground RoI equals its box: zero box loss
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(float(np.log(3))))
    assert losses["loss_box"].item() == 0.0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0
    # a wrong delta on the ground-truth class's columns counts (L1 / 2 sampled RoIs), other classes' do not
    with torch.no_grad():
        deltas[0, 4] = 0.5
        deltas[0, 0] = 7.0
    torch.testing.assert_close(fast_rcnn_losses(logits, deltas, s, coder)["loss_box"], torch.tensor(0.25))


def test_fast_rcnn_inference_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 20, 4, generator=g)
    xy = torch.rand(3, 20, 4, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(3, 20, 4, 2, generator=g) * 40], -1)
    sizes = torch.tensor([[100, 100], [90, 120], [64, 64]])
    kwargs = dict(score_threshold=0.3, nms_threshold=0.5, max_detections=15)
    batched, rows = fast_rcnn_inference(scores, boxes, sizes, **kwargs)
    for i in range(3):
        (alone,), (alone_rows,) = fast_rcnn_inference(scores[i:i + 1], boxes[i:i + 1], sizes[i:i + 1], **kwargs)
        torch.testing.assert_close(batched[i].boxes, alone.boxes)
        torch.testing.assert_close(batched[i].scores, alone.scores)
        assert torch.equal(batched[i].labels, alone.labels) and torch.equal(rows[i], alone_rows)
        assert len(alone.scores) <= 15 and (alone.scores > 0.3).all()
        assert (alone.boxes[:, 2] <= sizes[i, 1]).all() and (alone.boxes[:, 3] <= sizes[i, 0]).all()
        # each kept detection is its RoI's score for its class
        torch.testing.assert_close(alone.scores, scores[i, alone_rows, alone.labels])


def test_fast_rcnn_inference_drops_small_boxes_only_when_asked():
    # RoI 0's box for class 0 is 0.005 px wide after clipping to the 50-px-wide image: torchvision's
    # remove_small_boxes(1e-2) drops it before NMS, the default keeps it; a box exactly 0.01 wide stays (>=)
    scores = torch.tensor([[[0.9, 0.2], [0.8, 0.7]]])  # (1, 2 RoIs, 2 classes)
    boxes = torch.tensor([[[[49.995, 0.0, 60.0, 20.0], [0.0, 0.0, 10.0, 10.0]],
                           [[20.0, 20.0, 20.01, 30.0], [30.0, 30.0, 40.0, 40.0]]]])
    sizes = torch.tensor([[40, 50]])
    kwargs = dict(score_threshold=0.05, nms_threshold=0.5, max_detections=10)
    (kept,), _ = fast_rcnn_inference(scores, boxes, sizes, **kwargs)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.2])
    (kept,), _ = fast_rcnn_inference(scores, boxes, sizes, min_box_size=0.01, **kwargs)
    assert kept.scores.tolist() == pytest.approx([0.8, 0.7, 0.2])


def test_mask_loss_and_class_selection():
    logits = torch.zeros(3, 2, 4, 4)
    logits[1, 1] = 5.0
    picked = select_class_masks(logits, torch.tensor([0, 1, 1]))
    assert picked.shape == (3, 4, 4) and picked[1].eq(5.0).all() and picked[0].eq(0).all()
    targets = torch.ones(3, 4, 4)
    # only foreground rows count: row 2 (padding) is ignored, rows 0 and 1 average their pixels
    loss = mask_rcnn_loss(picked, targets, torch.tensor([True, True, False]))
    expected = (np.log(2) + np.log1p(np.exp(-5.0))) / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32))
    assert mask_rcnn_loss(picked, targets, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def _square(x0, y0, x1, y1):
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float32)]


def _batch(masks: bool):
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    sizes = torch.tensor([[64, 96], [60, 80]])
    targets = [Targets(torch.tensor([[4.0, 6, 40, 50], [50, 10, 90, 60]]), torch.tensor([0, 2]), torch.zeros(0, 4),
                       [_square(4, 6, 40, 50), _square(50, 10, 90, 60)] if masks else None),
               Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor([[0.0, 0, 20, 20]]),
                       [] if masks else None)]
    return images, sizes, targets


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_trains_and_predicts_at_a_tiny_size(path):
    cfg = load_config(Config, path)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    images, sizes, targets = _batch(masks=cfg.model.arch == "mask_rcnn")
    model.train()
    losses = model(images, sizes, targets)
    loss = sum(v for k, v in losses.items() if k.startswith("loss"))
    loss.backward()
    assert torch.isfinite(loss), losses
    expected = {"loss_rpn_cls", "loss_rpn_box"}
    if cfg.model.arch == "cascade_rcnn":
        expected |= {f"loss_{kind}_stage{i}" for kind in ("cls", "box") for i in (1, 2, 3)}
    else:
        expected |= {"loss_cls", "loss_box"} | ({"loss_mask"} if cfg.model.arch == "mask_rcnn" else set())
    assert set(losses) == expected
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        dets = model(images, sizes)
    assert len(dets) == 2 and all(d.boxes.shape[1] == 4 for d in dets)
    if cfg.model.arch == "mask_rcnn":
        assert all(d.mask_probs is not None and d.mask_probs.shape[0] == d.boxes.shape[0] for d in dets)


def test_parameter_counts_beside_torchvision():
    # torchvision's fasterrcnn_resnet50_fpn has 41,755,286 parameters and maskrcnn_resnet50_fpn 44,401,393 (91
    # outputs with background at index 0; frozen BatchNorms are buffers). detkit predicts K classes plus
    # background, so K = 90 gives torchvision's 91 class scores; torchvision also regresses a box for the
    # background class (4 x 1025 more) and predicts a background mask (1 x 257 more), which detkit does not
    faster = build_model(load_config(Config, "configs/faster-rcnn-resnet50-fpn-1x.yaml").model, 90)
    mask = build_model(load_config(Config, "configs/mask-rcnn-resnet50-fpn-1x.yaml").model, 90)
    assert sum(p.numel() for p in faster.parameters()) == 41_755_286 - 4 * 1025
    assert sum(p.numel() for p in mask.parameters()) == 44_401_393 - 4 * 1025 - 257


@pytest.mark.parametrize("style", ["pytorch", "v2"])
def test_imagenet_trunk_weights_fill_the_c4_res5_head(tmp_path, style):
    # the C4 box head owns the trunk's res5 stage (and v2's final norm): ImageNet weights must land there too
    from detkit.engine.trainer import load_model_weights
    from detkit.modeling.backbones.resnet import ResNet

    torch.manual_seed(0)
    trunk = ResNet(depth=18, style=style, norm="BN", freeze_at=0, out_features=("res5",))
    for name, tensor in trunk.state_dict().items():  # non-trivial statistics too
        if tensor.is_floating_point():
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    torch.save(trunk.state_dict(), tmp_path / "trunk.pth")
    cfg = load_config(Config, "configs/faster-rcnn-resnet50-c4-1x.yaml",
                      ["model.backbone.depth=18", f"model.backbone.style={style}", "model.backbone.norm=BN",
                       "model.backbone.freeze_at=0"])
    model = build_model(cfg.model, 3)
    message = load_model_weights(model, str(tmp_path / "trunk.pth"), backbone_only=True)
    assert f"{len(trunk.state_dict())} tensors loaded" in message
    own = model.state_dict()
    res5 = model.stages[0].head.res5
    assert torch.equal(own["stages.0.head.res5.1.conv2.weight"], trunk.state_dict()["layer4.1.conv2.weight"])
    assert torch.equal(own["backbone.layer3.0.conv1.weight"], trunk.state_dict()["layer3.0.conv1.weight"])
    if style == "v2":
        assert torch.equal(res5[2].running_var, trunk.post_norm.running_var)
    x = torch.randn(2, 256, 7, 7)
    model.eval()
    trunk.eval()
    expected = trunk.post_norm(trunk.layer4(x)).relu() if style == "v2" else trunk.layer4(x)
    assert torch.allclose(model.stages[0].head(x, return_map=True)[1], expected, atol=1e-5)


# losses of the demo configs (3 classes) on `_batch` at seed 0, pinned to catch silent changes to sampling,
# matching, pooling or the losses; the zero-predictor test below checks the same pipeline against closed forms
GOLDEN = {
    "mask-rcnn-resnet18-fpn-demo": {"loss_rpn_cls": 0.683739, "loss_rpn_box": 0.00577, "loss_cls": 1.155634,
                                    "loss_box": 0.204205, "loss_mask": 0.693721},
    "cascade-rcnn-resnet18-fpn-demo": {"loss_rpn_cls": 0.683344, "loss_rpn_box": 0.00577,
                                       "loss_cls_stage1": 1.142847, "loss_box_stage1": 0.205225,
                                       "loss_cls_stage2": 0.644206, "loss_box_stage2": 0.069678,
                                       "loss_cls_stage3": 0.367636, "loss_box_stage3": 0.000666},
}


# the sampling the values were pinned with, where a demo's recipe has since changed it (the Cascade demo's faster
# recipe samples fewer proposals and RoIs)
GOLDEN_SAMPLING = {"cascade-rcnn-resnet18-fpn-demo": [
    "model.rpn.pre_nms_topk_train=1000", "model.rpn.post_nms_topk_train=500",
    "model.roi_heads.batch_size_per_image=128", "model.roi_heads.sampling_ratio=0"]}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_losses(name):
    cfg = load_config(Config, f"configs/{name}.yaml", GOLDEN_SAMPLING.get(name, []))
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    losses = model(*_batch(masks=cfg.model.arch == "mask_rcnn"))
    assert {k: round(v.item(), 6) for k, v in losses.items()} == pytest.approx(GOLDEN[name], rel=1e-4, abs=2e-6)


def test_losses_with_zero_predictors_have_closed_forms():
    # all-zero logits: softmax over K + 1 = 4 outputs gives ln 4 per RoI, sigmoid objectness and mask logits ln 2
    # per anchor / pixel, whatever was sampled
    cfg = load_config(Config, "configs/mask-rcnn-resnet18-fpn-demo.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    for layer in (model.stages[0].predictor.cls_score, model.rpn.head.objectness, model.mask_head.predictor):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    losses = model(*_batch(masks=True))
    assert losses["loss_cls"].item() == pytest.approx(np.log(4), rel=1e-6)
    assert losses["loss_rpn_cls"].item() == pytest.approx(np.log(2), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(np.log(2), rel=1e-6)


@pytest.mark.parametrize("res5_stride,resolution", [(2, 14), (1, 7)])
def test_c4_mask_rcnn_runs_its_mask_head_on_the_res5_map(res5_stride, resolution):
    # Mask R-CNN C4 (detectron2): no mask pooler; the deconv + predictor read the box head's 7x7 res5 output
    cfg = load_config(Config, "configs/faster-rcnn-resnet50-c4-1x.yaml",
                      ["model.arch=mask_rcnn", "data.load_masks=true", "model.backbone.depth=18",
                       f"model.roi_heads.res5_stride={res5_stride}",
                       f"model.roi_heads.pooler_resolution={resolution}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    assert model.mask_pooler is None and len(model.mask_head.convs) == 0
    losses = model(*_batch(masks=True))
    assert set(losses) >= {"loss_mask", "loss_cls"} and torch.isfinite(losses["loss_mask"])
    losses["loss_mask"].backward()
    assert model.stages[0].head.res5[0].conv1.weight.grad is not None  # the mask loss trains res5 too
    model.eval()
    with torch.no_grad():
        dets = model(*_batch(masks=True)[:2])
    assert all(d.mask_probs.shape[1:] == (14, 14) for d in dets)
