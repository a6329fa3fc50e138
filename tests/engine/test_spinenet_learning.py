"""RetinaNet SpineNet-49S learns: the demo config's model (128-wide P3-P7 and head, per-level head BN, TF
matcher, focal gamma 1.5, Huber box loss) trained briefly on the session's small synthetic dataset."""
import json

from detkit.config import Config, load_config
from detkit.engine.trainer import Trainer


def test_spinenet_49s_retinanet_learns_the_synthetic_shapes(synth_root, tmp_path):
    split = {"annotations": str(synth_root / "annotations/instances_train.json"), "images": str(synth_root / "train")}
    overrides = [f"data.train={json.dumps(split)}", f"data.val={json.dumps(split)}",  # fit the 24 images
                 "data.train_transform={short_sizes: [128], max_size: 192, flip_prob: 0.5}",
                 "data.test_transform={short_sizes: [128], max_size: 192}", "data.batch_size=4", "data.num_workers=0",
                 "solver.unit=iterations", "solver.max_length=150", "solver.warmup_iters=10",
                 "solver.reference_batch_size=4", f"runtime.output_dir={tmp_path}", "runtime.checkpoint_period=10000",
                 "runtime.deterministic=true", "eval.plots=false"]
    cfg = load_config(Config, "configs/retinanet-spinenet-49s-demo.yaml", overrides)
    Trainer(cfg, progress=False).train()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss_cls"] for x in lines if "loss_cls" in x]
    assert losses[-1] < 0.7 * losses[0], losses  # measured: 1.13 -> 0.58
    # measured (torch 2.13, CPU): AP 0.043, AP50 0.082 after 150 steps from scratch (the demo reaches 0.111 after
    # 600 steps of 8 images); an untrained model scores about 0
    assert metrics["bbox"]["AP50"] > 0.04 and metrics["bbox"]["AP"] > 0.02, metrics["bbox"]
