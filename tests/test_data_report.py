import json

from conftest import assert_report_covers
from detkit.config import Config, load_config
from detkit.data import build_dataset, build_test_loader
from detkit.data.coco import CocoDataset
from detkit.data.report import SkipLedger


def _report():
    images = [{"id": 1, "width": 50, "height": 40, "file_name": "a.jpg"},
              {"id": 2, "width": 50, "height": 40, "file_name": "../b.jpg"},
              {"id": 3, "width": 50, "height": 40, "file_name": "c.jpg"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 10, 10]},  # unknown category
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, -1, 10]},  # negative width
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [45, 1, 10, 10]},  # clipped: a repair, not a skip
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, 1, 10, 10]}]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    return CocoDataset.from_dict(data, annotation_file="train.json").report


def test_ledger_counts_deduplicates_and_writes(tmp_path):
    ledger = SkipLedger(num_images=20)
    ledger.add_report(_report())
    assert ledger.summary() == "skipped 1 image, 2 annotations, 0 files: see data_report.json"
    assert not ledger.too_many(0.0)
    ledger.add_skipped([(7, "x/7.jpg", "file not found"), (9, "9.png", "not a recognised image file")])
    ledger.add_skipped([(7, "x/7.jpg", "file not found")])
    assert ledger.num_unreadable_images == 2
    assert ledger.too_many(0.05) and not ledger.too_many(0.1)  # 2 of 20 is over 5 %, not over 10 %
    other = SkipLedger(num_images=20)  # another rank's, or a checkpoint's
    other.add_skipped([(9, "9.png", "not a recognised image file"), (11, "11.jpg", "mask of annotation 3 ...")])
    saved = other.state()
    assert json.loads(json.dumps(saved)) == saved == [  # plain values, by image id
        {"image_id": 9, "file_name": "9.png", "reason": "not a recognised image file", "count": 1},
        {"image_id": 11, "file_name": "11.jpg", "reason": "mask of annotation 3 ...", "count": 1}]
    ledger.restore(saved)
    assert ledger.num_unreadable_images == 3
    restored = SkipLedger(num_images=20)  # a round trip keeps every entry and count
    restored.restore(ledger.state())
    assert restored.state() == ledger.state() and restored.num_unreadable_images == 3

    path = ledger.write(tmp_path / "data_report.json")
    assert ledger.summary(path) == f"skipped 1 image, 2 annotations, 3 files: see {path}"
    data = json.loads(path.read_text())
    assert data["skipped"] == {"images": 1, "annotations": 2, "files": 3}
    assert data["unreadable_images"] == [
        {"image_id": 7, "file_name": "x/7.jpg", "reason": "file not found", "count": 2},
        {"image_id": 9, "file_name": "9.png", "reason": "not a recognised image file", "count": 2},
        {"image_id": 11, "file_name": "11.jpg", "reason": "mask of annotation 3 ...", "count": 1}]
    (report,) = data["datasets"]
    assert report["source"] == "train.json"
    assert sorted(map(tuple, report["items"])) == [
        ("annotation: box outside the image", "4"), ("annotation: degenerate box", "3"),
        ("annotation: unknown category_id", "2"), ("image: file_name escapes the image root", "../b.jpg")]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_ledger_lists_every_planted_problem_of_the_bad_corpus(bad_synth_root):
    """The whole bad corpus through the reader and a two-worker loader: each planted problem is in the report
    with its reason, and none of the valid odd images is."""
    planted = json.loads((bad_synth_root / "planted.json").read_text())
    root = bad_synth_root
    cfg = load_config(Config, None, [
        f"data.train.annotations={root / 'annotations' / 'instances_train.json'}",
        f"data.train.images={root / 'train'}",
        "data.load_masks=true", "data.num_workers=2", "data.test_batch_size=4",
        "data.test_transform.short_sizes=[64]", "data.test_transform.max_size=96"])
    ds = build_dataset(cfg.data, "train")
    ledger = SkipLedger(len(ds))
    ledger.add_report(ds.coco.report)
    for batch in build_test_loader(ds, cfg.data):  # every image once
        ledger.add_skipped(batch.skipped)
    assert_report_covers(json.loads(json.dumps(ledger.to_dict())), planted)
    assert ledger.too_many(0.05)  # 5 of 35 images
