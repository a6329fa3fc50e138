"""`detkit benchmark`: the timing, memory and sweep logic with fakes, then real runs of the demo configs at 64 px."""
import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from detkit.cli import main, shipped_config
from detkit.config import Config, load_config
from detkit.engine import benchmark, environment
from detkit.engine.benchmark import (BenchmarkOptions, RssMemory, Timing, fit_train_batch, inference_sweep,
                                     measure_loop, run_benchmark, synthetic_batches, with_size)
from detkit.engine.environment import device_slug, git_commit
from detkit.engine.inference import resolve_amp
from detkit.engine.flops import input_size
from detkit.engine.zoo import GIB, config_hash, describe

CONFIGS = sorted(Path(shipped_config("")).glob("*.yaml"))


def _config(name: str, *overrides: str) -> Config:
    return load_config(Config, shipped_config(name), list(overrides))


@pytest.fixture(autouse=True)
def _no_git_process(monkeypatch):
    # the record's dirty flag runs `git status`; the tests leave the checkout alone
    monkeypatch.setattr(environment, "git_dirty", lambda root: None)


# --- fakes ---------------------------------------------------------------------------------------------------------

def test_measure_loop_excludes_warmup_and_syncs_only_at_the_window_edges():
    now = [0.0]
    durations = iter([5.0, 4.0, 1.0, 2.0, 3.0])  # two slow warm-up steps, then the timed ones
    events = []

    def step():
        now[0] += next(durations)
        events.append("step")

    timing = measure_loop(step, warmup=2, iters=3, sync=lambda: events.append(("sync", now[0])),
                          clock=lambda: now[0], after_warmup=lambda: events.append("after_warmup"))
    assert events == ["step", "step", ("sync", 9.0), "after_warmup", "step", "step", "step", ("sync", 15.0)]
    assert (timing.warmup, timing.iters, timing.seconds) == (2, 3, 6.0)
    assert timing.per_iter == [1.0, 2.0, 3.0] and timing.per_step == 2.0
    assert (timing.median, timing.p90) == (2.0, 3.0)
    with pytest.raises(ValueError):
        measure_loop(step, warmup=0, iters=0, sync=lambda: None)


def test_unsteady_flag():
    assert Timing(0, 4, 5.0, [1.0, 1.0, 1.5, 1.5]).unsteady is True
    assert Timing(0, 4, 4.1, [1.0, 1.05, 1.0, 1.05]).unsteady is False
    assert Timing(0, 1, 1.0, [1.0]).unsteady is None


def test_fit_train_batch_reduces_to_the_largest_batch_that_fits():
    asked = []

    def probe(batch):  # 1 GiB of model and runtime, 2 GiB per image
        asked.append(batch)
        return (1 + 2 * batch) * GIB

    batch, reason, info = fit_train_batch(16, probe, available=20 * GIB)  # 16 GiB usable: (16 - 1) // 2 = 7
    assert asked == [1, 2] and batch == 7
    assert "data.batch_size 16" in reason and "batch 7 fits" in reason
    assert info["per_image"] == 2 * GIB and info["predicted"] == 33 * GIB
    assert fit_train_batch(4, probe, available=20 * GIB)[:2] == (4, None)  # 9 GiB fits
    assert fit_train_batch(16, probe, available=2 * GIB)[0] == 1  # never below one image


def test_inference_sweep_stops_at_oom_and_picks_the_best():
    def timed(fps_by_batch):
        def run_at(batch):
            fps = fps_by_batch[batch]
            if fps is None:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return Timing(0, 2, 2 * batch / fps, [batch / fps] * 2)
        return run_at

    freed = []
    per_batch, best = inference_sweep(timed({1: 10.0, 2: 18.0, 4: None, 8: 40.0}), [1, 2, 4, 8],
                                      on_oom=lambda: freed.append(True))
    assert [e["batch"] for e in per_batch] == [1, 2, 4] and per_batch[-1] == {"batch": 4, "error": "oom"}
    assert best["batch"] == 2 and best["fps"] == pytest.approx(18.0) and freed == [True]
    # two sizes in a row slower than the best end the sweep
    per_batch, best = inference_sweep(timed({1: 10.0, 2: 20.0, 4: 15.0, 8: 12.0, 16: 30.0}), [1, 2, 4, 8, 16])
    assert [e["batch"] for e in per_batch] == [1, 2, 4, 8] and best["batch"] == 2
    assert per_batch[0]["fps"] == pytest.approx(10.0) and per_batch[0]["iters"] == 2


# --- probes --------------------------------------------------------------------------------------------------------

def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_rss_sees_an_allocation_in_the_phase():
    before = torch.ones(100 * (1 << 20))  # 400 MB before the phase, freed: must not count
    del before
    memory = RssMemory()
    memory.start()
    inside = torch.ones(50 * (1 << 20))  # 200 MB, touched
    del inside
    result = memory.result()
    assert result["kind"] == "rss" and result["method"] == "clear_refs"
    grown = result["peak_rss"] - result["baseline_rss"]
    assert 180e6 < grown < 350e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_probe_reads_peaks():
    device = torch.device("cuda")
    memory = benchmark.CudaMemory(device)
    memory.start()
    warm = torch.ones(64 << 20, device=device)  # 256 MB during the warm-up only
    del warm
    memory.steady()
    steady = torch.ones(16 << 20, device=device)  # 64 MB in the steady state
    del steady
    result = memory.result()
    assert result["peak_allocated"] >= 256e6 and 64e6 <= result["steady_allocated"] < 256e6
    assert result["peak_reserved"] >= result["peak_allocated"]


# --- plans, batches, labels ----------------------------------------------------------------------------------------

def test_synthetic_batches_have_the_loaders_sizes():
    jitter = with_size(_config("retinanet-resnet50-fpn-640-3x.yaml"), (96, 96))
    batches = synthetic_batches(jitter, 3, 2, train=True, num_classes=91)
    assert [tuple(b.images.shape) for b in batches] == [(3, 3, 96, 96)] * 2  # scale_jitter pads to output_size
    assert all(b.images.dtype == torch.uint8 and (b.image_sizes <= 96).all() for b in batches)

    masks = with_size(_config("mask-rcnn-resnet18-fpn-demo.yaml"), (64, 96))
    batches = synthetic_batches(masks, 2, 4, train=True, num_classes=3)
    for batch in batches:
        h, w = batch.images.shape[-2:]
        assert h % 32 == 0 and w % 32 == 0 and (h, w) == (-(-max(batch.image_sizes[:, 0]) // 32) * 32,
                                                            -(-max(batch.image_sizes[:, 1]) // 32) * 32)
        for short, long in batch.image_sizes.sort(dim=1).values.tolist():  # short side 64 unless the long hits 96
            assert short <= 64 and long <= 96 and (short == 64 or long == 96)
        landscape = batch.image_sizes[:, 1] >= batch.image_sizes[:, 0]
        assert landscape.all() or not landscape.any()  # data.aspect_ratio_grouping, as the loader groups
        for t in batch.targets:
            assert len(t.masks) == len(t.boxes) == len(t.labels) and (t.labels < 3).all()
            assert all(p.dtype.name == "float32" and p.size % 2 == 0 for polygons in t.masks for p in polygons)
    assert sum(len(t.boxes) for b in batches for t in b.targets) >= 10
    inference = synthetic_batches(masks, 2, 1, train=False, num_classes=3, exact_size=(64, 96))[0]
    assert inference.image_sizes.tolist() == [[64, 96]] * 2 and tuple(inference.images.shape[-2:]) == (64, 96)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_has_a_benchmark_plan(path):
    cfg = load_config(Config, path, [])
    labels = describe(cfg, path.stem)
    assert labels["backbone"] and labels["schedule"]
    digest = config_hash(cfg)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and config_hash(load_config(Config, path, [])) == digest
    assert config_hash(load_config(Config, path, ["solver.base_lr=0.123"])) != digest
    assert cfg.data.batch_size >= 1
    (h, w), padded, _ = input_size(cfg.data.test_transform)
    assert min(h, w) >= 128 and padded[0] >= h and padded[1] >= w
    small = with_size(cfg, (64, 96))
    assert input_size(small.data.test_transform)[1] in ((64, 96), (96, 96))  # resize_short / scale_jitter
    assert small.data.batch_size == cfg.data.batch_size and config_hash(cfg) == digest  # cfg itself unchanged


def test_device_slug_and_git_commit(tmp_path, monkeypatch):
    assert device_slug({"type": "cuda", "name": "NVIDIA H200", "cpu_count": 16}) == "cuda-nvidia-h200"
    cpu = {"type": "cpu", "name": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu_count": 2}
    assert device_slug(cpu) == "cpu-2c-intel-xeon-platinum-8480"
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        expected = head.stdout.strip() if head.returncode == 0 else None  # None outside a checkout
    except OSError:  # no git
        expected = None
    assert git_commit(root) == expected
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path: no commit, no error
    assert git_commit(root) is None


# --- real runs at 64 px --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    """`detkit benchmark` of the R18 RetinaNet demo at 64 px with random weights and AP on 8 synthetic images."""
    from detkit.modeling.build import build_model

    tmp = tmp_path_factory.mktemp("benchmark")
    cfg_path = str(shipped_config("retinanet-resnet18-fpn-demo.yaml"))
    torch.manual_seed(0)
    weights = tmp / "random.pth"
    torch.save(build_model(_config("retinanet-resnet18-fpn-demo.yaml").model, 8).state_dict(), weights)
    out = tmp / "record.json"
    argv = ["benchmark", cfg_path, f"data.val.annotations={synth_root}/annotations/instances_val.json",
            f"data.val.images={synth_root}/val", "data.num_workers=0", "--size", "64", "64", "--train-batch", "2",
            "--iters", "1", "--warmup", "0", "--batch-sizes", "1", "2", "--device", "cpu", "--weights",
            str(weights), "--eval-images", "8", "--json", str(out)]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(environment, "git_dirty", lambda root: None)
        code = main(argv)
    return {"code": code, "stdout": stdout.getvalue(), "path": out, "weights": weights}


def _typed(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def test_record_schema_and_row_for_a_tiny_retinanet(tiny_run):
    record = json.loads(tiny_run["path"].read_text())
    number = (int, float)
    assert record["schema"] == 1 and record["command"].startswith("detkit benchmark ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["timestamp"])
    commit = record["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert record["git"]["dirty"] is None  # not asked here (see _no_git_process)
    assert set(record["versions"]) == {"detkit", "torch", "cuda", "cudnn", "python", "numpy", "platform"}
    device = record["device"]
    assert device["type"] == "cpu" and _typed(device["name"], str) and device["memory_bytes"] > 0
    assert device["cpu_count"] >= 1 and device["torch_threads"] >= 1
    config = record["config"]
    assert config["name"] == "retinanet-resnet18-fpn-demo" and config["arch"] == "retinanet"
    assert config["backbone"] == "R-18-FPN" and config["schedule"] == "16 ep" and config["num_classes"] == 8
    assert len(config["overrides"]) == 3 and re.fullmatch(r"[0-9a-f]{64}", config["sha256"])
    cfg = load_config(Config, config["path"], config["overrides"])
    assert config["sha256"] == config_hash(cfg)  # the config's own hash, not the --size one
    amp = resolve_amp("auto", torch.device("cpu"))  # the demo config's amp: auto, as resolved on this machine
    assert record["settings"] == {"amp": amp, "channels_last": True, "compile": False, "fold_bn": True,
                                  "input": "synthetic", "init": "random", "inference_weights": True, "seed": 0,
                                  "size": [64, 64]}
    assert record["size"]["padded_size"] == [64, 64] and record["size"]["params"] > 1e6

    train = record["train"]
    assert (train["batch"], train["config_batch"], train["config_accumulate"]) == (2, 8, 1)
    assert train["batch_reason"] == "--train-batch" and (train["warmup"], train["iters"]) == (0, 1)
    assert train["image_sizes"] == [[64, 64]]
    for key in ("s_per_iter", "s_per_iter_median", "s_per_iter_p90", "img_per_s"):
        assert _typed(train[key], number) and train[key] > 0
    assert train["img_per_s"] == pytest.approx(2 / train["s_per_iter"])
    assert train["unsteady"] is None and train["bad_steps"] == 0 and train["compile_seconds"] is None
    memory = train["memory"]
    assert memory["kind"] == "rss" and memory["method"] in ("clear_refs", "ru_maxrss")
    assert memory["peak_rss"] >= memory["baseline_rss"] > 0

    inference = record["inference"]
    assert inference["image_size"] == [64, 64] and [e["batch"] for e in inference["per_batch"]] == [1, 2]
    for entry in inference["per_batch"]:
        assert _typed(entry["fps"], number) and entry["fps"] > 0 and entry["iters"] == 1
    assert inference["fps_batch1"] == inference["per_batch"][0]["fps"]
    # the stem, 2 convs in each of 8 blocks and 3 projections fold into their convolutions
    assert inference["fold_bn"]["folded"] == 20, inference["fold_bn"]
    assert inference["best"]["fps"] == max(e["fps"] for e in inference["per_batch"])

    cells = [c.strip() for c in record["markdown_row"].strip().strip("|").split("|")]
    assert len(cells) == 8 and cells[:2] == ["R-18-FPN", "16 ep"]
    assert re.fullmatch(r"\d+\.\d \(RSS, b2, 64x64\)", cells[2]) and cells[7] == "-"  # marks: CPU, batch, size
    assert cells[6] == f"{record['accuracy']['bbox']['AP']:.3f} (subset)"


def test_ap_block_with_weights_on_the_synth_dataset(tiny_run):
    accuracy = json.loads(tiny_run["path"].read_text())["accuracy"]
    assert accuracy["images"] == 8 and accuracy["subset"] is True and accuracy["weights"] == str(tiny_run["weights"])
    assert re.fullmatch(r"[0-9a-f]{64}", accuracy["weights_sha256"]) and set(accuracy) >= {"annotations", "bbox"}
    bbox = accuracy["bbox"]
    assert len(bbox["stats"]) == 12 and bbox["AP"] == bbox["stats"][0] and 0 <= bbox["AP"] <= 1  # a fraction
    assert all(s is None or 0 <= s <= 1 for s in bbox["stats"])  # COCO's undefined -1 is null, not a value
    assert len(bbox["summary"].splitlines()) == 12
    assert "Evaluate annotation type *bbox*, the first 8 val images\n" + bbox["summary"] in tiny_run["stdout"]


def test_benchmark_command(tiny_run):
    assert tiny_run["code"] == 0
    record = json.loads(tiny_run["path"].read_text())
    lines = tiny_run["stdout"].splitlines()
    header = lines.index("| Backbone | Lr schd | Mem (GB) | Train time (s/iter) | Train speed (img/s) | "
                         "Inf time (fps) | box AP | mask AP |")
    assert lines[header + 2] == record["markdown_row"]
    assert lines[-1] == f"record written to {tiny_run['path']}"
    assert any(line.startswith("training: batch 2, 1 iterations after 0 warm-up") for line in lines)


def test_benchmark_command_refuses_bad_counts(capsys):
    assert main(["benchmark", str(shipped_config("retinanet-resnet18-fpn-demo.yaml")), "--iters", "0"]) == 2
    assert "--iters must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["faster-rcnn-resnet18-fpn-demo.yaml", "mask-rcnn-resnet18-fpn-demo.yaml"])
def test_two_stage_benchmarks_run(name):
    cfg = _config(name)
    options = BenchmarkOptions(config_path=str(shipped_config(name)), size=(64, 64), train_batch=1, iters=1,
                               warmup=0, batch_sizes=(1,), device="cpu")
    record = run_benchmark(cfg, options)
    assert record["train"]["s_per_iter"] > 0 and record["train"]["bad_steps"] == 0
    assert record["inference"]["fps_batch1"] > 0 and record["accuracy"] is None
    cells = [c.strip() for c in record["markdown_row"].strip().strip("|").split("|")]
    assert len(cells) == 8 and cells[6] == "not yet measured"
    assert cells[7] == ("not yet measured" if "mask" in name else "-")


def test_out_of_memory_in_training_still_writes_a_record(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(benchmark, "benchmark_training", out_of_memory)
    name = "retinanet-resnet18-fpn-demo.yaml"
    options = BenchmarkOptions(config_path=str(shipped_config(name)), size=(64, 64), train_batch=2, iters=1,
                               warmup=0, batch_sizes=(1,), device="cpu")
    record = run_benchmark(_config(name), options)
    assert record["train"] == {"error": "oom", "batch": 2, "config_batch": 8, "config_accumulate": 1}
    assert record["inference"]["fps_batch1"] > 0  # the other phases still ran
    cells = [c.strip() for c in record["markdown_row"].strip().strip("|").split("|")]
    assert cells[2:5] == ["out of memory (b2)"] * 3
