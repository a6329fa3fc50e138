import json

import numpy as np
import pytest

from detkit.data.coco import CocoDataset, DatasetError, is_safe_relative_path, rle_is_consistent, rle_string_to_counts


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


def test_negative_sizes_huge_ints_and_strings_are_malformed_not_fatal():
    huge = 10 ** 400  # too large for a float: OverflowError wherever it meets one
    anns = [
        _ann(1, bbox=(10, 10, -5, -5)),  # negative w and h
        _ann(2, bbox=(huge, 10, 5, 5)),
        _ann(3, area=huge, segmentation=[[10, 10, 30, 10, 30, 30]]),  # area unusable: the box's area is used
        _ann(4, segmentation=[[10, 10, huge, 10, 30, 30], [10, 10, "30", 10, 30, 30]]),
        _ann(5, segmentation=[[10, 10, 3e7, 10, 30, 30]]),  # a rasteriser's memory bomb, far outside the image
        _ann(6, segmentation=[[-10, 10, 130, 10, 130, 30]]),  # a little outside: kept
        _ann(7, bbox=(1, 2, 1e300, 1e300), area=None, segmentation=[[10, 10, 30, 10, 30, 30]]),  # clipped
        _ann(8, area=1e300, segmentation=[[10, 10, 30, 10, 30, 30]]),  # beyond float32
    ]
    ds = CocoDataset.from_dict(_dataset(annotations=anns), load_masks=True)
    counts = ds.report.counts
    assert counts["annotation: degenerate box"] == 1
    assert counts["annotation: missing or malformed bbox"] == 1
    assert counts["annotation: malformed segmentation"] == 2
    assert ds.ann_ids.tolist() == [3, 6, 7, 8]
    np.testing.assert_allclose(ds.areas, [400, 400, 99 * 78, 400])

    # The reader converts a list of clean boxes at once, and goes record by record once any is junk: a record's
    # fate must not depend on its neighbours.
    junk = {"id": 9, "image_id": 10, "category_id": 7, "bbox": None}
    for bbox in [("1", "1", "5", "5"), (True, 1, 5, 5), (huge, 1, 5, 5), (1.5, 2, np.float32(3), np.int64(4))]:
        for others in ([_ann(8)], [_ann(8), junk]):
            ds = CocoDataset.from_dict(_dataset(annotations=[_ann(7, bbox=bbox)] + others))
            assert (7 in ds.ann_ids.tolist()) is (bbox[0] == 1.5), (bbox, len(others))
    # an id beyond 64 bits is invalid, not wrapped around
    ds = CocoDataset.from_dict(_dataset(images=[{"id": 2 ** 64, "width": 9, "height": 9, "file_name": "a.jpg"},
                                                {"id": 2 ** 63, "width": 9, "height": 9, "file_name": "b.jpg"},
                                                {"id": True, "width": 9, "height": 9, "file_name": "c.jpg"}]))
    assert len(ds) == 0 and ds.report.counts["image: missing or invalid id"] == 3
    with pytest.raises(DatasetError, match="integer 'id'"):
        CocoDataset.from_dict(_dataset(categories=[{"id": huge, "name": "x"}]))


def test_nan_infinity_and_huge_ints_in_a_file_cost_their_record_not_the_file(tmp_path):
    data = _dataset(annotations=[_ann(1, bbox=(float("nan"), 1, 5, 5)), _ann(2, bbox=(1, 1, float("inf"), 5)),
                                 _ann(3, bbox=(10 ** 400, 1, 5, 5)), _ann(4)])
    (tmp_path / "a.json").write_text(json.dumps(data))  # what Python's json writes: NaN, Infinity, 1000...0
    ds = CocoDataset.load(tmp_path / "a.json", tmp_path)
    assert ds.ann_ids.tolist() == [4]
    assert ds.report.counts["annotation: non-finite bbox"] == 2
    assert ds.report.counts["annotation: missing or malformed bbox"] == 1


def test_inconsistent_rle_is_dropped():
    from pycocotools import mask as mask_utils

    mask = np.zeros((80, 100), dtype=np.uint8, order="F")
    mask[20:40, 30:70] = 1
    good = mask_utils.encode(mask)["counts"].decode("ascii")
    big = np.zeros((1000, 1000), dtype=np.uint8, order="F")
    big[100:900, 100:900] = 1
    anns = [
        _ann(1, segmentation={"size": [80, 100], "counts": good}),
        _ann(2, segmentation={"size": [80, 100], "counts": [3, 4]}),  # sums to 7, not 8000
        _ann(3, segmentation={"size": [80, 100], "counts": [8001, -1]}),  # right sum, negative run
        _ann(4, segmentation={"size": [80, 100], "counts": [4000.0, 4000.0]}),
        _ann(5, segmentation={"size": [80, 100], "counts": "garbage!!"}),
        _ann(6, segmentation={"size": [80, 100], "counts": mask_utils.encode(big)["counts"].decode("ascii")}),
        _ann(7, segmentation={"size": [80, 100], "counts": good[:-1]}),  # cut short
        _ann(8, segmentation={"size": [80, 100], "counts": "é" + good}),
        _ann(9, segmentation={"size": [80, 100], "counts": [8000]}),  # all background: consistent
    ]
    ds = CocoDataset.from_dict(_dataset(annotations=anns), load_masks=True)
    assert ds.ann_ids.tolist() == [1, 9]
    assert ds.report.counts["annotation: RLE does not cover the image"] == 7
    assert "annotation: malformed segmentation" not in ds.report.counts
    np.testing.assert_array_equal(mask_utils.decode(ds.segmentations.rle(0)), mask)
    assert mask_utils.decode(ds.segmentations.rle(1)).sum() == 0


def test_rle_string_decoder_matches_pycocotools():
    from pycocotools import mask as mask_utils

    def runs(mask):
        """Run lengths of a mask in column-major order, starting with background."""
        flat = mask.ravel(order="F")
        edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
        lengths = np.diff(edges).tolist()
        return [0] + lengths if flat[0] else lengths

    rng = np.random.default_rng(0)
    masks = [np.zeros((1, 1)), np.ones((1, 1)), np.ones((7, 3)), np.zeros((300, 700))]
    for _ in range(200):
        h, w = rng.integers(1, 50, 2)
        masks.append(rng.random((h, w)) < rng.random())  # speckle: many short runs, deltas of both signs
    big = np.zeros((2000, 3000))  # runs of millions: counts of several 5-bit groups
    big[5:1999, 1000:2990] = 1
    masks.append(big)
    for mask in masks:
        mask = np.asfortranarray(mask.astype(np.uint8))
        rle = mask_utils.encode(mask)
        assert rle_string_to_counts(rle["counts"]) == runs(mask)
        assert rle_is_consistent(rle, *mask.shape) and not rle_is_consistent(rle, mask.shape[0] + 1, mask.shape[1])
        # and back: pycocotools reads counts we would accept as the same mask
        assert mask_utils.decode(mask_utils.frPyObjects({"size": list(mask.shape), "counts": runs(mask)},
                                                        *mask.shape)).tolist() == mask.tolist()
    for bad in ["!", "0" + "o" * 3, "p", "\x7f", "0" + "_" * 6 + "0"]:  # bad characters, cut off, > 6 groups
        assert rle_string_to_counts(bad) is None


def test_report_lists_every_item_with_its_reason():
    anns = [_ann(1)] + [_ann(1) for _ in range(8)] + [{"image_id": 10, "category_id": 7, "bbox": [1, 1, -1, 2]}]
    images = [{"id": 10, "width": 100, "height": 80, "file_name": "a.jpg"},
              {"id": 10, "width": 100, "height": 80, "file_name": "b.jpg"}, {"width": 5, "file_name": "c.jpg"},
              {"id": 11, "width": 5, "height": 5}]
    report = CocoDataset.from_dict(_dataset(images=images, annotations=anns)).report
    assert report.items.count(("annotation: duplicate id", "1")) == 8
    assert ("image: duplicate id", "b.jpg") in report.items
    assert ("image: missing or invalid id", "c.jpg") in report.items
    assert ("image: missing or invalid file_name", "11") in report.items
    assert ("annotation: degenerate box", "annotations[9]") in report.items  # no id: named by position
    assert len(report.items) == sum(report.counts.values()) == 12
    assert len(report.examples["annotation: duplicate id"]) == 5  # `format` keeps 5
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["items"].count(["annotation: duplicate id", "1"]) == 8
