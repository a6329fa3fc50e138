import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detkit.evaluation import ResultsError, evaluate, save_evaluation

BLOCK_PREFIXES = [
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ",
]


@pytest.fixture(scope="module")
def gt(synth_root):
    return json.loads((synth_root / "annotations" / "instances_val.json").read_text())


def _perfect(gt, iou_type="bbox"):
    out = []
    images = {im["id"]: im for im in gt["images"]}
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9}
        if iou_type == "bbox":
            r["bbox"] = a["bbox"]
        else:
            im = images[a["image_id"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        out.append(r)
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_give_ap_one(gt, iou_type):
    result = evaluate(gt, _perfect(gt, iou_type), iou_type)
    assert result.stats[0] == pytest.approx(1.0)
    assert result.stats[1] == pytest.approx(1.0)
    lines = result.summary.splitlines()
    assert len(lines) == 12
    for line, prefix in zip(lines, BLOCK_PREFIXES):
        assert line.startswith(prefix)
    assert lines[0] == BLOCK_PREFIXES[0] + "1.000"
    assert all(v["AP"] == pytest.approx(1.0) for v in result.per_category.values() if v["AP"] >= 0)


def test_no_detections_give_zero(gt):
    result = evaluate(gt, [])
    assert result.stats[:3] == [0.0, 0.0, 0.0]
    assert result.summary.splitlines()[0] == BLOCK_PREFIXES[0] + "0.000"


def test_worse_boxes_score_lower(gt):
    rng = np.random.default_rng(0)
    noisy = [dict(r, bbox=[v + rng.normal(0, 4) for v in r["bbox"]]) for r in _perfect(gt)]
    result = evaluate(gt, noisy)
    assert 0.05 < result.stats[0] < 0.95
    assert result.stats[1] > result.stats[0]  # AP50 is the easier metric


def test_results_with_the_wrong_ids_are_refused_clearly(gt):
    good = _perfect(gt)[:2]
    with pytest.raises(ResultsError, match="unknown category_id 2 "):
        evaluate(gt, [dict(good[0], category_id=2)])
    with pytest.raises(ResultsError, match="unknown image_id"):
        evaluate(gt, [dict(good[0], image_id=-5)])
    with pytest.raises(ResultsError, match="bbox must be 4 finite numbers"):
        evaluate(gt, [dict(good[0], bbox=[0, 0, float("nan"), 1])])


def test_outputs_written(gt, tmp_path):
    result = evaluate(gt, _perfect(gt))
    files = save_evaluation({"bbox": result}, tmp_path)
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and "per_category" in metrics["bbox"]
    for key in ("bbox_pr", "bbox_per_category"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "circle" in result.per_category_table()
