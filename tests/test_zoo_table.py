"""`detkit zoo-table`: config labels, record loading, the markdown row and docs/MODEL_ZOO.md."""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest

from detkit.cli import main
from detkit.config import Config, load_config
from detkit.engine.zoo import (FAMILIES, GIB, NOT_APPLICABLE, NOT_MEASURED, STALE, RecordError, config_hash,
                               describe, load_records, markdown_row, render_zoo, shipped_configs)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# the golden page's configs: three with records, two without
GOLDEN_STEMS = ("retinanet-resnet50-fpn-640-3x", "retinanet-resnet18-fpn-demo", "faster-rcnn-resnet50-fpn-1x",
                "mask-rcnn-resnet18-fpn-demo", "trident-resnet50v2-c4-c5-128roi-1x")
H200 = {"type": "cuda", "name": "NVIDIA H200", "memory_bytes": 150_119_759_872, "cpu_count": 16, "torch_threads": 16}
XEON = {"type": "cpu", "name": "Intel(R) Xeon(R) Platinum 8480+", "memory_bytes": 24 * GIB, "cpu_count": 2,
        "torch_threads": 2}


@functools.lru_cache(maxsize=None)
def _shipped() -> dict:
    """Every shipped config, loaded once for the whole module."""
    return shipped_configs(REPO / "configs")


def _config(stem: str) -> Config:
    return _shipped()[stem][1]


def _record(stem: str, device: dict, *, timestamp: str = "2026-11-21T10:02:03Z", train: dict | None = None,
            inference: dict | None = None, accuracy: dict | None = None, sha256: str | None = None,
            overrides: tuple[str, ...] = ()) -> dict:
    """A schema-1 record as `detkit benchmark` writes it (the parts the zoo table reads, and a few more)."""
    cfg = load_config(Config, REPO / "configs" / f"{stem}.yaml", list(overrides)) if overrides else _config(stem)
    desc = describe(cfg, stem)
    cuda = device["type"] == "cuda"
    return {
        "schema": 1, "command": f"detkit benchmark configs/{stem}.yaml", "timestamp": timestamp,
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
        "versions": {"detkit": "0.1.0", "torch": "2.11.0" if cuda else "2.13.0+cpu", "cuda": "12.8" if cuda else None,
                     "cudnn": "91002" if cuda else None, "python": "3.11.9", "numpy": "2.1.3", "platform": "Linux"},
        "device": device,
        "config": {"path": f"configs/{stem}.yaml", "name": stem, "overrides": list(overrides),
                   "sha256": sha256 or config_hash(cfg), "arch": cfg.model.arch, "backbone": desc["backbone"],
                   "schedule": desc["schedule"], "num_classes": 91, "num_classes_source": "COCO's 91 ids"},
        "settings": {"amp": cfg.runtime.amp, "channels_last": False, "compile": False, "fold_bn": True,
                     "input": "synthetic", "init": "random", "seed": 0},
        "size": None, "train": train, "inference": inference, "accuracy": accuracy, "markdown_row": ""}


def _train(batch: int, config_batch: int, s_per_iter: float, memory: dict, warmup: int, iters: int) -> dict:
    return {"batch": batch, "config_batch": config_batch, "config_accumulate": 1,
            "batch_reason": "config" if batch == config_batch else "fits in memory", "image_sizes": [[640, 640]],
            "warmup": warmup, "iters": iters, "s_per_iter": s_per_iter, "s_per_iter_median": s_per_iter,
            "s_per_iter_p90": s_per_iter, "img_per_s": batch / s_per_iter, "unsteady": False,
            "compile_seconds": None, "memory": memory}


def _inference(fps: float, iters: int) -> dict:
    return {"image_size": [800, 1344], "fold_bn": {"folded": 53, "kept": 0},
            "per_batch": [{"batch": 1, "fps": fps, "s_per_batch_median": 1 / fps, "iters": iters}],
            "fps_batch1": fps, "best": {"batch": 1, "fps": fps}}


def _ap(value: float) -> dict:
    return {"AP": value, "stats": [value] + [0.0] * 11, "summary": ""}


def _fixture_records() -> dict[str, dict]:
    """The three records of the golden page: GPU RetinaNet, CPU Mask R-CNN with AP, CPU reduced batch."""
    cuda_memory = {"kind": "cuda", "peak_allocated": 30.24 * GIB, "peak_reserved": 33.0 * GIB,
                   "steady_allocated": 29.0 * GIB, "steady_reserved": 33.0 * GIB}
    rss = {"kind": "rss", "peak_rss": 3.44 * GIB, "baseline_rss": 0.9 * GIB, "method": "clear_refs"}
    big_rss = {"kind": "rss", "peak_rss": 5.46 * GIB, "baseline_rss": 0.9 * GIB, "method": "clear_refs"}
    return {
        "retinanet-resnet50-fpn-640-3x__cuda-nvidia-h200": _record(
            "retinanet-resnet50-fpn-640-3x", H200, timestamp="2026-11-22T08:00:00Z",
            train=_train(32, 32, 0.0768, cuda_memory, 5, 20), inference=_inference(31.25, 50)),
        "mask-rcnn-resnet18-fpn-demo__cpu-2c-xeon": _record(
            "mask-rcnn-resnet18-fpn-demo", XEON, train=_train(8, 8, 2.345, rss, 1, 2),
            inference=_inference(9.87, 3),
            accuracy={"annotations": "datasets/synth-demo/annotations/instances_val.json", "weights": "w.pth",
                      "weights_sha256": "0" * 64, "images": 8, "subset": True, "bbox": _ap(0.3124),
                      "segm": _ap(0.2866)}),
        "faster-rcnn-resnet50-fpn-1x__cpu-2c-xeon": _record(
            "faster-rcnn-resnet50-fpn-1x", XEON, timestamp="2026-11-21T12:30:00Z",
            train=_train(2, 16, 12.34, big_rss, 1, 2), inference=_inference(0.6123, 3)),
    }


def _write_records(folder: Path, records: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, record in records.items():
        (folder / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """tmp_path with configs/ (the golden configs, each a one-line file naming the shipped one as its base),
    records/ (the fixture records) and docs/."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for stem in GOLDEN_STEMS:
        (configs / f"{stem}.yaml").write_text(f"base: {REPO / 'configs' / stem}.yaml\n", encoding="utf-8")
    _write_records(tmp_path / "records", _fixture_records())
    (tmp_path / "docs").mkdir()
    return tmp_path


def _render(root: Path, records_dir: Path | None = None) -> str:
    return render_zoo(load_records(records_dir or root / "records"), root / "configs", link_from=root / "docs")


def _rows(text: str) -> list[list[str]]:
    """The cells of every table row (header and rule lines left out)."""
    rows = [line[2:-2].split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] != "Backbone"]


def _stem_of(row: list[str]) -> str:
    return re.fullmatch(r"\[([^\]]+)\]\(.*\)", row[8]).group(1)


GOLDEN = REPO / "tests" / "data" / "zoo_records" / "golden_MODEL_ZOO.md"


def test_golden_rendering(zoo):
    """Three fixture records (GPU RetinaNet; CPU Mask R-CNN with subset AP; CPU Faster R-CNN at a reduced batch)
    over five configs. After an intended change, rewrite the golden page with DETKIT_UPDATE_GOLDEN=1."""
    text = _render(zoo)
    if os.environ.get("DETKIT_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")
    rows = {_stem_of(r): r for r in _rows(text)}  # the last table of each family: CPU, where two records are
    assert rows["faster-rcnn-resnet50-fpn-1x"][2:8] == ["5.5 (RSS, b2)", "12.3 (b2)", "0.16 (b2)", "0.61",
                                                        NOT_MEASURED, NOT_APPLICABLE]
    assert rows["mask-rcnn-resnet18-fpn-demo"][2:8] == ["3.4 (RSS)", "2.345", "3.4", "9.9", "0.312 (subset)",
                                                        "0.287 (subset)"]


def test_configs_without_records_are_not_yet_measured():
    text = render_zoo([], REPO / "configs", shipped=_shipped(), link_from=REPO / "docs")
    rows = _rows(text)
    assert sorted(_stem_of(r) for r in rows) == sorted(p.stem for p in CONFIGS)  # every shipped config, once
    assert "### CPU" not in text and text.count("### GPU: not yet measured") == len(FAMILIES)
    for row in rows:
        mask = _config(_stem_of(row)).model.arch == "mask_rcnn"
        assert len(row) == 10 and row[0] and row[1]
        assert row[2:7] == [NOT_MEASURED] * 5
        assert row[7] == (NOT_MEASURED if mask else NOT_APPLICABLE)
        assert row[9] == NOT_APPLICABLE  # no record link


def test_stale_records_are_marked(zoo, tmp_path):
    train = _train(2, 16, 12.34, {"kind": "rss", "peak_rss": GIB, "method": "clear_refs"}, 1, 2)
    records = _write_records(tmp_path / "stale", {
        "current": _record("faster-rcnn-resnet50-fpn-1x", XEON, train=train),
        "changed": _record("retinanet-resnet50-fpn-640-3x", XEON, train=train, sha256="0" * 64),
        # the hash is taken after overrides: matching ones are current, a record hashed without them is stale
        "overridden": _record("mask-rcnn-resnet18-fpn-demo", XEON, train=train, overrides=("solver.base_lr=0.02",)),
        "overridden-stale": _record("retinanet-resnet18-fpn-demo", XEON, train=train, overrides=("solver.gamma=0.5",),
                                    sha256=config_hash(_config("retinanet-resnet18-fpn-demo"))),
    })
    rows = {_stem_of(r): r for r in _rows(_render(zoo, records)) if r[9] != NOT_APPLICABLE}
    stale = sorted(stem for stem, row in rows.items() if row[9].endswith(STALE))
    assert stale == ["retinanet-resnet18-fpn-demo", "retinanet-resnet50-fpn-640-3x"]
    assert rows["retinanet-resnet50-fpn-640-3x"][2:4] == ["1.0 (RSS, b2)", "12.3 (b2)"]  # still shown, marked


def test_rows_are_grouped_by_detector_and_device(tmp_path):
    records = _fixture_records()
    a100 = {**H200, "name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * GIB}
    records["retinanet-resnet50-fpn-1x__cuda-a100"] = _record("retinanet-resnet50-fpn-1x", a100,
                                                             train=_train(16, 16, 0.5, {"kind": "cuda"}, 5, 20))
    older = _record("retinanet-resnet50-fpn-640-3x", H200, timestamp="2026-11-01T00:00:00Z",
                    train=_train(32, 32, 9.0, {"kind": "cuda"}, 5, 20))
    records["retinanet-resnet50-fpn-640-3x__cuda-old"] = older
    folder = _write_records(tmp_path / "records", records)
    text = render_zoo(load_records(folder), REPO / "configs", shipped=_shipped(), link_from=REPO / "docs")

    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == list(FAMILIES)
    for section in sections:
        family = section.splitlines()[0]
        tables = re.split(r"^### ", section, flags=re.M)[1:]
        assert [t.split(",")[0] for t in tables] == ["GPU: NVIDIA A100-SXM4-80GB", "GPU: NVIDIA H200",
                                                     "CPU: Intel(R) Xeon(R) Platinum 8480+"]
        stems = [[_stem_of(r) for r in _rows(t)] for t in tables]
        assert stems[0] == stems[1] == stems[2]  # every table lists every config of the family, in one order
        assert {describe(_config(s), s)["family"] for s in stems[0]} == {family}
        measured = [[_stem_of(r) for r in _rows(t) if r[9] != NOT_APPLICABLE] for t in tables]
        expected = {"RetinaNet": [["retinanet-resnet50-fpn-1x"], ["retinanet-resnet50-fpn-640-3x"], []],
                    "Faster R-CNN": [[], [], ["faster-rcnn-resnet50-fpn-1x"]],
                    "Mask R-CNN": [[], [], ["mask-rcnn-resnet18-fpn-demo"]]}
        assert measured == expected.get(family, [[], [], []])
    retinanet = [r[0] for r in _rows(re.split(r"^### ", sections[0], flags=re.M)[1])]
    order = ["R-18-FPN", "R-50-FPN@640", "R-50-FPN", "R-101-FPN", "SpineNet-49S", "SpineNet-49S@640",
             "SpineNet-49@640", "SpineNet-49@896", "SpineNet-96@1024", "SpineNet-143@1280", "SpineNet-190@1280"]
    assert list(dict.fromkeys(retinanet)) == order  # backbone, then test size
    schedules = [r[1] for r in _rows(sections[0]) if r[0] == "SpineNet-49@640"][:3]
    assert schedules == ["250 ep", "350 ep", "500 ep"]
    h200 = {_stem_of(r): r for r in _rows(re.split(r"^### ", sections[0], flags=re.M)[2])}
    assert h200["retinanet-resnet50-fpn-640-3x"][3] == "0.077"  # the newest record of a config on a machine


@pytest.mark.parametrize("content", [
    '{"config": {"path": "configs/x.yaml"}}',  # no schema
    '[{"schema": 1}]',  # not an object
    '{"schema": 2, "config": {}, "device": {}, "timestamp": ""}',  # a future schema
    '{"schema": true}',
    '{"schema": 1, "config": {"path": "configs/x.yaml"}, "device": {"type": "cpu"}, "timestamp": "t"}',  # no hash
    '{"schema": 1',  # not JSON
], ids=["no-schema", "list", "schema-2", "schema-true", "no-sha256", "broken"])
def test_foreign_json_is_refused(tmp_path, capsys, content):
    folder = _write_records(tmp_path / "records", {"a-good-one": _fixture_records()[
        "faster-rcnn-resnet50-fpn-1x__cpu-2c-xeon"]})
    (folder / "foreign.json").write_text(content, encoding="utf-8")
    with pytest.raises(RecordError, match="foreign.json"):
        load_records(folder)
    assert main(["zoo-table", str(folder), "--out", str(tmp_path / "zoo.md")]) == 2
    assert "foreign.json" in capsys.readouterr().err
    assert not (tmp_path / "zoo.md").exists()


def test_records_folder_ignores_other_files_and_must_exist(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "README.md").write_text("what goes here\n")
    assert load_records(folder) == []
    with pytest.raises(FileNotFoundError, match="no records folder"):
        load_records(tmp_path / "missing")


@pytest.mark.parametrize("stem, family, backbone, schedule", [
    ("retinanet-resnet50-fpn-1x", "RetinaNet", "R-50-FPN", "1x"),
    ("retinanet-resnet50-fpn-640-3x", "RetinaNet", "R-50-FPN@640", "3x"),
    ("retinanet-resnet50-fpn-640-30x", "RetinaNet", "R-50-FPN@640", "30x"),
    ("retinanet-resnet50-fpn-torchvision", "RetinaNet", "R-50-FPN", "90000 it"),
    ("retinanet-spinenet-49s-640", "RetinaNet", "SpineNet-49S@640", "350 ep"),
    ("retinanet-spinenet-190-1280-protocol-c", "RetinaNet", "SpineNet-190@1280", "400 ep"),
    ("retinanet-spinenet-49s-demo", "RetinaNet", "SpineNet-49S", "8 ep"),
    ("faster-rcnn-resnet50-c4-1x", "Faster R-CNN", "R-50-C4", "1x"),
    ("faster-rcnn-resnet101v2-c4-c5-256roi-1x", "Faster R-CNN", "R-101v2-C4", "1x"),
    ("faster-rcnn-resnet101-c4-c5-512roi-fp16-1x", "Faster R-CNN", "R-101-C4", "1x"),
    ("mask-rcnn-resnet50-fpn-1x", "Mask R-CNN", "R-50-FPN", "1x"),
    ("mask-rcnn-spinenet-143", "Mask R-CNN", "SpineNet-143@1280", "350 ep"),
    ("cascade-rcnn-resnet18-fpn-demo", "Cascade R-CNN", "R-18-FPN", "10 ep"),
    ("trident-resnet50v2-c4-c5-128roi-1x", "TridentNet", "R-50v2-C4, Trident", "1x"),
    ("trident-fast-resnet101v2-c4-c5-128roi-1x", "TridentNet", "R-101v2-C4, Trident-Fast", "1x"),
    ("trident-resnet18-c4-demo", "TridentNet", "R-18-C4, Trident", "6 ep"),
])
def test_describe_labels(stem, family, backbone, schedule):
    desc = describe(_config(stem), stem)
    assert (desc["family"], desc["backbone"], desc["schedule"]) == (family, backbone, schedule)
    assert desc["mask"] == (family == "Mask R-CNN") and desc["name"] == stem


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_described(path):
    cfg = _config(path.stem)
    desc = describe(cfg, path.stem)
    assert desc["family"] in FAMILIES
    assert re.fullmatch(r"(R-\d+(v2)?-(FPN|C4)|SpineNet-(49S|49|96|143L?|190))(@\d+)?(, Trident(-Fast)?)?",
                        desc["backbone"]), desc["backbone"]
    assert re.fullmatch(r"\d+x|\d+ ep|\d+ it", desc["schedule"]), desc["schedule"]
    assert re.fullmatch(r"\d+x\d+", desc["input_size"])
    assert re.fullmatch(r"[0-9a-f]{64}", config_hash(cfg))


def test_config_hash_ignores_the_run_name_and_folder_only():
    path = REPO / "configs" / "retinanet-resnet18-fpn-demo.yaml"
    base = config_hash(load_config(Config, path, []))
    assert config_hash(load_config(Config, path, ["name=other", "runtime.output_dir=/tmp/elsewhere"])) == base
    assert config_hash(load_config(Config, path, ["data.batch_size=3"])) != base
    assert config_hash(load_config(Config, path, ["runtime.channels_last=false"])) != base


def test_markdown_row_formats_and_marks():
    record = _record("faster-rcnn-resnet50-fpn-1x", XEON, train=_train(
        2, 16, 0.1234, {"kind": "rss", "peak_rss": 2.84 * GIB, "method": "ru_maxrss"}, 1, 2))
    record["inference"] = {"per_batch": [{"batch": 1, "error": "oom"}], "fps_batch1": None, "best": None}
    assert markdown_row(record) == ("| R-50-FPN | 1x | 2.8 (RSS since start, b2) | 0.123 (b2) | 16.2 (b2) | out of "
                                    f"memory | {NOT_MEASURED} | {NOT_APPLICABLE} |")
    record = _record("mask-rcnn-resnet50-fpn-1x", H200, train=_train(
        16, 16, 0.04, {"kind": "cuda", "peak_allocated": 3.449 * GIB}, 5, 20), inference=_inference(0.04567, 50),
        accuracy={"subset": False, "bbox": _ap(0.3856), "segm": None})
    assert markdown_row(record) == f"| R-50-FPN | 1x | 3.4 | 0.040 | 400.0 | 0.046 | 0.386 | {NOT_MEASURED} |"
    record["settings"]["size"] = [64, 64]  # `detkit benchmark --size 64 64`: not the config's real size
    assert markdown_row(record).startswith("| R-50-FPN | 1x | 3.4 (64x64) | 0.040 (64x64) | 400.0 (64x64) | "
                                           "0.046 (64x64) | 0.386 |")
    record.update(train=None, inference=None, accuracy=None)
    assert markdown_row(record) == f"| R-50-FPN | 1x |{f' {NOT_MEASURED} |' * 6}"


def test_zoo_table_command_writes_and_checks(zoo, capsys, monkeypatch):
    monkeypatch.chdir(zoo)
    out = Path("docs/MODEL_ZOO.md")
    command = ["zoo-table", "./records/", "--configs", "configs", "--out", str(out)]
    assert main([*command, "--check"]) == 1  # not written yet
    assert "does not exist" in capsys.readouterr().out
    assert main(command) == 0
    assert out.read_text() == render_zoo(load_records("records"), "configs", records_label="records", link_from="docs")
    assert main([*command, "--check"]) == 0
    _write_records(zoo / "records", {"late": _record("trident-resnet50v2-c4-c5-128roi-1x", H200,
                                                     inference=_inference(12.0, 50))})
    before = out.read_text()
    assert main([*command, "--check"]) == 1
    printed = capsys.readouterr().out
    assert f"{out} is out of date" in printed and "| R-50v2-C4, Trident | 1x |" in printed
    assert "regenerate it with: detkit zoo-table" in printed and out.read_text() == before


def test_model_zoo_md_is_up_to_date(monkeypatch, capsys):
    """docs/MODEL_ZOO.md is what `detkit zoo-table benchmarks/records` renders from the committed records and
    configs; regenerate it with that command after changing either."""
    monkeypatch.chdir(REPO)
    code = main(["zoo-table", "benchmarks/records", "--check"])
    assert code == 0, capsys.readouterr().out
