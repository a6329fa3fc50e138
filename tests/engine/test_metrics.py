import json
import sys
import warnings

import pytest
import torch

from detkit.engine import MetricMeter, MetricsWriter, SmoothedValue, plot_loss_curve
from detkit.engine import metrics as metrics_module


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_appends_json_lines_and_resumes_the_file(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, {"loss": 1.5, "lr": 0.01})
        writer.write(20, {"loss": torch.tensor(0.25), "loss_cls": 0.125})
        # flushed line by line: readable before close
        assert _lines(tmp_path / "metrics.jsonl")[-1] == {"iteration": 20, "loss": 0.25, "loss_cls": 0.125}
        with pytest.raises(ValueError, match="reserved"):
            writer.write(40, {"iteration": 3.0})
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(40, {"loss": 0.5})
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"iteration": 0, "loss": 1.5, "lr": 0.01},
        {"iteration": 20, "loss": 0.25, "loss_cls": 0.125},
        {"iteration": 40, "loss": 0.5},
    ]


def test_truncate_after_drops_later_and_cut_off_lines(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for iteration in (10, 20, 30, 40):
            writer.write(iteration, {"loss": iteration / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 50, "lo')  # the line a crash interrupted
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.truncate_after(20)
        writer.write(30, {"loss": 9.0})
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"iteration": 10, "loss": 1.0}, {"iteration": 20, "loss": 2.0}, {"iteration": 30, "loss": 9.0}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_tensorboard_events_are_written_and_purged_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with MetricsWriter(tmp_path) as writer:
        for iteration in (10, 20, 30):
            writer.write(iteration, {"loss": iteration / 10})
    with MetricsWriter(tmp_path) as writer:
        writer.truncate_after(20)
        writer.write(30, {"loss": 9.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 1.0), (20, 2.0), (30, 9.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_missing_tensorboard_warns_once_and_keeps_logging(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(metrics_module, "_warned_no_tensorboard", False)
    with MetricsWriter(tmp_path / "a") as writer:
        with pytest.warns(UserWarning, match="TensorBoard logging is off"):
            writer.write(3, {"loss": 0.5})
        writer.write(4, {"loss": 0.25})
    assert _lines(tmp_path / "a" / "metrics.jsonl") == [{"iteration": 3, "loss": 0.5}, {"iteration": 4, "loss": 0.25}]
    with warnings.catch_warnings(), MetricsWriter(tmp_path / "b") as writer:
        warnings.simplefilter("error")  # the second writer stays quiet
        writer.write(0, {"loss": 1.0})


def test_plot_loss_curve_writes_a_png(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for iteration in range(0, 100, 10):
            writer.write(iteration, {"loss": 2.0 / (iteration + 1), "loss_box": 0.5, "lr": 0.01, "time": 0.1})
    out = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_plot_loss_curve_without_losses_returns_none(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, {"lr": 0.01})
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_smoothed_value_window_and_global_average():
    value = SmoothedValue(window=20)
    for v in [10.0] * 10 + [1.0] * 19 + [100.0]:
        value.update(v)
    # window: nineteen 1s and one spike of 100
    assert value.latest == 100.0
    assert value.median == 1.0
    assert value.avg == pytest.approx((19 + 100) / 20)
    assert value.global_avg == pytest.approx((100 + 19 + 100) / 30)


def test_metric_meter_tracks_each_key():
    meter = MetricMeter(window=3)
    for i in range(5):
        meter.update({"loss": float(i), "lr": torch.tensor(0.5)})
    assert list(meter) == ["loss", "lr"]
    assert meter.medians() == {"loss": 3.0, "lr": 0.5}
    assert meter["loss"].global_avg == pytest.approx(2.0)
    assert str(meter) == "loss: 3 (2)  lr: 0.5 (0.5)"
