"""`torch.compile` for the dense parts of a detector (`runtime.compile`).

The trunk, the neck and the dense heads (RetinaNet's towers, the RPN's convolution) see one padded batch shape
per step and are where fusion pays: batch norm, activation and residual passes fold into fewer kernels around
the convolutions. RetinaNet's losses over every anchor (focal and box loss, fixed shapes per input size) are
compiled too: their elementwise passes over (N, A, K) logits fuse into a few kernels. The rest of a detector
(matching, sampling, NMS, the RoI heads with their varying number of regions) stays eager. Each module is
compiled in place with `nn.Module.compile`, so parameter names, state dicts and checkpoints are those of the
eager model (RetinaNet's loss module has no state).
"""

from __future__ import annotations

import logging

from torch import nn

from ..config.load import ConfigError

logger = logging.getLogger(__name__)

# attribute paths of the parts worth compiling, where a detector has them
DENSE_PARTS = ("backbone", "neck", "head", "loss", "rpn.head")


def dense_parts(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} for the parts of `model` in `DENSE_PARTS` that exist."""
    parts = {}
    for path in DENSE_PARTS:
        module: object = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.Module):
            parts[path] = module
    return parts


def check_compile_settings(runtime) -> None:
    """A clear error for a backend torch does not know, or a mode only inductor takes."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if runtime.compile_backend not in known:
        raise ConfigError(f"runtime.compile_backend {runtime.compile_backend!r} is not a torch.compile backend; "
                          f"known: {', '.join(sorted(known))}")
    if runtime.compile_mode != "default" and runtime.compile_backend != "inductor":
        raise ConfigError(f"runtime.compile_mode {runtime.compile_mode!r} is an inductor mode; with backend "
                          f"{runtime.compile_backend!r} leave it at 'default'")


def compile_model(model: nn.Module, runtime) -> list[str]:
    """Compile `model`'s dense parts in place when `runtime.compile` is set.

    Shapes are marked dynamic only after a second input shape appears (`dynamic=None`), so a fixed training or
    test size compiles once and multi-scale training does not recompile at every new size.

    Returns:
        the compiled parts' paths (empty when compilation is off).
    """
    if not runtime.compile:
        return []
    check_compile_settings(runtime)
    parts = dense_parts(model)
    options = dict(backend=runtime.compile_backend, dynamic=None,
                   mode=None if runtime.compile_mode == "default" else runtime.compile_mode)
    for module in parts.values():
        module.compile(**options)
    logger.info("torch.compile (backend %s, mode %s): %s", runtime.compile_backend, runtime.compile_mode,
                ", ".join(parts) or "no dense part found")
    return list(parts)
