"""benchmarks/vs_torchvision.py where it cannot measure: the skips, and its pure parts with fakes."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_torchvision.py"
DOC = ROOT / "docs" / "benchmarks.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("vs_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


vs = _load_script()


def _run(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _doc_state() -> tuple[bytes, int]:
    return DOC.read_bytes(), DOC.stat().st_mtime_ns


def _comparison(model: str, mode: str, detkit: float, torchvision: float, **kwargs) -> "vs.Comparison":
    return vs.Comparison(model, mode, 32 if mode == "train" else 1, (640, 640), [detkit, detkit * 1.1, detkit * 0.9],
                         [torchvision] * 3, **kwargs)


# --- the skips ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is importable here")
def test_without_torchvision_it_says_so_exits_0_and_writes_nothing():
    before, records = _doc_state(), sorted(vs.RECORDS.glob("*"))
    result = _run("--models", "retinanet", "--modes", "train", "--allow-cpu")
    assert result.returncode == 0, result.stderr
    assert "torchvision is not importable here; this script runs on the GPU machine" in result.stdout
    assert _doc_state() == before and sorted(vs.RECORDS.glob("*")) == records


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_exits_0_and_writes_nothing(tmp_path):
    (tmp_path / "torchvision").mkdir()  # an importable stand-in: the CUDA check comes next
    (tmp_path / "torchvision" / "__init__.py").write_text("__version__ = '0.0-stand-in'\n")
    before = _doc_state()
    result = _run(pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device here; this script runs on the GPU machine" in result.stdout
    assert _doc_state() == before


# --- targets, ratios, the section --------------------------------------------------------------------------------

def test_every_issue_target_is_listed_once():
    assert {(t.model, t.mode) for t in vs.TARGETS} == {(m, mode) for m in vs.MODELS for mode in vs.MODES}
    assert len(vs.TARGETS) == 6
    retina = next(t for t in vs.TARGETS if (t.model, t.mode) == ("retinanet", "train"))
    assert (retina.min_ratio, retina.min_img_per_s, retina.precision, retina.size) == (2.0, 400.0, "bf16", 640)
    assert retina.label() == "RetinaNet R50-FPN training, 640x640, bf16: >= 400 img/s and >= 2x torchvision"
    assert all(t.min_ratio == 1.5 for t in vs.TARGETS if t.mode == "train" and t.model != "retinanet")
    assert all(t.min_ratio == 1.0 for t in vs.TARGETS if t.mode == "infer")


def test_judge_passes_fails_and_refuses_other_settings():
    retina = vs.TARGETS[0]
    settings = {"precision": "bf16", "size": 640, "device_type": "cuda"}
    assert vs.judge(retina, _comparison("retinanet", "train", 450.0, 200.0), **settings) == "pass"
    assert vs.judge(retina, _comparison("retinanet", "train", 450.0, 300.0), **settings) == "fail: 1.50x < 2x"
    assert vs.judge(retina, _comparison("retinanet", "train", 380.0, 100.0), **settings) == \
        "fail: 380.0 img/s < 400"
    assert vs.judge(retina, _comparison("retinanet", "train", 450.0, 200.0), **{**settings, "precision": "fp32"}) \
        .startswith("not comparable: the target is at bf16")
    assert vs.judge(retina, _comparison("retinanet", "train", 450.0, 200.0), **{**settings, "size": 512}) \
        .startswith("not comparable: the target is at 640x640")
    assert vs.judge(retina, _comparison("retinanet", "train", 450.0, 200.0), **{**settings, "device_type": "cpu"}) \
        == "not comparable: the targets are for a GPU"
    faster_infer = next(t for t in vs.TARGETS if (t.model, t.mode) == ("faster", "infer"))
    # the medians decide: detkit's rounds 20, 22, 18 against torchvision's 20
    assert vs.judge(faster_infer, _comparison("faster", "infer", 20.0, 20.0), **settings) == "pass"
    assert vs.judge(faster_infer, _comparison("faster", "infer", 19.0, 20.0), **settings) == "fail: 0.95x < 1x"


def test_rows_give_medians_memory_train_step_ratio_and_result():
    comparisons = [_comparison("retinanet", "train", 500.0, 200.0, train_step=[480.0, 470.0, 490.0],
                               peak_memory={"detkit": 3 << 30, "torchvision": 5 << 30}),
                   _comparison("mask", "infer", 10.0, 12.5)]
    rows = vs.target_rows(comparisons, precision="bf16", size=640, device_type="cuda")
    assert len(rows) == len(vs.TARGETS)
    assert rows[0] == ("| RetinaNet R50-FPN training, 640x640, bf16: >= 400 img/s and >= 2x torchvision "
                       "| 500.0 img/s, 3.0 GiB (TrainStep 480.0) | 200.0 img/s, 5.0 GiB | 2.50x | pass |")
    assert rows[-1] == ("| Mask R-CNN R50-FPN inference, batch 1, 800x1333: >= 1x torchvision | 10.0 fps | 12.5 fps "
                        "| 0.80x | fail: 0.80x < 1x |")
    assert all(vs.NOT_RUN in row for row in rows[1:-1])


def test_the_section_before_any_gpu_run_marks_every_measured_cell():
    text = vs.render_section(None, command=vs.DEFAULT_COMMAND, machine=None, batch=32, size=640, precision="bf16",
                             rounds=3)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "target" not in line]
    assert len(rows) == len(vs.TARGETS)
    for row, target in zip(rows, vs.TARGETS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [target.label(), vs.NOT_LENT, vs.NOT_LENT, vs.NOT_LENT, "-"]
    assert f"    {vs.DEFAULT_COMMAND}\n" in text


def test_the_committed_section_is_the_one_before_any_gpu_run():
    """docs/benchmarks.md's gpu-targets block is what the renderer gives before a GPU run (a GPU run replaces it)."""
    match = re.search(r"<!-- gpu-targets:begin -->\n(.*?)\n<!-- gpu-targets:end -->", DOC.read_text(), re.S)
    assert match, "docs/benchmarks.md has no gpu-targets section"
    expected = vs.render_section(None, command=vs.DEFAULT_COMMAND, machine=None, batch=32, size=640,
                                 precision="bf16", rounds=3)
    assert match[1] == expected.rstrip()


def test_write_doc_section_replaces_only_its_block(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# title\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    vs.write_doc_section("first", out)
    vs.write_doc_section("second", out)
    assert out.read_text() == ("# title\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n\n"
                               "<!-- gpu-targets:begin -->\nsecond\n<!-- gpu-targets:end -->\n")
    assert vs.common.DOC == ROOT / "docs" / "benchmarks.md"


def test_rows_a_run_skips_come_from_the_record_of_a_run_with_the_same_settings():
    settings = {"device": "NVIDIA H200", "batch": 32, "size": 640, "precision": "bf16"}
    earlier = {"settings": settings, "results": [
        json.loads(json.dumps(_comparison(m, "train", 300.0, 100.0, peak_memory={"detkit": 1}).to_dict()))
        for m in ("retinanet", "faster")]}
    now = [_comparison("faster", "train", 200.0, 100.0)]
    merged = vs.with_earlier(now, earlier, settings)
    assert [(c.model, c.detkit[0]) for c in merged] == [("faster", 200.0), ("retinanet", 300.0)]
    assert merged[1] == _comparison("retinanet", "train", 300.0, 100.0, peak_memory={"detkit": 1})
    assert vs.with_earlier(now, earlier, {**settings, "batch": 16}) == now
    assert vs.with_earlier(now, None, settings) == now


# --- the same-architecture check ---------------------------------------------------------------------------------

def test_parameter_check_aborts_with_both_counts():
    detkit = vs.ParamCount(41_756_311, 41_533_911)
    vs.check_same_architecture("faster", detkit, vs.ParamCount(41_756_311, 41_533_911))
    with pytest.raises(vs.ArchitectureMismatch) as info:
        vs.check_same_architecture("faster", detkit, vs.ParamCount(41_756_311, 41_756_311),
                                   vs.ParamCount(41_755_286, 41_755_286))
    message = str(info.value)
    assert "41,533,911 trainable" in message and "41,756,311 trainable" in message and "41,755,286" in message
    assert isinstance(info.value, SystemExit)


def test_torchvision_counts_in_detkits_layout_keep_the_frozen_layers():
    """torchvision-named fakes through the conversion the script uses: R-CNN's classifier gains detkit's unused
    class-0 row (1024 weights and a bias), and frozen tensors stay frozen."""
    from detkit.modeling.weights import convert

    named = {"backbone.body.conv1.weight": torch.nn.Parameter(torch.zeros(64, 3, 7, 7), requires_grad=False),
             "roi_heads.box_predictor.cls_score.weight": torch.nn.Parameter(torch.zeros(91, 1024)),
             "roi_heads.box_predictor.cls_score.bias": torch.nn.Parameter(torch.zeros(91)),
             "roi_heads.box_predictor.bbox_pred.weight": torch.nn.Parameter(torch.zeros(364, 1024))}
    raw = vs.count_parameters(named.items())
    converted = vs.count_parameters(convert(named).items())
    assert raw == vs.ParamCount(9408 + 91 * 1025 + 364 * 1024, 91 * 1025 + 364 * 1024)
    assert converted == vs.ParamCount(raw.total + 1025, raw.trainable + 1025)


# --- inputs and the alternation ----------------------------------------------------------------------------------

def test_both_sides_get_the_same_images_labels_and_masks():
    from detkit.data.loader import Batch, Targets

    images = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    square = [np.array([1, 1, 5, 1, 5, 5, 1, 5], np.float32)]
    targets = [Targets(torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]), torch.zeros(0, 4), [square]),
               Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), [])]
    batch = vs.prepare_batch(Batch(images, torch.tensor([[8, 12], [6, 9]]), targets, [None, None]), bitmaps=True)
    bitmap = batch.targets[0].masks[0]
    assert bitmap.shape == (8, 12) and bitmap.dtype == np.uint8
    assert bitmap[1:6, 1:6].all() and bitmap.sum() == 25  # PIL fills the outline too
    assert batch.targets[0].labels.tolist() == [1]  # category ids: torchvision's 0 is background
    tv_images, tv_targets = vs.torchvision_inputs(batch, torch.device("cpu"), train=True)
    assert [tuple(x.shape) for x in tv_images] == [(3, 8, 12), (3, 6, 9)]
    torch.testing.assert_close(tv_images[1], images[1, :, :6, :9].float() / 255)
    assert tv_targets[0]["labels"].tolist() == [1] and tv_targets[0]["masks"].shape == (1, 8, 12)
    assert tv_targets[1]["masks"].shape == (0, 6, 9) and tv_targets[1]["boxes"].shape == (0, 4)
    assert vs.torchvision_inputs(batch, torch.device("cpu"), train=False)[1] is None


def test_alternate_interleaves_the_sides_and_keeps_each_last_peak():
    calls = []

    def window(side, rates, peaks):
        def run():
            calls.append(side)
            return rates.pop(0), peaks.pop(0)
        return run

    rates, peaks = vs.alternate({"detkit": window("detkit", [10.0, 12.0, 11.0], [5, 7, 6]),
                                 "torchvision": window("torchvision", [5.0, 6.0, 4.0], [None] * 3)}, rounds=3)
    assert calls == ["detkit", "torchvision"] * 3
    assert rates == {"detkit": [10.0, 12.0, 11.0], "torchvision": [5.0, 6.0, 4.0]}
    assert peaks == {"detkit": 6}  # the last round's: the first one also allocated the optimiser state
    assert vs.Comparison("retinanet", "train", 2, (64, 64), rates["detkit"], rates["torchvision"]).ratio == 11 / 5


def test_the_detkit_parts_it_calls_exist():
    """Only the GPU machine runs the comparison: catch a renamed helper or config key here."""
    from detkit.engine import benchmark, environment

    for name in ("build_train_step", "synthetic_batches", "with_size", "measure_loop", "CudaEvents", "device_sync",
                 "DEFAULT_ITERS", "BenchmarkOptions", "_iters"):
        assert hasattr(benchmark, name), name
    assert hasattr(environment, "environment") and hasattr(environment, "device_slug")
    assert {("cuda", "train"), ("cuda", "inference")} <= set(benchmark.DEFAULT_ITERS)
    for model in vs.MODELS:
        cfg = vs.detkit_config(model, "bf16", ["runtime.channels_last=true"], size=640)
        assert (cfg.runtime.amp, cfg.runtime.channels_last, cfg.model.num_classes) == ("bf16", True, 91)
        assert cfg.data.train_transform.short_sizes == (640,) and cfg.data.train_transform.max_size == 640
        assert cfg.model.backbone.norm == "FrozenBN" and cfg.model.backbone.freeze_at == 2
    assert vs.detkit_config("mask", "fp32", []).model.rpn.post_nms_topk_train == 2000


def test_a_window_peak_counts_only_what_the_window_added():
    # the other side's resident model (here 6 GiB already allocated) is not charged to this window
    assert vs.window_peak(peak=9 * 2**30, at_start=6 * 2**30) == 3 * 2**30
    assert vs.window_peak(peak=5, at_start=5) == 0 and vs.window_peak(peak=4, at_start=5) == 0
