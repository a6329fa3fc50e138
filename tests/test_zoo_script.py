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
    assert f"[record]({path.name})" in page or path.name in page
    # a record at a replaced size is not the config's own: --skip-existing measures it again
    zoo = _load_script()
    config = ROOT / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    assert not zoo.current_record(path, config)
    record["settings"]["size"] = None
    path.write_text(json.dumps(record))
    assert zoo.current_record(path, config)
    record["config"]["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    assert not zoo.current_record(path, config)


def test_a_failing_config_is_reported_and_the_sweep_exits_1(tmp_path):
    bad = ROOT / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    zoo = _load_script()
    args = zoo.parse_args(["--configs", str(bad.relative_to(ROOT)), "--train-batch", "2", "--timeout", "0.01"])
    ok, what = zoo.run_one(bad, tmp_path / "r.json", tmp_path / "log", args)
    assert not ok and what.startswith("timed out")
    assert (tmp_path / "log").read_text().count("$ ") == 2  # retried once at half the batch
    assert "--train-batch 1" in (tmp_path / "log").read_text()
