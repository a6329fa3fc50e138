"""Shared fixtures: one small synthetic dataset per test session."""
from __future__ import annotations

import pytest

from detkit.data.synth import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, {"train": 24, "val": 12}, seed=3, workers=1, min_size=96, max_size=160, max_objects=6,
             crowd_fraction=0.25, exif_fraction=0.15, gray_fraction=0.15, png_fraction=0.2)
    return root
