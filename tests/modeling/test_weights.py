"""Third-party weights: torchvision key sets written out by their own rules, safe reading, lenient loading."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from detkit.config import Config, load_config
from detkit.engine.inference import load_detector
from detkit.engine.trainer import load_model_weights
from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.build import build_model
from detkit.modeling.heads.retina_head import RetinaHead
from detkit.modeling.necks.fpn import FPN
from detkit.modeling.roi_heads.mask_head import select_class_masks
from detkit.modeling.weights import (UNUSED_CLASS_LOGIT, WeightsError, convert, detect_format, load_weights,
                                     read_state_dict, torchvision_rcnn_to_detkit, torchvision_resnet_to_detkit,
                                     torchvision_retinanet_to_detkit)

BN = ("weight", "bias", "running_mean", "running_var")
RETINANET_R50_FPN_PARAMS = 34_014_999  # torchvision's table for retinanet_resnet50_fpn (FrozenBN: buffers)


class Detector(nn.Module):
    """Holds the parts under the names the RetinaNet detector uses."""

    def __init__(self, num_classes: int = 91):
        super().__init__()
        self.backbone = ResNet(50)
        self.neck = FPN([512, 1024, 2048], ["res3", "res4", "res5"], extra_source="p5")
        self.head = RetinaHead(256, 9, num_classes)


class Custom:
    pass


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Detector()


def resnet50_keys(bn_tracked: bool = False) -> list[str]:
    """torchvision resnet50 trunk names, by rule (no fc)."""
    bn = BN + (("num_batches_tracked",) if bn_tracked else ())
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for stage, num_blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(num_blocks):
            prefix = f"layer{stage}.{block}"
            for i in (1, 2, 3):
                keys += [f"{prefix}.conv{i}.weight"] + [f"{prefix}.bn{i}.{b}" for b in bn]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{b}" for b in bn]
    return keys


def retinanet_keys(generation: int) -> dict[str, str]:
    """torchvision retinanet_resnet50_fpn name -> detkit name, by rule, for naming generation 1 or 2."""
    mapping = {f"backbone.body.{k}": f"backbone.{k}" for k in resnet50_keys()}
    wrap = ".0" if generation == 2 else ""  # v2: Conv2dNormActivation wraps each conv
    for i in range(3):
        for p in ("weight", "bias"):
            mapping[f"backbone.fpn.inner_blocks.{i}{wrap}.{p}"] = f"neck.lateral_convs.{i}.{p}"
            mapping[f"backbone.fpn.layer_blocks.{i}{wrap}.{p}"] = f"neck.output_convs.{i}.{p}"
    for tv_tower, ours in (("classification", "cls"), ("regression", "box")):
        for k in range(4):
            conv = f"conv.{k}.0" if generation == 2 else f"conv.{2 * k}"  # v1: Sequential(Conv, ReLU) x 4
            for p in ("weight", "bias"):
                mapping[f"head.{tv_tower}_head.{conv}.{p}"] = f"head.{ours}_convs.{k}.{p}"
    for p in ("weight", "bias"):
        mapping[f"backbone.fpn.extra_blocks.p6.{p}"] = f"neck.extra_convs.0.{p}"
        mapping[f"backbone.fpn.extra_blocks.p7.{p}"] = f"neck.extra_convs.1.{p}"
        mapping[f"head.classification_head.cls_logits.{p}"] = f"head.cls_logits.{p}"
        mapping[f"head.regression_head.bbox_reg.{p}"] = f"head.box_pred.{p}"
    return mapping


@pytest.fixture(scope="module")
def numbered(model):
    """Our names and shapes, each tensor filled with its own index: a key routed wrongly shows up as a wrong value
    (filling once is far cheaper than drawing 34M random numbers per test)."""
    return {k: torch.empty_like(v).fill_(i) for i, (k, v) in enumerate(model.state_dict().items())}


def small_detkit_model() -> nn.Module:
    """detkit key layout at a tiny size, for the file-format tests."""
    container = nn.Module()
    container.neck = FPN([8, 16], ["res4", "res5"], out_channels=8)
    container.head = RetinaHead(8, 9, 3, width=8)
    return container


def test_parameter_count_matches_torchvision(model):
    assert sum(p.numel() for p in model.parameters()) == RETINANET_R50_FPN_PARAMS


@pytest.mark.parametrize("generation", [1, 2])
def test_torchvision_retinanet_every_key_maps_and_lands(model, numbered, generation):
    mapping = retinanet_keys(generation)
    assert set(mapping.values()) == set(model.state_dict())  # the rules cover the whole model
    theirs = {their_key: numbered[our_key] for their_key, our_key in mapping.items()}
    assert detect_format(theirs) == "torchvision_retinanet"
    converted = torchvision_retinanet_to_detkit(theirs)
    assert converted.keys() == set(mapping.values())
    report = load_weights(model, convert(theirs))
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert len(report.loaded) == len(mapping)
    own = model.state_dict()
    for their_key, our_key in mapping.items():
        assert torch.equal(own[our_key], theirs[their_key]), their_key


def test_torchvision_v2_groupnorm_head_maps_to_shared_norms():
    head = RetinaHead(256, 9, 91, norm="GN", norm_per_level=False)
    container = nn.Module()
    container.head = head
    theirs = {}
    for tower in ("classification", "regression"):
        for k in range(4):  # conv.{k}.0 is the conv, conv.{k}.1 the GroupNorm
            theirs[f"head.{tower}_head.conv.{k}.0.weight"] = torch.randn(256, 256, 3, 3)
            for i, p in ((0, "bias"), (1, "weight"), (1, "bias")):
                theirs[f"head.{tower}_head.conv.{k}.{i}.{p}"] = torch.randn(256)
    theirs["head.classification_head.cls_logits.weight"] = torch.randn(819, 256, 3, 3)
    theirs["head.classification_head.cls_logits.bias"] = torch.randn(819)
    theirs["head.regression_head.bbox_reg.weight"] = torch.randn(36, 256, 3, 3)
    theirs["head.regression_head.bbox_reg.bias"] = torch.randn(36)
    report = load_weights(container, convert(theirs))
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert torch.equal(head.cls_norms[0][2].weight, theirs["head.classification_head.conv.2.1.weight"])
    assert torch.equal(head.box_convs[3].bias, theirs["head.regression_head.conv.3.0.bias"])


def test_torchvision_imagenet_resnet_drops_fc_and_batch_counter(model, numbered):
    keys = resnet50_keys(bn_tracked=True)
    own = model.backbone.state_dict()
    theirs = {k: torch.tensor(7) if k.endswith("num_batches_tracked") else numbered[f"backbone.{k}"] for k in keys}
    theirs["fc.weight"], theirs["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    assert detect_format(theirs) == "torchvision_resnet"
    converted = convert(theirs)
    assert converted.keys() == set(own) and all(converted[k] is theirs[k] for k in converted)  # renamed, not copied
    report = load_weights(model.backbone, converted)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert torch.equal(model.backbone.layer3[5].bn2.running_var, theirs["layer3.5.bn2.running_var"])
    # the raw dict also loads: num_batches_tracked is dropped for FrozenBatchNorm2d, fc is reported
    assert load_weights(model.backbone, theirs).unexpected == ["fc.weight", "fc.bias"]


def test_unknown_keys_are_named():
    with pytest.raises(WeightsError, match="backbone.fpn.mystery.weight"):
        torchvision_retinanet_to_detkit({"backbone.fpn.mystery.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="avgpool.weight"):
        torchvision_resnet_to_detkit({"conv1.weight": torch.zeros(1), "avgpool.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unrecognised"):
        detect_format({"model.0.conv.weight": torch.zeros(1)})


def test_detkit_round_trip(model):
    report = load_weights(model, convert(model.state_dict()))
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert len(report.loaded) == len(model.state_dict())


def test_files_safetensors_checkpoint_and_ddp_containers(tmp_path):
    own = small_detkit_model().state_dict()
    save_file({k: v.contiguous() for k, v in own.items()}, tmp_path / "w.safetensors")
    torch.save({"model": own, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in own.items()}}, tmp_path / "ddp.pt")
    for name in ("w.safetensors", "ckpt.pth", "ddp.pt"):
        state_dict = read_state_dict(tmp_path / name)
        assert detect_format(state_dict) == "detkit"
        fresh = small_detkit_model()
        report = load_weights(fresh, convert(state_dict))
        assert (report.missing, report.unexpected, report.mismatched) == ([], [], []), name
        assert all(torch.equal(v, own[k]) for k, v in fresh.state_dict().items()), name


def test_pickled_python_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": Custom()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth contains Python objects .*safetensors"):
        read_state_dict(path)


def test_missing_truncated_and_non_tensor_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"w": torch.randn(1000)}, tmp_path / "good.pth")
    save_file({"w": torch.randn(1000)}, tmp_path / "good.safetensors")
    for name in ("good.pth", "good.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match=f"cut_{name}"):
            read_state_dict(tmp_path / f"cut_{name}")
    torch.save({"w": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="note"):
        read_state_dict(tmp_path / "mixed.pth")


def test_mismatched_class_count_is_skipped_and_reported(model):
    own = model.state_dict()
    coco = convert({theirs: own[ours] for theirs, ours in retinanet_keys(1).items() if ours.startswith("head.")})
    small = nn.Module()  # the head alone: building a second ResNet-50 would only cost time
    small.head = RetinaHead(256, 9, 8)
    before = small.head.cls_logits.weight.clone()
    report = load_weights(small, coco)
    assert report.mismatched == [("head.cls_logits.weight", (819, 256, 3, 3), (72, 256, 3, 3)),
                                 ("head.cls_logits.bias", (819,), (72,))]
    assert (report.missing, report.unexpected) == ([], [])
    assert torch.equal(small.head.cls_logits.weight, before)
    assert torch.equal(small.head.box_pred.weight, model.head.box_pred.weight)
    assert "head.cls_logits.weight (819, 256, 3, 3) vs model (72, 256, 3, 3)" in report.summary()
    with pytest.raises(WeightsError, match="cls_logits"):
        load_weights(small, coco, skip_mismatched=False)


# ---------------------------------------------------------------------------------- Faster / Mask R-CNN (torchvision)

FASTER_TV_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "faster-rcnn-resnet50-fpn-torchvision.yaml"
MASK_TV_CONFIG = FASTER_TV_CONFIG.with_name("mask-rcnn-resnet50-fpn-torchvision.yaml")
CLS_SCORE = "roi_heads.box_predictor.cls_score"


def rcnn_keys(generation: int, masks: bool = True) -> dict[str, str]:
    """torchvision fasterrcnn / maskrcnn_resnet50_fpn name -> detkit name, by rule, for naming generation 1 or 2.

    Every tensor keeps its shape except cls_score (torchvision C rows, background first; detkit C + 1)."""
    mapping = {f"backbone.body.{k}": f"backbone.{k}" for k in resnet50_keys()}
    wrap = ".0" if generation == 2 else ""  # v2: Conv2dNormActivation wraps each FPN conv
    for i in range(4):  # C2-C5; P6 is a max-pool without parameters
        for p in ("weight", "bias"):
            mapping[f"backbone.fpn.inner_blocks.{i}{wrap}.{p}"] = f"neck.lateral_convs.{i}.{p}"
            mapping[f"backbone.fpn.layer_blocks.{i}{wrap}.{p}"] = f"neck.output_convs.{i}.{p}"
    for p in ("weight", "bias"):
        mapping[f"rpn.head.conv{'.0.0' if generation == 2 else ''}.{p}"] = f"rpn.head.conv.{p}"
        mapping[f"rpn.head.cls_logits.{p}"] = f"rpn.head.objectness.{p}"
        mapping[f"rpn.head.bbox_pred.{p}"] = f"rpn.head.deltas.{p}"
        for fc in ("fc6", "fc7"):
            mapping[f"roi_heads.box_head.{fc}.{p}"] = f"stages.0.head.{fc}.{p}"
        mapping[f"{CLS_SCORE}.{p}"] = f"stages.0.predictor.cls_score.{p}"
        mapping[f"roi_heads.box_predictor.bbox_pred.{p}"] = f"stages.0.predictor.bbox_pred.{p}"
        if masks:
            for i in range(4):  # v1: mask_fcn1..4; v2: Sequential of Conv2dNormActivation
                conv = f"{i}.0" if generation == 2 else f"mask_fcn{i + 1}"
                mapping[f"roi_heads.mask_head.{conv}.{p}"] = f"mask_head.convs.{2 * i}.{p}"
            mapping[f"roi_heads.mask_predictor.conv5_mask.{p}"] = f"mask_head.deconv.{p}"
            mapping[f"roi_heads.mask_predictor.mask_fcn_logits.{p}"] = f"mask_head.predictor.{p}"
    return mapping


@pytest.fixture(scope="module")
def mask_rcnn():
    """The shipped torchvision Mask R-CNN config, built (91 classes: 92 score rows, 364 box rows, 91 masks)."""
    torch.manual_seed(0)
    return build_model(load_config(Config, MASK_TV_CONFIG).model)


def torchvision_rcnn_state_dict(model: nn.Module, generation: int, masks: bool = True) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's layout: each tensor filled with its index (cheap, and a misrouted key shows up
    as a wrong value), random predictors, and a 91-row cls_score with background at row 0."""
    own = model.state_dict()
    g = torch.Generator().manual_seed(generation)
    theirs = {}
    for i, (their_key, our_key) in enumerate(rcnn_keys(generation, masks).items()):
        if "predictor" in their_key:
            shape = (91, *own[our_key].shape[1:]) if their_key.startswith(CLS_SCORE) else own[our_key].shape
            theirs[their_key] = torch.randn(shape, generator=g)
        else:
            theirs[their_key] = torch.empty_like(own[our_key]).fill_(i)
    return theirs


@pytest.mark.parametrize("generation", [1, 2])
def test_torchvision_rcnn_every_key_maps_and_lands(mask_rcnn, generation):
    mapping = rcnn_keys(generation)
    assert set(mapping.values()) == set(mask_rcnn.state_dict())  # the rules cover the whole model
    theirs = torchvision_rcnn_state_dict(mask_rcnn, generation)
    theirs["backbone.body.bn1.num_batches_tracked"] = torch.tensor(5)  # dropped, as for BatchNorm checkpoints
    assert detect_format(theirs) == "torchvision_rcnn"
    converted = torchvision_rcnn_to_detkit(theirs)
    assert converted.keys() == set(mapping.values())
    report = load_weights(mask_rcnn, convert(theirs), skip_mismatched=False)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    own = mask_rcnn.state_dict()
    for their_key, our_key in mapping.items():
        if not their_key.startswith(CLS_SCORE):
            assert torch.equal(own[our_key], theirs[their_key]), their_key
    # class rows: detkit row k = torchvision row k for k = 1..90, torchvision's background row 0 -> detkit row 91
    # (background last), and detkit row 0 (COCO id 0, which does not exist) never scores
    weight, bias = own["stages.0.predictor.cls_score.weight"], own["stages.0.predictor.cls_score.bias"]
    assert torch.equal(weight[1:91], theirs[f"{CLS_SCORE}.weight"][1:])
    assert torch.equal(bias[1:91], theirs[f"{CLS_SCORE}.bias"][1:])
    assert torch.equal(weight[91], theirs[f"{CLS_SCORE}.weight"][0]) and bias[91] == theirs[f"{CLS_SCORE}.bias"][0]
    assert not weight[0].any() and bias[0] == UNUSED_CLASS_LOGIT


def test_torchvision_rcnn_scores_boxes_and_masks_match_torchvision(mask_rcnn):
    theirs = torchvision_rcnn_state_dict(mask_rcnn, 1)
    load_weights(mask_rcnn, convert(theirs), skip_mismatched=False)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(6, 1024, generator=g) * 3
    with torch.no_grad():
        logits, deltas = mask_rcnn.stages[0].predictor(features)  # (6, 92), (6, 364)
    their_probs = F.softmax(F.linear(features, theirs[f"{CLS_SCORE}.weight"], theirs[f"{CLS_SCORE}.bias"]), -1)
    probs = F.softmax(logits, -1)  # detkit's classes 0..90, then background
    torch.testing.assert_close(probs[:, 1:91], their_probs[:, 1:])
    torch.testing.assert_close(probs[:, 91], their_probs[:, 0])
    assert probs[:, 0].eq(0).all()  # exp(-1e4) underflows: class 0 takes no probability mass
    their_deltas = F.linear(features, theirs["roi_heads.box_predictor.bbox_pred.weight"],
                            theirs["roi_heads.box_predictor.bbox_pred.bias"])
    # (6, 364) -> (6, 91, 4): block k is class k in both, torchvision's background block under detkit's class 0
    torch.testing.assert_close(deltas.view(6, 91, 4)[:, 1:], their_deltas.view(6, 91, 4)[:, 1:])
    # mask logits of each detection's class: channel k in both
    head = mask_rcnn.mask_head
    pooled = torch.randn(4, 256, 14, 14, generator=g)
    labels = torch.tensor([1, 17, 90, 44])
    with torch.no_grad():
        ours = select_class_masks(head(pooled), labels)  # (4, 28, 28)
        hidden = torch.relu(head.deconv(head.convs(pooled)))
        their_logits = F.conv2d(hidden, theirs["roi_heads.mask_predictor.mask_fcn_logits.weight"],
                                theirs["roi_heads.mask_predictor.mask_fcn_logits.bias"])  # (4, 91, 28, 28)
    torch.testing.assert_close(ours, their_logits[torch.arange(4), labels])


def test_torchvision_rcnn_unknown_and_mixed_keys_are_refused(mask_rcnn):
    theirs = {k: torch.zeros(1) for k in rcnn_keys(1, masks=False)}
    with pytest.raises(WeightsError, match="roi_heads.keypoint_head.conv_fcn1.weight"):
        convert({**theirs, "roi_heads.keypoint_head.conv_fcn1.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="roi_heads.box_head.fc8.weight"):
        torchvision_rcnn_to_detkit({"roi_heads.box_head.fc8.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="two torchvision keys map to rpn.head.conv.weight"):
        convert({**theirs, "rpn.head.conv.0.0.weight": torch.zeros(1)})  # v1 and v2 names at once
    # RetinaNet keys in an R-CNN file are unknown there, and the other way round
    with pytest.raises(WeightsError, match="backbone.fpn.extra_blocks.p6.weight"):
        convert({**theirs, "backbone.fpn.extra_blocks.p6.weight": torch.zeros(1)})
    # detkit's own two-stage checkpoints (rpn.*, stages.*, mask_head.*) are recognised as detkit's
    assert detect_format(mask_rcnn.state_dict()) == "detkit"


def test_torchvision_rcnn_configs_build_and_load_like_model_weights(mask_rcnn, tmp_path, caplog):
    faster_cfg, mask_cfg = load_config(Config, FASTER_TV_CONFIG), load_config(Config, MASK_TV_CONFIG)
    for cfg in (faster_cfg, mask_cfg):
        m, r, rpn = cfg.model, cfg.model.roi_heads, cfg.model.rpn
        assert (m.num_classes, m.label_space, m.backbone.norm_eps) == (91, "coco91", 0.0)
        assert (m.fpn.min_level, m.fpn.max_level, m.fpn.extra_source) == (2, 6, "pool")
        assert (m.anchors.round_base, m.anchors.stride_mode, rpn.min_box_size) == (True, "image_over_grid", 1e-3)
        assert (r.aligned, r.sampling_ratio, r.level_eps, r.min_box_size) == (False, 2, 1e-6, 0.01)
    assert (mask_cfg.model.arch, mask_cfg.model.mask_head.sampling_ratio, mask_cfg.model.mask_head.paste) == (
        "mask_rcnn", 2, "torchvision")
    assert mask_rcnn.box_pooler.eps == 1e-6 and not mask_rcnn.mask_pooler.aligned
    # model.weights: Trainer -> load_model_weights -> convert(read_state_dict(path)); a torchvision .pth file
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(torchvision_rcnn_state_dict(mask_rcnn, 2), path)
    with caplog.at_level("WARNING"):
        message = load_model_weights(mask_rcnn, str(path))
    assert message.endswith(f"{len(mask_rcnn.state_dict())} tensors loaded") and not caplog.records
    # `detkit eval/predict --weights`: load_detector builds the Faster R-CNN config and refuses any misfit
    path = tmp_path / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(torchvision_rcnn_state_dict(mask_rcnn, 1, masks=False), path)
    faster, categories = load_detector(faster_cfg, str(path), torch.device("cpu"))
    assert faster.num_classes == 91 and not faster.has_masks and [c["id"] for c in categories] == list(range(91))
    assert faster.stages[0].predictor.cls_score.bias[0] == UNUSED_CLASS_LOGIT
