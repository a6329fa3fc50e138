import json

import numpy as np
import pytest

from detkit.data.coco import CocoDataset, DatasetError, is_safe_relative_path


def _dataset(images=None, annotations=None, categories=None):
    return {
        "images": images if images is not None else [
            {"id": 10, "width": 100, "height": 80, "file_name": "a.jpg"},
            {"id": 20, "width": 50, "height": 50, "file_name": "sub/b.png"},
        ],
        "categories": categories if categories is not None else [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": annotations if annotations is not None else [],
    }


def _ann(i, image_id=10, cat=7, bbox=(10, 10, 20, 20), **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "area": 400.0, "iscrowd": 0, **kw}


def test_contiguous_labels_and_back():
    ds = CocoDataset.from_dict(_dataset(annotations=[_ann(1, cat=7), _ann(2, cat=3), _ann(3, image_id=20, cat=3)]))
    assert ds.category_ids.tolist() == [3, 7]
    assert ds.category_names == ["dog", "cat"]
    assert ds.labels.tolist() == [1, 0, 0]
    assert ds.label_to_category_id(ds.labels).tolist() == [7, 3, 3]
    assert ds.category_id_to_label([7, 3]).tolist() == [1, 0]
    with pytest.raises(KeyError, match="99"):
        ds.category_id_to_label([99])
    np.testing.assert_allclose(ds.boxes[0], [10, 10, 30, 30])


def test_every_problem_is_counted_and_nothing_invalid_survives():
    images = [
        {"id": 1, "width": 100, "height": 80, "file_name": "ok.jpg"},
        {"id": 1, "width": 100, "height": 80, "file_name": "dup.jpg"},
        {"id": 2, "width": 100, "height": 80, "file_name": "../escape.jpg"},
        {"id": 3, "width": 100, "height": 80, "file_name": "/etc/passwd"},
        {"id": 4, "width": 0, "height": 80, "file_name": "nosize.jpg"},
        {"id": 5, "width": 100, "height": 80, "file_name": "empty.jpg"},
        {"id": 6, "width": 100, "height": 80, "file_name": "C:\\win.jpg"},
    ]
    anns = [
        _ann(1, image_id=1),
        _ann(1, image_id=1),  # duplicate id
        _ann(2, image_id=99),  # unknown image
        _ann(3, image_id=1, cat=42),  # unknown category
        _ann(4, image_id=1, bbox=(1, 2, 3)),  # malformed
        _ann(5, image_id=1, bbox=(1, float("nan"), 3, 4)),  # non-finite
        _ann(6, image_id=1, bbox=(5, 5, 0, 10)),  # degenerate
        _ann(7, image_id=1, bbox=(90, 70, 30, 30)),  # clipped to (90, 70, 100, 80)
        _ann(8, image_id=1, bbox=(200, 200, 10, 10)),  # fully outside: degenerate after clipping
        _ann(9, image_id=2),  # belongs to a rejected image: goes with it
    ]
    ds = CocoDataset.from_dict(_dataset(images, anns), filter_empty=True)
    counts = ds.report.counts
    assert counts["image: duplicate id"] == 1
    assert counts["image: file_name escapes the image root"] == 3
    assert counts["image: missing or invalid width/height"] == 1
    assert counts["image: no annotations"] == 1
    assert counts["annotation: duplicate id"] == 1
    assert counts["annotation: unknown image_id"] == 1
    assert counts["annotation: unknown category_id"] == 1
    assert counts["annotation: missing or malformed bbox"] == 1
    assert counts["annotation: non-finite bbox"] == 1
    assert counts["annotation: degenerate box"] == 2
    assert counts["annotation: box outside the image"] == 1
    assert ds.image_ids.tolist() == [1] and ds.file_names.tolist() == ["ok.jpg"]
    assert ds.ann_ids.tolist() == [1, 7]
    np.testing.assert_allclose(ds.boxes[1], [90, 70, 100, 80])
    text = ds.report.format()
    assert "file_name escapes the image root" in text and "../escape.jpg" in text
    assert ds.report.num_invalid == 12


def test_on_invalid_error_raises_with_the_report():
    with pytest.raises(DatasetError, match="unknown category_id"):
        CocoDataset.from_dict(_dataset(annotations=[_ann(1, cat=42)]), on_invalid="error")


def test_keep_or_drop_images_without_annotations():
    data = _dataset(annotations=[_ann(1)])
    assert len(CocoDataset.from_dict(data, filter_empty=False)) == 2
    kept = CocoDataset.from_dict(data, filter_empty=True)
    assert len(kept) == 1 and kept.report.counts["image: no annotations"] == 1


def test_crowd_is_an_ignore_region_and_does_not_keep_an_image():
    anns = [_ann(1, iscrowd=1, segmentation={"size": [80, 100], "counts": [100, 50, 7850]})]
    ds = CocoDataset.from_dict(_dataset(annotations=anns), filter_empty=True)
    assert len(ds) == 0  # only a crowd region: nothing to learn from
    ds = CocoDataset.from_dict(_dataset(annotations=anns + [_ann(2, segmentation=[[10, 10, 30, 10, 30, 30]])]),
                               filter_empty=True, load_masks=True)
    assert ds.is_crowd.tolist() == [True, False]
    assert ds.segmentations.rle(0) is None and len(ds.segmentations.polygons(0)) == 0


def test_segmentations_validated():
    anns = [
        _ann(1, segmentation=[[10, 10, 30, 10, 30, 30], [1, 2, 3, 4]]),  # one short polygon: dropped alone
        _ann(2, segmentation=[[1, 2, 3, 4]]),  # nothing valid left: annotation dropped
        _ann(3, segmentation="garbage"),
        _ann(4, segmentation={"size": [80, 100], "counts": [0, 8000]}),  # uncompressed RLE
        _ann(5, segmentation={"size": [10, 10], "counts": [0, 100]}),  # RLE of the wrong size
    ]
    ds = CocoDataset.from_dict(_dataset(annotations=anns), load_masks=True)
    assert ds.ann_ids.tolist() == [1, 4]
    assert ds.report.counts["annotation: polygon with fewer than 3 points"] == 2
    assert ds.report.counts["annotation: malformed segmentation"] == 3
    polys = ds.segmentations.polygons(0)
    assert len(polys) == 1 and polys[0].tolist() == [10, 10, 30, 10, 30, 30]
    assert ds.segmentations.rle(1)["size"] == [80, 100]


@pytest.mark.parametrize("bad", [{"images": []}, {"categories": []}, [],
                                 {"images": [], "categories": [{"id": 1}, {"id": 1}]},
                                 {"images": [], "categories": [{"name": "x"}]}])
def test_unusable_files_are_fatal_with_a_message(bad):
    with pytest.raises(DatasetError):
        CocoDataset.from_dict(bad)


def test_not_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset.load(path, tmp_path)


@pytest.mark.parametrize("name, safe", [
    ("a.jpg", True), ("dir/a.jpg", True), ("a..b.jpg", True), ("../a.jpg", False), ("dir/../../a.jpg", False),
    ("/abs/a.jpg", False), ("C:\\a.jpg", False), ("..\\a.jpg", False), ("", False)])
def test_path_escape(name, safe):
    assert is_safe_relative_path(name) is safe


def test_reads_the_synthetic_dataset(synth_root):
    path = synth_root / "annotations" / "instances_train.json"
    ds = CocoDataset.load(path, synth_root / "train", load_masks=True)
    raw = json.loads(path.read_text())
    assert len(ds) == len(raw["images"])
    assert len(ds.ann_ids) == len(raw["annotations"])
    assert ds.report.num_invalid == 0 and not ds.report.counts
