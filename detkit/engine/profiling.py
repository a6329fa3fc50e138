"""How much of a training step is spent outside convolutions and matrix products, from the PyTorch profiler."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch.profiler import ProfilerActivity, profile

# The dense work of a detector: forward and backward convolutions and matrix products. Anything else (norms,
# activations, anchors, matching, losses, the optimiser) is "outside".
CORE_OPS = frozenset({"aten::convolution", "aten::convolution_backward", "aten::addmm", "aten::mm", "aten::bmm",
                      "aten::baddbmm", "aten::linear_backward"})
# Kinds of the remaining ops, tried in this order; an op belongs to the first whose key is in its name.
BUCKETS = (("batch norm", ("batch_norm",)), ("optimizer", ("_foreach",)),
           ("activation", ("relu", "silu", "sigmoid", "threshold")),
           ("memory", ("copy", "fill", "zero", "cat", "stack", "empty", "clone", "contiguous")),
           ("reduction", ("sum", "mean", "amax", "max", "min", "norm")),
           ("elementwise", ("mul", "add", "sub", "div", "pow", "softplus", "exp", "log", "neg", "where", "clamp",
                            "abs", "sqrt")))


@dataclass
class Split:
    """Where a training step's time goes (CPU).

    Attributes:
        step_seconds: median wall time of an unprofiled step.
        profiled_seconds: wall time of the profiled steps, summed.
        core_seconds: time inside the core ops (outermost calls only, so nested ones count once).
        outside: 1 - core / profiled wall time: the measure docs/benchmarks.md reports.
        outside_unprofiled: 1 - core / (steps x step_seconds): the profiler's own overhead taken out.
        buckets: self time of the remaining aten ops by kind, as fractions of the profiled wall time, and
            "unattributed": the rest of `outside`, which no aten op claims (compiled kernels, Python, the
            profiler).
    """

    step_seconds: float
    profiled_seconds: float
    core_seconds: float
    outside: float
    outside_unprofiled: float
    buckets: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        rest = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.buckets.items(), key=lambda kv: -kv[1]))
        return (f"step {self.step_seconds:.2f} s; outside conv/matmul {self.outside:.1%} of the profiled step "
                f"({self.outside_unprofiled:.1%} of the unprofiled one); the rest by kind: {rest}")


def _inside_core(event) -> bool:
    """Whether a core op encloses `event` (a slow conv path calls addmm inside convolution)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in CORE_OPS:
            return True
        parent = parent.cpu_parent
    return False


def _is_core_root(event) -> bool:
    """An outermost core op: counted once, with everything it calls."""
    return event.name in CORE_OPS and not _inside_core(event)


def _bucket(name: str) -> str:
    op = name.split("::")[-1]
    return next((bucket for bucket, keys in BUCKETS if any(k in op for k in keys)), "other")


def op_time_split(step: Callable[[], object], warmup: int = 1, timed: int = 2, active: int = 3) -> Split:
    """Run `step` `warmup` times (untimed: caches, allocator, kernels), `timed` times unprofiled, then `active`
    times under the CPU profiler.

    Args:
        step: one training step (e.g. a `TrainStep` bound to its batches).
        warmup: untimed steps first.
        timed: unprofiled steps; their median is `step_seconds` (at least 1).
        active: profiled steps.
    """
    from .benchmark import measure_loop

    # on the CPU every step has finished when it returns: no synchronisation to wait for
    step_seconds = measure_loop(step, warmup, max(1, timed), sync=lambda: None).median
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(active):
            step()
        wall = time.perf_counter() - start
    events = prof.events()
    core = sum(e.cpu_time_total for e in events if _is_core_root(e)) / 1e6
    buckets: dict[str, float] = {}
    for e in events:
        if e.name.startswith("aten::") and e.name not in CORE_OPS and not _inside_core(e):
            bucket = _bucket(e.name)
            buckets[bucket] = buckets.get(bucket, 0.0) + e.self_cpu_time_total / 1e6 / wall
    # "unattributed": what no aten op outside the core claims: compiled (fused) kernels, Python and the
    # profiler's own work
    buckets["unattributed"] = max(0.0, 1 - core / wall - sum(buckets.values()))
    return Split(step_seconds, wall, core, 1 - core / wall, 1 - core / (active * step_seconds), buckets)
