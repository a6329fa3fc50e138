"""Loading third-party weights safely: read files without executing code, rename torchvision keys, load leniently.

Typical use::

    state_dict = convert(read_state_dict("retinanet_resnet50_fpn_coco-eeacb38b.pth"))
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

_CONTAINER_KEYS = ("model", "state_dict", "model_state")
_BN_STATE = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_KEY = re.compile(rf"conv1\.weight|bn1\.{_BN_STATE}|layer\d+\.\d+\.(?:conv\d\.weight|bn\d\.{_BN_STATE}"
                         rf"|downsample\.0\.weight|downsample\.1\.{_BN_STATE})")
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
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise WeightsError(f"{path} contains Python objects that detkit will not execute (loading them could run "
                               "arbitrary code); convert the weights to .safetensors with a trusted tool") from None
        raise WeightsError(f"{path} is not a readable weights file: {_first_line(e)}") from None
    except Exception as e:  # zip, EOF and safetensors header errors all mean a damaged file
        raise WeightsError(f"{path} is corrupt or truncated ({type(e).__name__}: {_first_line(e)})") from None


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
_RETINANET_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"backbone\.body\.(.+)"), lambda m: f"backbone.{m[1]}"),
    (re.compile(r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)"),
     lambda m: f"neck.lateral_convs.{m[1]}.{m[2]}"),
    (re.compile(r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)"),
     lambda m: f"neck.output_convs.{m[1]}.{m[2]}"),
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
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = next(((m, rename) for pattern, rename in _RETINANET_RULES if (m := pattern.fullmatch(key))), None)
        if match is None:
            unknown.append(key)
            continue
        new_key = match[1](match[0])
        if new_key in out:
            raise WeightsError(f"two torchvision keys map to {new_key}; is the file mixing naming generations?")
        out[new_key] = value
    if unknown:
        raise WeightsError(f"not a torchvision RetinaNet state dict: unknown keys {_few(unknown)}")
    return out


# state kept on the detector itself rather than on a part (RetinaNet's loss-normaliser EMA)
DETECTOR_BUFFERS = ("loss_normalizer",)


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Name the key layout of a state dict: "torchvision_retinanet", "torchvision_resnet" or "detkit".

    A bare ImageNet ResNet without `fc` has detkit's own ResNet names, so it reads as "detkit" (nothing to rename).

    Raises:
        WeightsError: keys that fit none of them.
    """
    keys = list(state_dict)
    if any(k.startswith(("backbone.body.", "backbone.fpn.", "head.classification_head.", "head.regression_head."))
           for k in keys):
        return "torchvision_retinanet"
    if "fc.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        return "torchvision_resnet"
    if keys and all(k.startswith(("backbone.", "neck.", "head.")) or k in DETECTOR_BUFFERS or _RESNET_KEY.fullmatch(k)
                    for k in keys):
        return "detkit"
    raise WeightsError(f"unrecognised state dict layout (first keys {_few(keys)})")


def convert(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout (see `detect_format`) -> detkit keys."""
    fmt = detect_format(state_dict)
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
        raise WeightsError("shapes differ from the model's: " + ", ".join(
            f"{k} {a} vs {b}" for k, a, b in report.mismatched[:5]))
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
