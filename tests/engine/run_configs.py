"""Small training configs on the session's synthetic dataset, and file damage, shared by the engine tests."""
from detkit.config import Config, from_dict


def tiny_config(root, out, *, val=True, **solver):
    """A RetinaNet R18-FPN with a 32-wide head on 96-192 px images, batch 4, deterministic."""
    data = {"train": {"annotations": str(root / "annotations/instances_train.json"), "images": str(root / "train")},
            "val": {"annotations": str(root / "annotations/instances_val.json") if val else "",
                    "images": str(root / "val")},
            "train_transform": {"short_sizes": [96, 128], "max_size": 192, "flip_prob": 0.5},
            "test_transform": {"short_sizes": [128], "max_size": 192},
            "batch_size": 4, "num_workers": 0}
    return from_dict(Config, {
        "model": {"backbone": {"depth": 18, "norm": "BN", "freeze_at": 0},
                  "fpn": {"out_channels": 32, "max_level": 6}, "anchors": {"base_size": 16},
                  "retinanet": {"head_width": 32, "num_convs": 2, "head_norm": "BN"}},
        "data": data,
        "solver": {"base_lr": 0.02, "reference_batch_size": 4, "max_length": 6, "warmup_iters": 2,
                   "steps": [4], "clip_grad_norm": 10.0, **solver},
        "runtime": {"output_dir": str(out), "log_period": 1, "checkpoint_period": 3, "deterministic": True},
        "eval": {"plots": False}})


def fast_config(root, out, *, val=False, **solver):
    """`tiny_config` with the whole trunk frozen (only the FPN and head train) and smaller images: fast steps
    and checkpoints of a few MB, for tests that train and resume many times."""
    cfg = tiny_config(root, out, val=val, **{"max_length": 8, "steps": [6], **solver})
    cfg.model.backbone.freeze_at = 5
    cfg.data.train_transform.short_sizes = (64, 96)
    cfg.data.train_transform.max_size = 128
    cfg.runtime.checkpoint_period = 2
    return cfg


def exact_config(root, out, *, val=False, **solver):
    """A config whose update does not depend on how a step's images are split (over micro-batches or processes):
    GroupNorm instead of batch statistics, and every image padded to the same 128x128 square."""
    cfg = tiny_config(root, out, val=val, **{"max_length": 2, "steps": [100], "warmup_iters": 0, **solver})
    cfg.model.backbone.norm = "GN"
    cfg.model.retinanet.head_norm = ""
    transform = cfg.data.train_transform
    transform.mode, transform.output_size, transform.scale_range, transform.flip_prob = \
        "scale_jitter", 128, (0.8, 1.2), 0.5
    cfg.data.test_transform.mode, cfg.data.test_transform.output_size = "scale_jitter", 128
    cfg.runtime.checkpoint_period = 1000
    return cfg


def damage_file(path, how):
    """Damage a checkpoint as disks, copies and crashes do: "truncated" (half), "zero" (empty), "bitflip" (one bit
    at 60 % of the file, inside the tensor data, which torch alone would load) or "garbage"."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "bitflip":
        i = int(len(data) * 0.6)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        raise ValueError(how)
