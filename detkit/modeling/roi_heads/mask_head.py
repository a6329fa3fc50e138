"""Mask R-CNN's mask branch: the head, the per-class logit selection and the loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..norm import make_norm


class MaskRCNNHead(nn.Module):
    """`num_convs` 3x3 convs (ReLU) -> 2x2 stride-2 transposed conv (ReLU) -> 1x1 conv to per-class logits.

    FPN: 4 convs of 256 on 14x14 pooled features -> 28x28 masks. C4: no convs, on the 7x7 res5 map of the box
    head -> 14x14 masks. `norm` ("" for none) puts a norm before every ReLU, the deconv's included (SpineNet's TF
    Mask R-CNN), with `norm_momentum` (PyTorch's convention) and `norm_eps`.
    """

    def __init__(self, in_channels: int, num_classes: int, *, num_convs: int = 4, conv_dim: int = 256,
                 class_agnostic: bool = False, norm: str = "", norm_momentum: float = 0.1, norm_eps: float = 1e-5):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            layers.append(nn.Conv2d(c, conv_dim, 3, padding=1))
            if norm:
                layers.append(make_norm(norm, conv_dim, momentum=norm_momentum, eps=norm_eps))
            layers.append(nn.ReLU(inplace=True))
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.deconv_norm = make_norm(norm, conv_dim, momentum=norm_momentum, eps=norm_eps) if norm else None
        self.predictor = nn.Conv2d(conv_dim, 1 if class_agnostic else num_classes, 1)
        for m in [*self.convs, self.deconv]:  # detectron2's c2_msra_fill
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, r, r) RoI features -> (R, K or 1, 2r, 2r) mask logits."""
        x = self.deconv(self.convs(x))
        return self.predictor(torch.relu(x if self.deconv_norm is None else self.deconv_norm(x)))


def select_class_masks(logits: Tensor, classes: Tensor) -> Tensor:
    """(R, K, M, M) per-class logits (or (R, 1, M, M) class-agnostic) and (R,) classes -> (R, M, M)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    r, _, m, _ = logits.shape
    # (R,) -> (R, 1, M, M) index along the class dim
    return logits.gather(1, classes.view(r, 1, 1, 1).expand(r, 1, m, m)).squeeze(1)


def mask_rcnn_loss(logits: Tensor, targets: Tensor, foreground: Tensor) -> Tensor:
    """Per-pixel sigmoid BCE of the ground-truth class's mask, averaged over all pixels of foreground RoIs.

    Args:
        logits: (R, M, M) the ground-truth class's logits; targets: (R, M, M) 0/1; foreground: (R,) bool (other
            rows are padding and count for nothing).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    count = foreground.sum().clamp(min=1) * logits.shape[-1] * logits.shape[-2]
    # background rows weigh 0; a batch without foreground gives 0 with gradients still defined
    return (bce * foreground[:, None, None]).sum() / count
