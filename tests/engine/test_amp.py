"""`runtime.amp: auto`: bfloat16 autocast where the device computes it natively, float32 elsewhere."""
from pathlib import Path

import pytest
import torch

from detkit.config import Config, load_config
from detkit.engine import inference
from detkit.engine.inference import autocast, resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_explicit_precisions_pass_through(amp):
    assert resolve_amp(amp, CPU) == amp


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "none")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(inference, "_cpu_has_native_bf16", lambda: native)
    assert resolve_amp("auto", CPU) == expected
    with autocast(CPU, "auto"):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    inference._cpu_has_native_bf16.cache_clear()
    try:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
        monkeypatch.setattr(inference, "Path", lambda _: cpuinfo)
        assert inference._cpu_has_native_bf16() == torch.backends.mkldnn.is_available()
        inference._cpu_has_native_bf16.cache_clear()
        cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
        assert not inference._cpu_has_native_bf16()
    finally:
        inference._cpu_has_native_bf16.cache_clear()


def test_auto_is_a_valid_config_value():
    cfg = load_config(Config, Path(__file__).resolve().parents[2] / "configs" / "cascade-rcnn-resnet18-fpn-demo.yaml")
    assert cfg.runtime.amp == "auto"


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "none")])
def test_auto_on_cuda_needs_bf16_tensor_cores(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    device = torch.device("cuda", 1)
    assert resolve_amp("auto", device) == expected
    assert asked == [device]  # the device asked about, not the current one
