"""Loading third-party weights safely: read files without executing code, rename torchvision keys, load leniently.

Typical use::

    state_dict = convert(read_state_dict("retinanet_resnet50_fpn_coco-eeacb38b.pth"))  # or fasterrcnn_*, maskrcnn_*
    print(load_weights(model, state_dict).summary())
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..utils.serialization import UnsafePickleError, torch_load_weights_only

_CONTAINER_KEYS = ("model", "state_dict", "model_state")
_BN_STATE = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
# detkit's ResNet names: v1 (torchvision's) and v2 (pre-activation: `bn_data`, `post_norm`, bare-conv shortcuts)
_RESNET_KEY = re.compile(rf"conv1\.weight|(?:bn1|bn_data|post_norm)\.{_BN_STATE}"
                         rf"|layer\d+\.\d+\.(?:conv\d\.weight|bn\d\.{_BN_STATE}"
                         rf"|downsample\.0\.weight|downsample\.1\.{_BN_STATE}|downsample\.weight)")
_TOWERS = {"classification": "cls", "regression": "box"}


class WeightsError(RuntimeError):
    """A weights file that cannot be read safely, or a state dict that does not fit."""


def read_weights_file(path: str | Path) -> Any:
    """Load `.safetensors` or a PyTorch file as stored (a detkit checkpoint stays a whole dict), never executing
    code stored in it: pickled files go through `torch.load(weights_only=True)`.

    Raises:
        WeightsError: the file is missing, corrupt or truncated, or holds Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist" if not path.exists() else
                           f"weights file {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch_load_weights_only(path)
    except UnsafePickleError as e:
        what = f" ({e.what})" if e.what else ""
        raise WeightsError(f"{path} contains Python objects{what} that detkit will not execute (loading them could "
                           "run arbitrary code); convert the weights to .safetensors with a trusted tool") from None
    except pickle.UnpicklingError as e:
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise WeightsError(f"{path} is not a weights file (a PyTorch .pth/.pt or a .safetensors file)"
                           + (f": {detail.group(1).strip()}" if detail else "")) from None
    except Exception as e:  # zip, EOF and safetensors header errors all mean a damaged file
        detail = f"{type(e).__name__}: {_first_line(e)}" if _first_line(e) else type(e).__name__
        raise WeightsError(f"{path} is corrupt or truncated ({detail})") from None


def state_dict_of(obj: Any, source: str | Path = "<weights>") -> dict[str, Tensor]:
    """The {name: tensor} inside a loaded weights file: containers ({"model": ...}, {"state_dict": ...},
    {"model_state": ...}) are unwrapped and a DistributedDataParallel "module." prefix is removed.

    Raises:
        WeightsError: `obj` holds no state dict.
    """
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in _CONTAINER_KEYS):
        obj = next(obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping))
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source} holds no state dict (found {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise WeightsError(f"{source} is not a state dict: entries {_few(not_tensors)} are not tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from `.safetensors` or a PyTorch file safely (see `read_weights_file`, `state_dict_of`).

    Returns:
        {name: tensor} on the CPU.
    """
    return state_dict_of(read_weights_file(path), path)


def torchvision_resnet_to_detkit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ImageNet ResNet state dict (`resnet50-*.pth`) -> detkit `ResNet` keys.

    The names are the same; the classifier (`fc.*`) and BatchNorm's `num_batches_tracked` are dropped.

    Raises:
        WeightsError: keys that are not part of a torchvision ResNet.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if _RESNET_KEY.fullmatch(key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"not a torchvision ResNet state dict: unknown keys {_few(unknown)}")
    return out


_Rules = list[tuple[re.Pattern, Callable[[re.Match], str]]]
# the trunk and the FPN's lateral and output convs, named alike in torchvision's RetinaNet and R-CNN files
_BACKBONE_FPN_RULES: _Rules = [
    (re.compile(r"backbone\.body\.(.+)"), lambda m: f"backbone.{m[1]}"),
    (re.compile(r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)"),
     lambda m: f"neck.lateral_convs.{m[1]}.{m[2]}"),
    (re.compile(r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)"),
     lambda m: f"neck.output_convs.{m[1]}.{m[2]}"),
]

# torchvision key -> detkit key for retinanet_resnet50_fpn. Two naming generations exist (pytorch/vision):
# - v1, the original checkpoint files: each head tower is nn.Sequential(Conv2d, ReLU, ...) so its convs are
#   `conv.0, conv.2, conv.4, conv.6` (retinanet.py at commit 787b3dda); FPN convs are plain Conv2d,
#   `inner_blocks.{i}.weight` / `layer_blocks.{i}.weight` (ops/feature_pyramid_network.py at commit 032024ea).
# - v2, current torchvision: towers are Sequential(Conv2dNormActivation x 4) -> `conv.{k}.0` (conv), `conv.{k}.1`
#   (GroupNorm, retinanet_resnet50_fpn_v2 only), and FPN blocks are Conv2dNormActivation -> `inner_blocks.{i}.0`.
#   The classes carry `_version = 2`, and `_load_from_state_dict` renames old keys on load:
#   retinanet.py `_v1_to_v2_weights`: `conv.{2 * i}.{type}` -> `conv.{i}.0.{type}`;
#   FeaturePyramidNetwork: `{block}.{i}.{type}` -> `{block}.{i}.0.{type}` for inner_blocks/layer_blocks.
# LastLevelP6P7 keeps `extra_blocks.p6` / `.p7` in both; the trunk is `backbone.body.*` (FrozenBatchNorm2d buffers).
_RETINANET_RULES: _Rules = [
    *_BACKBONE_FPN_RULES,
    (re.compile(r"backbone\.fpn\.extra_blocks\.p([67])\.(weight|bias)"),
     lambda m: f"neck.extra_convs.{int(m[1]) - 6}.{m[2]}"),
    (re.compile(r"head\.(classification|regression)_head\.conv\.(\d*[02468])\.(weight|bias)"),  # v1
     lambda m: f"head.{_TOWERS[m[1]]}_convs.{int(m[2]) // 2}.{m[3]}"),
    (re.compile(r"head\.(classification|regression)_head\.conv\.(\d+)\.0\.(weight|bias)"),  # v2 conv
     lambda m: f"head.{_TOWERS[m[1]]}_convs.{m[2]}.{m[3]}"),
    # v2 GroupNorm, shared across levels: RetinaHead(norm="GN", norm_per_level=False)
    (re.compile(r"head\.(classification|regression)_head\.conv\.(\d+)\.1\.(weight|bias)"),
     lambda m: f"head.{_TOWERS[m[1]]}_norms.0.{m[2]}.{m[3]}"),
    (re.compile(r"head\.classification_head\.cls_logits\.(weight|bias)"), lambda m: f"head.cls_logits.{m[1]}"),
    (re.compile(r"head\.regression_head\.bbox_reg\.(weight|bias)"), lambda m: f"head.box_pred.{m[1]}"),
]


def torchvision_retinanet_to_detkit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `retinanet_resnet50_fpn` state dict (either naming generation) -> detkit RetinaNet keys.

    The detkit model must use `FPN(..., extra_source="p5")` for the v1 COCO weights (torchvision builds P6 from P5
    there) and "c5" for retinanet_resnet50_fpn_v2.

    Args:
        state_dict: torchvision keys (`backbone.body.*`, `backbone.fpn.*`, `head.classification_head.*`, ...).

    Returns:
        The same tensors under `backbone.*`, `neck.*`, `head.*`; `num_batches_tracked` is dropped.

    Raises:
        WeightsError: keys that no rule knows, or two keys that land on the same detkit name.
    """
    return _rename(state_dict, _RETINANET_RULES, "RetinaNet")


# torchvision key -> detkit key for fasterrcnn_resnet50_fpn and maskrcnn_resnet50_fpn (the v1 COCO weights). The
# trunk and FPN follow _BACKBONE_FPN_RULES (P6 is a parameter-free max-pool, LastLevelMaxPool). Where the two
# naming generations differ (pytorch/vision, models/detection/rpn.py and mask_rcnn.py):
# - v1, the original files: RPNHead.conv is a plain Conv2d (`rpn.head.conv.weight`); MaskRCNNHeads holds
#   `mask_fcn1` .. `mask_fcn4`.
# - v2, current torchvision (`_version = 2`, old keys renamed on load): RPNHead.conv is
#   Sequential(Conv2dNormActivation) -> `rpn.head.conv.0.0.*`; MaskRCNNHeads is a Sequential of
#   Conv2dNormActivation -> `roi_heads.mask_head.{i}.0.*` for mask_fcn{i + 1}.
# The same in both: rpn.head.cls_logits / bbox_pred, roi_heads.box_head.fc6 / fc7, roi_heads.box_predictor
# .cls_score / .bbox_pred, roi_heads.mask_predictor.conv5_mask (the 2x deconv) / .mask_fcn_logits.
# detkit's MaskRCNNHead.convs interleaves ReLUs: conv i is `convs.{2 * i}`.
_RCNN_RULES: _Rules = [
    *_BACKBONE_FPN_RULES,
    (re.compile(r"rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)"), lambda m: f"rpn.head.conv.{m[1]}"),
    (re.compile(r"rpn\.head\.cls_logits\.(weight|bias)"), lambda m: f"rpn.head.objectness.{m[1]}"),
    (re.compile(r"rpn\.head\.bbox_pred\.(weight|bias)"), lambda m: f"rpn.head.deltas.{m[1]}"),
    (re.compile(r"roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)"), lambda m: f"stages.0.head.{m[1]}.{m[2]}"),
    (re.compile(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)"),
     lambda m: f"stages.0.predictor.{m[1]}.{m[2]}"),
    (re.compile(r"roi_heads\.mask_head\.mask_fcn([1-9]\d*)\.(weight|bias)"),  # v1
     lambda m: f"mask_head.convs.{2 * (int(m[1]) - 1)}.{m[2]}"),
    (re.compile(r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)"),  # v2
     lambda m: f"mask_head.convs.{2 * int(m[1])}.{m[2]}"),
    (re.compile(r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)"), lambda m: f"mask_head.deconv.{m[1]}"),
    (re.compile(r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)"),
     lambda m: f"mask_head.predictor.{m[1]}"),
]

# The logit given to detkit's class 0 when torchvision's scores are moved over: exp(-1e4 - max) is exactly 0 in
# float32, where detkit takes the softmax, so that row takes no probability from the others. It is finite so
# that fp16 holds it (max 65504) and a fine-tuning loss stays free of inf * 0.
UNUSED_CLASS_LOGIT = -1e4


def torchvision_rcnn_to_detkit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `fasterrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn` state dict (either naming generation)
    -> detkit TwoStageDetector keys.

    torchvision's box predictor has C class rows (91 for COCO), background first and row k for its label k; its
    box regression and mask logits hold one block / channel per row, background included. detkit puts
    background last (`BoxPredictor`: K + 1 scores, 4K box rows, K mask channels), so the model takes
    num_classes K = C (with label_space coco91 for COCO, output k = category id k) and:
    - cls_score rows 1..C-1 stay where they are, torchvision's row 0 (background) moves to row C, and row 0
      becomes weight 0 and bias UNUSED_CLASS_LOGIT: a class that never scores, so detkit's softmax over its
      C + 1 rows equals torchvision's over C;
    - bbox_pred and the mask logits copy unchanged: detkit decodes block k and selects channel k for class k,
      and torchvision's background block / channel sits under the unused class 0.

    Args:
        state_dict: torchvision keys (`backbone.body.*`, `backbone.fpn.*`, `rpn.head.*`, `roi_heads.*`).

    Returns:
        detkit keys (`backbone.*`, `neck.*`, `rpn.head.*`, `stages.0.*`, `mask_head.*`); `num_batches_tracked` is
        dropped. Use FPN levels 2..6 with `extra_source: pool` (see configs/*-torchvision.yaml).

    Raises:
        WeightsError: keys that no rule knows, or two keys that land on the same detkit name.
    """
    out = _rename(state_dict, _RCNN_RULES, "Faster/Mask R-CNN")
    for name, fill in (("weight", 0.0), ("bias", UNUSED_CLASS_LOGIT)):
        key = f"stages.0.predictor.cls_score.{name}"
        if key in out:
            value = out[key]
            # (C, ...) background first -> (C + 1, ...): unused class 0, classes 1..C-1, background last
            out[key] = torch.cat([value.new_full((1, *value.shape[1:]), fill), value[1:], value[:1]])
    return out


def _rename(state_dict: Mapping[str, Tensor], rules: _Rules, model_name: str) -> dict[str, Tensor]:
    """Apply the first matching rule to every key (`num_batches_tracked` is dropped)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = next(((m, rename) for pattern, rename in rules if (m := pattern.fullmatch(key))), None)
        if match is None:
            unknown.append(key)
            continue
        new_key = match[1](match[0])
        if new_key in out:
            raise WeightsError(f"two torchvision keys map to {new_key}; is the file mixing naming generations?")
        out[new_key] = value
    if unknown:
        raise WeightsError(f"not a torchvision {model_name} state dict: unknown keys {_few(unknown)}")
    return out


# state kept on the detector itself rather than on a part (RetinaNet's loss-normaliser EMA)
DETECTOR_BUFFERS = ("loss_normalizer",)
# top-level parts of detkit's detectors: RetinaNet (backbone, neck, head) and TwoStageDetector (backbone, neck, rpn,
# stages, mask_head)
DETKIT_PREFIXES = ("backbone.", "neck.", "head.", "rpn.", "stages.", "mask_head.")


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Name the key layout of a state dict: "torchvision_rcnn", "torchvision_retinanet", "torchvision_resnet" or
    "detkit".

    torchvision's R-CNN files share `backbone.body.` / `backbone.fpn.` with its RetinaNet and are told apart by
    their `roi_heads.` keys (or the RPN's `cls_logits` / `bbox_pred`, which detkit calls objectness / deltas). A
    bare ImageNet ResNet without `fc` has detkit's own ResNet names, so it reads as "detkit" (nothing to rename).

    Raises:
        WeightsError: keys that fit none of them.
    """
    keys = list(state_dict)
    if any(k.startswith(("roi_heads.", "rpn.head.cls_logits.", "rpn.head.bbox_pred.")) for k in keys):
        return "torchvision_rcnn"
    if any(k.startswith(("backbone.body.", "backbone.fpn.", "head.classification_head.", "head.regression_head."))
           for k in keys):
        return "torchvision_retinanet"
    if "fc.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        return "torchvision_resnet"
    if keys and all(k.startswith(DETKIT_PREFIXES) or k in DETECTOR_BUFFERS or _RESNET_KEY.fullmatch(k) for k in keys):
        return "detkit"
    raise WeightsError(f"unrecognised state dict layout (first keys {_few(keys)})")


def convert(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout (see `detect_format`) -> detkit keys."""
    fmt = detect_format(state_dict)
    if fmt == "torchvision_rcnn":
        return torchvision_rcnn_to_detkit(state_dict)
    if fmt == "torchvision_retinanet":
        return torchvision_retinanet_to_detkit(state_dict)
    if fmt == "torchvision_resnet":
        return torchvision_resnet_to_detkit(state_dict)
    return dict(state_dict)


@dataclass
class LoadReport:
    """What `load_weights` did. `mismatched` holds (key, checkpoint shape, model shape)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        """One line per problem, e.g. for a log."""
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.mismatched:
            lines.append(f"skipped {len(self.mismatched)} with other shapes: " + ", ".join(
                f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:5])
                + (" ..." if len(self.mismatched) > 5 else ""))
        if self.missing:
            lines.append(f"{len(self.missing)} missing (left as initialised): {_few(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected (ignored): {_few(self.unexpected)}")
        return "\n".join(lines)


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, skip_mismatched: bool = True) -> LoadReport:
    """Copy the tensors of `state_dict` (detkit keys; see `convert`) into `model`, leniently.

    Keys the model lacks are reported as unexpected, model keys the file lacks as missing; BatchNorm's
    `num_batches_tracked` is dropped where the model has none (FrozenBatchNorm2d). Tensors whose shape differs from
    the model's (e.g. a 91-class `cls_logits` into an 8-class model) are skipped and reported.

    Args:
        model: the module to fill in place.
        state_dict: {name: tensor}.
        skip_mismatched: False raises on a shape mismatch instead of skipping.

    Returns:
        A LoadReport.

    Raises:
        WeightsError: shape mismatches when `skip_mismatched` is False.
    """
    own = model.state_dict()
    report, usable = LoadReport(), {}
    for key, value in state_dict.items():
        if key not in own and key.endswith("num_batches_tracked"):
            continue
        if key in own and own[key].shape != value.shape:
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    if report.mismatched and not skip_mismatched:
        key, stored, own_shape = report.mismatched[0]
        more = len(report.mismatched) - 1
        raise WeightsError(f"the weights do not fit the model: {key} is {stored} in the weights and {own_shape} in "
                           f"the model" + (f"; {more} more tensors differ" if more > 1 else "; 1 more tensor differs" if more else ""))
    result = model.load_state_dict(usable, strict=False)
    skipped = {k for k, _, _ in report.mismatched}
    report.loaded = [k for k in usable if k in own]
    report.missing = [k for k in result.missing_keys if k not in skipped]
    report.unexpected = list(result.unexpected_keys)
    return report


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
