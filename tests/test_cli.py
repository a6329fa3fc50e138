import json
import subprocess
import sys

from detkit.cli import main


def test_synth_check_data_eval_from_the_command_line(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["synth", str(root), "--train", "6", "--val", "4", "--min-size", "64", "--max-size", "96",
                 "--workers", "1"]) == 0
    ann = root / "annotations" / "instances_val.json"
    assert main(["check-data", str(ann), "--images", str(root / "val"), "--masks", "--decode", "--strict",
                 "--workers", "1", "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "problems found: none" in out and "result: no problems found" in out
    assert json.loads((tmp_path / "report.json").read_text())["images_kept"] == 4

    gt = json.loads(ann.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "dets.json").write_text(json.dumps(results))
    assert main(["eval", "--gt", str(ann), "--results", str(tmp_path / "dets.json"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "results.json").is_file()
    assert (tmp_path / "ev" / "bbox_precision_recall.png").is_file()


def test_check_data_reports_problems_and_strict_fails(tmp_path, capsys):
    bad = {"images": [{"id": 1, "width": 10, "height": 10, "file_name": "../../etc/x.jpg"}],
           "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["check-data", str(tmp_path / "bad.json"), "--images", str(tmp_path), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "file_name escapes the image root" in out and "../../etc/x.jpg" in out


def test_config_errors_are_reported_not_raised(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("solver: {base_lrr: 1}\n")
    assert main(["eval", str(tmp_path / "c.yaml"), "--results", "x.json"]) == 2
    assert "did you mean 'solver.base_lr'" in capsys.readouterr().err


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "detkit", "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "check-data", "eval", "demo"):
        assert command in out.stdout
