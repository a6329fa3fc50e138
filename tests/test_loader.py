import itertools
import logging
import os
import shutil

import numpy as np
import torch

from detkit.config import Config, load_config
from detkit.data import build_dataset, build_test_loader, build_train_loader
from detkit.data.loader import TrainBatchSampler
from detkit.data.coco import DatasetError


def _cfg(root, *overrides):
    return load_config(Config, None, [
        f"data.train.annotations={root / 'annotations' / 'instances_train.json'}",
        f"data.train.images={root / 'train'}",
        f"data.val.annotations={root / 'annotations' / 'instances_val.json'}", f"data.val.images={root / 'val'}",
        "data.train_transform.mode=scale_jitter", "data.train_transform.output_size=96",
        "data.train_transform.scale_range=[0.5, 2.0]", "data.batch_size=4", "data.load_masks=true", *overrides])


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batches_are_padded_and_consistent(synth_root):
    cfg = _cfg(synth_root, "data.num_workers=0")
    ds = build_dataset(cfg.data, "train")
    for batch in _take(build_train_loader(ds, cfg.data, seed=0), 3):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 96, 96)
        for size, t in zip(batch.image_sizes, batch.targets):
            h, w = size.tolist()
            assert h <= 96 and w <= 96
            assert len(t.boxes) == len(t.labels) == len(t.masks)
            if len(t.boxes):
                assert (t.boxes[:, 2:] <= torch.tensor([w, h])).all() and (t.boxes[:, :2] >= 0).all()
                assert (t.boxes[:, 2:] > t.boxes[:, :2]).all()


def test_same_seed_same_batches_whatever_the_worker_count(synth_root):
    ds = build_dataset(_cfg(synth_root).data, "train")
    runs = []
    for workers in (0, 2):
        cfg = _cfg(synth_root, f"data.num_workers={workers}")
        runs.append(_take(build_train_loader(ds, cfg.data, seed=7), 8))
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images)
        assert [m.image_id for m in a.metas] == [m.image_id for m in b.metas]
    other = _take(build_train_loader(ds, _cfg(synth_root, "data.num_workers=0").data, seed=8), 8)
    assert not all(torch.equal(a.images, b.images) for a, b in zip(runs[0], other))


def test_resume_skips_exactly_what_was_consumed(synth_root):
    groups = np.array([0, 1] * 10)
    full = list(itertools.islice(iter(TrainBatchSampler(20, 3, seed=1, group_ids=groups)), 12))
    resumed = list(itertools.islice(iter(TrainBatchSampler(20, 3, seed=1, group_ids=groups, start_step=5)), 7))
    assert resumed == full[5:]
    for batch in full:  # aspect-ratio grouping: one group per batch
        assert len({groups[i] for i, _ in batch}) == 1


def test_epochs_cover_the_data_and_ranks_are_disjoint():
    ranks = [TrainBatchSampler(10, 1, seed=0, rank=r, world_size=2) for r in range(2)]
    firsts = [[key[0][0] for key in itertools.islice(iter(s), 5)] for s in ranks]
    assert sorted(firsts[0] + firsts[1]) == list(range(10))
    epoch0 = [b[0] for b in itertools.islice(iter(TrainBatchSampler(10, 1, seed=0)), 20)]
    assert sorted(k[0] for k in epoch0[:10]) == list(range(10))
    assert [k[0] for k in epoch0[:10]] != [k[0] for k in epoch0[10:]]  # reshuffled each epoch
    assert len({k[1] for k in epoch0}) == 20  # every sample has its own augmentation seed


def _val_with_a_truncated_first_image(synth_root, tmp_path, workers: int):
    """(cfg, val dataset, path of its first image, truncated to 100 bytes) on a copy of the synthetic dataset."""
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    cfg = _cfg(root, f"data.num_workers={workers}")
    ds = build_dataset(cfg.data, "val")
    victim = ds.coco.image_path(0)
    with open(victim, "r+b") as f:
        f.truncate(100)
    return cfg, ds, victim


def test_corrupt_image_is_reported_and_skipped(synth_root, tmp_path, caplog):
    cfg, ds, victim = _val_with_a_truncated_first_image(synth_root, tmp_path, 0)
    loader = build_test_loader(ds, cfg.data)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == len(ds)
    assert victim in caplog.text and "skipping unreadable image" in caplog.text
    assert batches[0].metas[0].index == 1  # replaced by the next image


def test_a_workers_skip_is_reported_by_the_main_process(synth_root, tmp_path, caplog):
    """A worker does not log (its line would cross the main process's progress bar); evaluation reports it."""
    from detkit.engine.inference import predict

    cfg, ds, victim = _val_with_a_truncated_first_image(synth_root, tmp_path, 1)
    model = _TinyDetector()
    with build_test_loader(ds, cfg.data) as loader, caplog.at_level(logging.WARNING):
        batches = [batch for batch, _ in predict(model, loader, torch.device("cpu"))]
    assert batches[0].metas[0].index == 1 and batches[0].skipped[0][1] == ds.coco.file_names[0]
    lines = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(lines) == 1 and lines[0].process == os.getpid() and victim.endswith(ds.coco.file_names[0])
    assert ds.coco.file_names[0] in lines[0].getMessage()


class _TinyDetector(torch.nn.Module):
    """Stands in for a detector in `predict`: no detections."""

    def forward(self, images, image_sizes, image_scales=None):
        return [None] * len(images)


def test_wrong_annotated_size_is_caught(synth_root, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    cfg = _cfg(root, "data.num_workers=0")
    ds = build_dataset(cfg.data, "val")
    ds.coco.widths[2] += 7
    with caplog.at_level(logging.WARNING):
        _, meta = ds[2]
    assert meta.index == 3 and "differs from the annotated" in caplog.text


def test_test_loader_visits_every_image_once_in_order(synth_root):
    cfg = _cfg(synth_root, "data.num_workers=0", "data.test_batch_size=5",
               "data.test_transform.short_sizes=[64]", "data.test_transform.max_size=100")
    ds = build_dataset(cfg.data, "val")
    ids = [m.image_id for b in build_test_loader(ds, cfg.data) for m in b.metas]
    assert ids == ds.coco.image_ids.tolist()
    batch = next(iter(build_test_loader(ds, cfg.data)))
    assert batch.images.shape[-1] % 32 == 0 and batch.images.shape[-2] % 32 == 0


def test_bad_images_and_a_bad_mask_are_skipped_and_recorded(bad_synth_root, caplog):
    import json
    from collections import Counter

    from detkit.data.loader import collate

    planted = json.loads((bad_synth_root / "planted.json").read_text())
    ds = build_dataset(_cfg(bad_synth_root, "data.num_workers=0").data, "train")
    coco = ds.coco
    # An RLE mask pycocotools refuses, on a good image (the reader lets none through from a file).
    victim = int(np.flatnonzero(coco.image_ids == 5)[0])
    rows = coco.annotation_slice(victim)
    ann = rows.start + int(np.flatnonzero(~coco.is_crowd[rows])[0])
    coco.segmentations.rles.append({"size": [int(coco.heights[victim]), int(coco.widths[victim])],
                                    "counts": b"garbage!!"})
    coco.segmentations.rle_index[ann] = len(coco.segmentations.rles) - 1
    expected = {e["image_id"]: (e["file_name"], e["reason"]) for e in planted["unreadable_images"]}
    expected[5] = (str(coco.file_names[victim]), "mask of annotation")

    calls = Counter()
    load_sample = ds.load_sample

    def counting_load(index):
        calls[index] += 1
        return load_sample(index)

    ds.load_sample = counting_load
    with caplog.at_level(logging.WARNING):
        passes = [[ds[(i, 7 * i)] for i in range(len(ds))] for _ in range(2)]
    for items in passes:
        batch = collate(items)
        assert {m.image_id for m in batch.metas}.isdisjoint(expected)  # only usable images come out
        assert {image_id for image_id, _, _ in batch.skipped} == set(expected)
        for image_id, file_name, reason in batch.skipped:
            assert file_name == expected[image_id][0] and expected[image_id][1] in reason
        odd = {e["image_id"] for e in planted["must_not_skip"]}
        assert odd <= {m.image_id for m in batch.metas}  # CMYK, 16-bit, gray, EXIF: used as they are
        assert batch.to("cpu").skipped == batch.skipped
    # The substitute depends on the key alone: the second pass, which knew the bad images, chose the same ones.
    assert [m.index for _, m in passes[0]] == [m.index for _, m in passes[1]]
    bad_indices = np.flatnonzero(np.isin(coco.image_ids, list(expected)))
    assert all(calls[i] == 1 for i in bad_indices)  # each bad image was decoded once, though met many times
    assert "skipping unreadable image" in caplog.text and "mask of annotation" in caplog.text


def test_substitute_search_walks_any_run_and_fails_only_when_every_image_does(synth_root, tmp_path):
    import pytest

    ds = build_dataset(_cfg(synth_root, "data.num_workers=0").data, "train")
    last = len(ds) - 1
    ds.coco.image_root = str(tmp_path)  # every file missing but the last one
    shutil.copy(synth_root / "train" / str(ds.coco.file_names[last]), tmp_path)
    _, meta = ds[(0, 0)]
    assert meta.index == last and len(meta.skipped) == last > 10  # the old limit was 10 in a row
    assert {reason for _, _, reason in meta.skipped} == {"file not found"}
    (tmp_path / str(ds.coco.file_names[last])).unlink()
    with pytest.raises(DatasetError, match=f"none of the {len(ds)} images .*`detkit check-data --decode`"):
        ds[(3, 3)]
