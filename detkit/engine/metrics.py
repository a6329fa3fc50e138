"""Training metrics: a JSON-lines log with TensorBoard scalars, smoothed values for the console, a loss plot."""
from __future__ import annotations

import io
import json
import math
import re
import statistics
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping

from detkit.utils.fileio import write_bytes_atomic

METRICS_FILE = "metrics.jsonl"
_warned_no_tensorboard = False


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file, skipping lines a crash cut off."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def _wait_for_a_later_event_file_name(directory: Path) -> None:
    """TensorBoard reads event files in name order, and a purge only hides the events of files read before it.
    Names start with the creation second, then end in a per-process counter that does not sort numerically
    ("...10" < "...9"): a file opened in the same second as an existing one could be read first. Waiting for the
    next second (at most once per resume or rollback) puts the new file last."""
    stamps = [int(m.group(1)) for f in directory.glob("events.out.tfevents.*")
              if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f.name))]
    newest = max(stamps, default=0)
    while int(time.time()) <= newest < time.time() + 2:  # a file from the future (clock change) is not waited for
        time.sleep(0.05)


class MetricsWriter:
    """Appends `{"iteration": i, **values}` lines to `<output_dir>/metrics.jsonl` and mirrors them to TensorBoard.

    The file is opened in append mode so a resumed run continues it; call `truncate_after(resumed_iteration)`
    first to drop what the interrupted run logged after its last checkpoint.

    Args:
        output_dir: the run folder; created if missing.
        tensorboard: also write event files to `<output_dir>/tensorboard`. Without the tensorboard package this
            warns once and writes the JSON lines only.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        # The event writer opens on the first write, so a resume's truncate_after can still set its purge step.
        self._use_tensorboard = tensorboard
        self._tensorboard = None
        self._purge_step: int | None = None

    def _tensorboard_writer(self):
        global _warned_no_tensorboard
        if self._tensorboard is None and self._use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                if not _warned_no_tensorboard:
                    warnings.warn(f"TensorBoard logging is off: {e}", stacklevel=3)
                    _warned_no_tensorboard = True
                self._use_tensorboard = False
                return None
            if self._purge_step is not None:
                _wait_for_a_later_event_file_name(self.output_dir / "tensorboard")
            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self._purge_step)
        return self._tensorboard

    def write(self, iteration: int, values: Mapping[str, float]) -> None:
        """Log `values` (floats or 0-dim tensors) at `iteration`.

        Non-finite values are left out, of the JSON lines (strict JSON has no NaN) and of TensorBoard alike; COCO's
        undefined metrics (-1) are expected to be left out by the caller (`EvalResult.metrics` does).

        Args:
            iteration: the optimizer step the values belong to.
            values: metric name -> value; `iteration` is not a valid name.
        """
        if "iteration" in values:
            raise ValueError("'iteration' is reserved for the step number; rename the metric")
        values = {key: float(value) for key, value in values.items()}
        values = {key: value for key, value in values.items() if math.isfinite(value)}
        self._file.write(json.dumps({"iteration": int(iteration), **values}) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        tensorboard = self._tensorboard_writer()
        if tensorboard is not None:
            for key, value in values.items():
                tensorboard.add_scalar(key, value, iteration)

    def truncate_after(self, iteration: int) -> None:
        """Drop logged lines with an iteration above `iteration`, rewriting the file atomically.

        Args:
            iteration: the iteration training resumes from; lines up to and including it are kept. TensorBoard
                events after it are purged as well.
        """
        self._file.close()
        kept = [record for record in _read_records(self.path) if record["iteration"] <= iteration]
        write_bytes_atomic("".join(json.dumps(record) + "\n" for record in kept).encode(), self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        # TensorBoard hides the interrupted run's events from the purge step on.
        self._purge_step = iteration + 1
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def close(self) -> None:
        """Flush and close the JSON-lines file and the TensorBoard writer."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot every `loss*` metric against iteration, with the learning rate below when it was logged.

    Args:
        metrics_path: a `metrics.jsonl` written by MetricsWriter.
        out_png: where the PNG goes; written atomically.

    Returns:
        `out_png`, or None when the file holds no loss values.
    """
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = _read_records(Path(metrics_path))
    losses: dict[str, tuple[list[int], list[float]]] = {}
    lrs: tuple[list[int], list[float]] = ([], [])
    for record in records:
        for key, value in record.items():
            if key.startswith("loss") and isinstance(value, (int, float)):
                series = losses.setdefault(key, ([], []))
            elif key == "lr" and isinstance(value, (int, float)):
                series = lrs
            else:
                continue
            series[0].append(record["iteration"])
            series[1].append(value)
    if not losses:
        return None

    fig = Figure(figsize=(8, 5) if lrs[0] else (8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    if lrs[0]:
        loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        loss_ax, lr_ax = fig.subplots(), None
    for key, (its, values) in sorted(losses.items()):
        loss_ax.plot(its, values, label=key, linewidth=1)
    finite = [v for _, values in losses.values() for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the curves
    if lr_ax is not None:
        lr_ax.plot(*lrs, color="tab:gray", linewidth=1)
        lr_ax.set_ylabel("lr")
        lr_ax.grid(True, alpha=0.3)
    (lr_ax or loss_ax).set_xlabel("iteration")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return write_bytes_atomic(buffer.getvalue(), out_png)


class SmoothedValue:
    """Recent values of one metric (median and mean over a window) and the average since the start.

    Args:
        window: how many recent values the median and mean cover.
    """

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        value = float(value)
        self.values.append(value)
        self.total += value
        self.count += 1

    @property
    def latest(self) -> float:
        return self.values[-1] if self.values else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan


class MetricMeter:
    """One SmoothedValue per metric name, for the progress line.

    Args:
        window: the window of every SmoothedValue.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}

    def update(self, values: Mapping[str, float]) -> None:
        """Add one value (float or 0-dim tensor) per name; names seen for the first time get a new meter."""
        for key, value in values.items():
            self.meters.setdefault(key, SmoothedValue(self.window)).update(value)

    def __getitem__(self, key: str) -> SmoothedValue:
        return self.meters[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.meters)

    def medians(self) -> dict[str, float]:
        """Name -> median over the window: what the console shows, robust to a single spike."""
        return {key: meter.median for key, meter in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{key}: {meter.median:.4g} ({meter.global_avg:.4g})" for key, meter in self.meters.items())
