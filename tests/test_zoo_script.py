"""benchmarks/zoo.py: one benchmark process per config, a record each, the page rendered from them."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "zoo.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("zoo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load_script()


def test_sweep_writes_a_record_per_config_and_the_page(tmp_path):
    records, out = tmp_path / "records", tmp_path / "MODEL_ZOO.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--configs", "configs/retinanet-resnet18-fpn-demo.yaml",
                           "--size", "128", "128", "--train-batch", "1", "--iters", "1", "--warmup", "0",
                           "--batch-sizes", "1", "--records", str(records), "--logs", str(tmp_path / "logs"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/1] retinanet-resnet18-fpn-demo: ok" in done.stdout
    (path,) = records.glob("retinanet-resnet18-fpn-demo__*.json")
    record = json.loads(path.read_text())
    assert record["train"]["batch"] == 1 and record["settings"]["size"] == [128, 128]
    assert "--train-batch 1" in (tmp_path / "logs" / "retinanet-resnet18-fpn-demo.log").read_text()
    page = out.read_text()
    assert f"[json]({Path('records') / path.name})" in page
    # a record at a replaced size is not the config's own: --skip-existing measures it again
    config = ROOT / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    assert not zoo.current_record(path, config)
    record["settings"]["size"] = None
    path.write_text(json.dumps(record))
    assert zoo.current_record(path, config)
    record["config"]["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    assert not zoo.current_record(path, config)


def test_a_failing_config_is_retried_at_half_the_batch_and_reported(tmp_path):
    config = ROOT / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    args = zoo.parse_args(["--configs", str(config.relative_to(ROOT)), "--train-batch", "2", "--timeout", "0.01"])
    ok, what = zoo.run_one(config, tmp_path / "r.json", tmp_path / "log", args)
    assert not ok and what.startswith("timed out")
    log = (tmp_path / "log").read_text()
    assert log.count("$ ") == 2 and "--train-batch 2" in log and "--train-batch 1" in log
    # without --train-batch the retry halves the config's own batch (8)
    args = zoo.parse_args(["--timeout", "0.01"])
    zoo.run_one(config, tmp_path / "r.json", tmp_path / "log2", args)
    assert "--train-batch 4" in (tmp_path / "log2").read_text()


def test_a_record_whose_training_ran_out_of_memory_is_retried(tmp_path, monkeypatch):
    config = ROOT / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    out = tmp_path / "r.json"
    batches = []

    def fake_run(cmd, **kwargs):  # the benchmark's exit 0 with {"train": {"error": "oom"}} at batch 8
        batch = int(cmd[cmd.index("--train-batch") + 1]) if "--train-batch" in cmd else 8
        batches.append(batch)
        train = {"error": "oom", "batch": batch} if batch > 4 else {"batch": batch, "s_per_iter": 1.0}
        out.write_text(json.dumps({"train": train}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(zoo.subprocess, "run", fake_run)
    ok, what = zoo.run_one(config, out, tmp_path / "log", zoo.parse_args([]))
    assert ok and batches == [8, 4] and "training batch 4 after a failure" in what


def test_an_absolute_pattern_outside_the_repository_is_refused(tmp_path):
    assert zoo.main(["--configs", str(tmp_path / "*.yaml"), "--records", str(tmp_path)]) == 2
