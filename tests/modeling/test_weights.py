"""Third-party weights: torchvision key sets written out by their own rules, safe reading, lenient loading."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from detkit.modeling.backbones.resnet import ResNet
from detkit.modeling.heads.retina_head import RetinaHead
from detkit.modeling.necks.fpn import FPN
from detkit.modeling.weights import (WeightsError, convert, detect_format, load_weights, read_state_dict,
                                     torchvision_resnet_to_detkit, torchvision_retinanet_to_detkit)

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
