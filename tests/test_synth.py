import hashlib
import json

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.image_io import read_image
from detkit.data.synth import CATEGORIES, generate


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
    kw = dict(workers=1, min_size=64, max_size=96, max_objects=4)
    generate(tmp_path / "a", {"train": 6}, seed=1, **kw)
    generate(tmp_path / "b", {"train": 6}, seed=1, **kw)
    generate(tmp_path / "c", {"train": 6}, seed=2, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_parallel_equals_serial(tmp_path):
    kw = dict(min_size=64, max_size=96, max_objects=4)
    generate(tmp_path / "serial", {"train": 20}, seed=5, workers=1, **kw)
    generate(tmp_path / "parallel", {"train": 20}, seed=5, workers=2, **kw)
    assert _digest(tmp_path / "serial") == _digest(tmp_path / "parallel")


def test_annotations_match_masks_and_images(synth_root):
    data = json.loads((synth_root / "annotations" / "instances_train.json").read_text())
    assert {c["id"] for c in data["categories"]} == {cid for cid, _ in CATEGORIES}
    assert len(CATEGORIES) >= 8
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        h, w = im["height"], im["width"]
        if ann["iscrowd"]:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        else:
            assert all(len(p) >= 6 for p in ann["segmentation"])
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        # area and box are exactly the mask's
        assert ann["area"] == float(mask_utils.area(rle))
        assert mask_utils.toBbox(rle).tolist() == ann["bbox"]
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
    kinds = {im["file_name"].rsplit(".", 1)[1] for im in data["images"]}
    assert kinds == {"jpg", "png"}
    assert any(a["iscrowd"] for a in data["annotations"])
    # every image decodes to its annotated size (EXIF-rotated ones included)
    for im in data["images"]:
        assert read_image(synth_root / "train" / im["file_name"]).size == (im["width"], im["height"])


def test_occluded_masks_are_the_visible_parts(synth_root):
    """Masks of one image never overlap: each pixel belongs to the object drawn last there."""
    data = json.loads((synth_root / "annotations" / "instances_train.json").read_text())
    by_image = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
    images = {im["id"]: im for im in data["images"]}
    overlapping_boxes = 0
    for image_id, anns in by_image.items():
        h, w = images[image_id]["height"], images[image_id]["width"]
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))) for a in anns]
        total = np.sum(masks, axis=0)
        # polygon rasterisation can share edge pixels; interiors never overlap
        assert (total > 1).sum() <= 0.05 * sum(m.sum() for m in masks) + 4
        for i in range(len(anns)):
            for j in range(i + 1, len(anns)):
                a, b = anns[i]["bbox"], anns[j]["bbox"]
                overlapping_boxes += (min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])) and (
                    min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1]))
    assert overlapping_boxes > 0  # the data does hold occlusion


def test_object_sizes_span_coco_ranges(tmp_path):
    generate(tmp_path, {"train": 40}, seed=0, workers=1)
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in data["annotations"] if not a["iscrowd"]])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
