from pathlib import Path

import pytest

from detkit.config import Config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(Config, path)
    assert cfg.data.train.annotations and cfg.data.val.annotations
