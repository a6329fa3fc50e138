"""Training over a dataset seeded with bad files and records runs to the end and reports every skip."""
import json
import logging

import torch

from conftest import assert_report_covers
from detkit.cli import main
from detkit.config import dump_yaml
from detkit.engine.trainer import Trainer
from run_configs import fast_config


def _bad_config(root, out, **data):
    cfg = fast_config(root, out, unit="epochs", max_length=1, steps=[100])
    cfg.data.load_masks, cfg.data.num_workers = True, 2
    cfg.data.aspect_ratio_grouping = False  # one epoch then draws every image exactly once
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_training_over_a_seeded_bad_dataset_runs_to_the_end_and_reports_every_skip(bad_synth_root, tmp_path,
                                                                                   caplog):
    caplog.set_level(logging.INFO)
    planted = json.loads((bad_synth_root / "planted.json").read_text())
    trainer = Trainer(_bad_config(bad_synth_root, tmp_path, max_unreadable_fraction=0.5), progress=False)
    trainer.train()
    assert trainer.iteration == trainer.max_iter == -(-len(trainer.train_set) // 4)
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    assert_report_covers(json.loads((tmp_path / "data_report.json").read_text()), planted)
    assert any(r.getMessage().startswith("skipped ") and "5 files: see" in r.getMessage() for r in caplog.records)


def test_too_many_unreadable_images_stop_the_run_with_a_pointer_to_the_report(bad_synth_root, tmp_path, capsys):
    cfg = _bad_config(bad_synth_root, tmp_path / "run")  # default limit: 5 % of the images
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not be read, more than data.max_unreadable_fraction (5%)" in err and "data_report.json" in err
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["unreadable_images"]
