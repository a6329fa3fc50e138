"""torchrun with 2 gloo processes on CPU trains exactly like 1 process with the same total batch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detkit.config import dump_yaml
from detkit.engine.trainer import Trainer
from run_configs import exact_config


def _run(command, env, timeout):
    """Run in a new session; on timeout kill the whole group (torchrun and both ranks), then fail."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one_process_with_the_same_total_batch(synth_root, tmp_path):
    cfg = exact_config(synth_root, tmp_path / "one", val=True, max_length=4)
    cfg.data.test_batch_size = 2
    cfg.runtime.checkpoint_period = 2
    cfg.model.retinanet.score_threshold = 0.0  # after 4 steps no score reaches 0.05: keep every detection
    start = time.perf_counter()
    reference = Trainer(cfg, progress=False)
    ref_result = reference.train()
    one_process_s = time.perf_counter() - start

    cfg.runtime.output_dir = str(tmp_path / "two")
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    rc, log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "detkit", "train", str(tmp_path / "cfg.yaml"), "runtime.device=cpu", "data.batch_size=2",
                    "runtime.dist_timeout_s=120", "--no-progress"], env, timeout=300)
    two_process_s = time.perf_counter() - start
    assert rc == 0, log[-4000:]

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    train_one = [x for x in one if "loss" in x]
    train_two = [x for x in two if "loss" in x]
    assert [x["iteration"] for x in train_two] == [1, 2, 3, 4]  # rank 0 alone wrote, once per iteration
    loss_gaps = []
    for a, b in zip(train_one, train_two):
        for key in ("loss", "loss_cls", "loss_box"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["iteration"], key)
            loss_gaps.append(abs(b[key] - a[key]) / abs(a[key]))
        assert b["lr"] == a["lr"]  # the learning rate scaled with the total batch of 2 x 2
    final = torch.load(tmp_path / "two" / "model_0000004.pth", weights_only=True)  # the last training state
    assert final["world_size"] == 2 and len(final["rng_per_rank"]) == 2
    assert final["data"]["step_batch"] == 4
    abs_gap = rel_gap = 0.0
    for name, value in reference.model.state_dict().items():
        if name.endswith("loss_normalizer"):
            continue  # a running estimate the step path keeps for every kind (see test_accumulation)
        torch.testing.assert_close(final["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        if value.is_floating_point():
            diff = (final["model"][name].double() - value.double()).abs()
            abs_gap = max(abs_gap, diff.max().item())
            rel_gap = max(rel_gap, (diff / value.double().abs().clamp(min=1e-3)).max().item())
    ap_one = ref_result["evaluations"]["bbox"].metrics["AP"]
    eval_two = json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())
    assert eval_two["bbox"]["AP"] == pytest.approx(ap_one, abs=1e-3)
    results_one = json.loads((tmp_path / "one" / "eval" / "results.json").read_text())
    results_two = json.loads((tmp_path / "two" / "eval" / "results.json").read_text())
    assert len(results_two) == len(results_one) > 0

    def per_image(results):  # detections of each image, gathered from both ranks: the same boxes and scores
        out = {}
        for r in results:
            out.setdefault(r["image_id"], []).append(r["score"])
        return {k: (len(v), sum(v)) for k, v in out.items()}

    a, b = per_image(results_one), per_image(results_two)
    assert a.keys() == b.keys() and len(a) == 12
    for image_id, (count, score_sum) in a.items():
        assert b[image_id][0] == count and b[image_id][1] == pytest.approx(score_sum, rel=1e-4), image_id
    # exactly one set of files: rank 1 wrote nothing
    checkpoints = sorted(p.name for p in (tmp_path / "two").glob("model_*.pth"))
    assert checkpoints == ["model_0000002.pth", "model_0000004.pth", "model_best.pth", "model_final.pth"]
    assert log.count("iteration 4/4") == 1, log[-3000:]
    print(f"\n2 processes vs 1: largest weight difference {abs_gap:.3g} (relative {rel_gap:.3g}); largest "
          f"relative loss difference {max(loss_gaps):.3g}; bbox AP {ap_one:.4f} vs {eval_two['bbox']['AP']:.4f}; "
          f"{len(results_one)} detections each; wall {one_process_s:.1f} s vs {two_process_s:.1f} s")


def test_gpus_option_builds_the_torchrun_command_and_refuses_without_cuda(monkeypatch, capsys, tmp_path):
    import detkit.cli

    calls = []
    monkeypatch.setattr(detkit.cli.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detkit.cli.main(["train", "cfg.yaml", "--gpus", "2"]) == 2
    assert "--gpus needs CUDA; for CPU processes run: torchrun --nproc_per_node 2 -m detkit train cfg.yaml " \
           "runtime.device=cpu" in capsys.readouterr().err
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert detkit.cli.main(["train", "cfg.yaml", "solver.base_lr=0.02", "--gpus", "4", "--resume"]) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                      "-m", "detkit", "train", "cfg.yaml", "solver.base_lr=0.02", "--resume"]]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL and SyncBN)")
def test_nccl_two_gpus_equal_one_gpu_with_sync_bn(synth_root, tmp_path):
    cfg = exact_config(synth_root, tmp_path / "one", max_length=4)
    cfg.model.backbone.norm = "SyncBN"
    cfg.runtime.device, cfg.runtime.sync_bn, cfg.runtime.deterministic = "cuda", True, True
    reference = Trainer(cfg, progress=False)
    reference.train()
    cfg.runtime.output_dir = str(tmp_path / "two")
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    rc, log = _run([sys.executable, "-m", "detkit", "train", str(tmp_path / "cfg.yaml"), "--gpus", "2",
                    "data.batch_size=2", "runtime.dist_timeout_s=120", "--no-progress"],
                   {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, timeout=600)
    assert rc == 0, log[-4000:]
    final = torch.load(tmp_path / "two" / "model_final.pth", weights_only=True, map_location="cpu")
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(final["model"][name], value.cpu(), rtol=1e-3, atol=1e-5, msg=name)
