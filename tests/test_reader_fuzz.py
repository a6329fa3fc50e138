"""Fuzz the COCO reader: whatever the input, it returns a valid dataset or raises DatasetError, nothing else."""
import json
import random

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detkit.data.coco import CocoDataset, DatasetError, is_safe_relative_path, rle_is_consistent

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Strategy 1: any JSON value (integers without bounds: beyond 64 bits, beyond a float).
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=20)
# In memory (`from_dict`) a float may also be NaN or infinite.
junk = st.one_of(scalars, st.floats(), st.lists(scalars, max_size=5), st.dictionaries(st.text(max_size=3), scalars,
                                                                                      max_size=2))


@st.composite
def rle(draw, height=None, width=None):
    """An RLE dict: consistent (from a real mask), near-miss counts, garbage strings, or the wrong size."""
    h = height if height is not None else draw(st.integers(1, 12))
    w = width if width is not None else draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["mask", "mask", "counts", "partition", "string", "junk"]))
    if kind == "mask":
        from pycocotools import mask as mask_utils

        bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
        mask = np.asfortranarray(np.array(bits, dtype=np.uint8).reshape(h, w))
        counts = mask_utils.encode(mask)["counts"].decode("ascii")
    elif kind == "counts":
        counts = draw(st.lists(st.integers(), max_size=6))
    elif kind == "partition":  # sums to h * w, unless a run is cut
        cuts = sorted(draw(st.lists(st.integers(0, h * w), max_size=5)))
        counts = np.diff([0] + cuts + [h * w]).tolist()
        if draw(st.booleans()):
            counts = counts[:-1] + [counts[-1] + draw(st.integers(-3, 3))]
    elif kind == "string":
        counts = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=12))
    else:
        counts = draw(junk)
    size = draw(st.sampled_from([[h, w], [h, w], [h, w], [w, h], [h, w + 1], "junk"]))
    return {"size": draw(junk) if size == "junk" else size, "counts": counts}


@st.composite
def coco_dicts(draw):
    """COCO-shaped data on a few small images; each field is junk with a probability drawn per example."""
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))  # uniform choices (hypothesis favours edge values)
    junk_rate = rnd.choice([0.0, 0.03, 0.1, 0.25])

    def field(valid):
        """`valid()`, or (at the junk rate) any JSON-ish value."""
        return draw(junk) if rnd.random() < junk_rate else valid()

    images = []
    for _ in range(rnd.randint(0, 4)):
        images.append({
            "id": field(lambda: rnd.randint(1, 5)),
            "width": field(lambda: rnd.choice([1, 4, 8, 12])),
            "height": field(lambda: rnd.choice([1, 4, 8, 12])),
            "file_name": field(lambda: rnd.choice(["a.jpg", "d/b.png", "c.jpg"]) if rnd.random() > junk_rate else
                               rnd.choice(["../x.jpg", "/abs.jpg", "C:\\x.jpg", "", "a\x00b.jpg", "..\\y.jpg"])),
        })
    ids = [im["id"] for im in images] or [1]
    annotations = []
    for _ in range(rnd.randint(0, 6)):
        image_id = field(lambda: rnd.choice(ids) if rnd.random() < 0.9 else rnd.randint(1, 5))
        size = next(((im["height"], im["width"]) for im in images if im["id"] == image_id), (None, None))
        size = tuple(v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 12 else None for v in size)
        h, w = (size[0] or 12), (size[1] or 12)

        def coordinate(extent):  # mostly inside the image, sometimes over its edge
            value = rnd.uniform(-2, extent + 2)
            return round(value) if rnd.random() < 0.5 else value

        segmentation = rnd.choice([
            lambda: [[coordinate(w if i % 2 == 0 else h) for i in range(rnd.choice([4, 6, 6, 8, 9]))]
                     for _ in range(rnd.randint(1, 3))],
            lambda: draw(rle(*size)),
            lambda: draw(st.lists(st.lists(junk, max_size=8), max_size=2)),
        ])
        ann = {
            "id": field(lambda: rnd.randint(1, 8)),
            "image_id": image_id,
            "category_id": field(lambda: rnd.choice([1, 1, 2, 2, 3])),
            "bbox": field(lambda: [coordinate(w), coordinate(h), rnd.uniform(-1, w), rnd.uniform(-1, h)]
                          if rnd.random() < 0.3 else [rnd.randint(0, w // 2), rnd.randint(0, h // 2),
                                                      rnd.uniform(1, w), rnd.uniform(1, h)]),
            "area": field(lambda: rnd.uniform(0, 100)),
            "iscrowd": field(lambda: rnd.choice([0, 0, 1])),
            "segmentation": field(segmentation),
        }
        if rnd.random() < junk_rate:  # a record without some field
            del ann[rnd.choice(sorted(ann))]
        annotations.append(ann)
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    if rnd.random() < junk_rate:
        categories = draw(st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(1, 3), junk)}), max_size=3))
    data = {"images": images, "annotations": annotations, "categories": categories}
    if rnd.random() < junk_rate / 3:
        del data[rnd.choice(sorted(data))]
    return data


def check_invariants(ds: CocoDataset, filter_empty: bool, load_masks: bool) -> None:
    """What training relies on, for a dataset the reader accepted."""
    num_images, num_anns = len(ds), len(ds.ann_ids)
    assert len(ds.file_names) == len(ds.heights) == len(ds.widths) == num_images
    assert len(ds.ann_start) == num_images + 1 and ds.ann_start[0] == 0 and ds.ann_start[-1] == num_anns
    assert (np.diff(ds.ann_start) >= 0).all()
    assert len(ds.boxes) == len(ds.labels) == len(ds.is_crowd) == len(ds.areas) == num_anns
    assert len(set(ds.image_ids.tolist())) == num_images
    assert (ds.widths > 0).all() and (ds.heights > 0).all()
    assert all(is_safe_relative_path(str(name)) for name in ds.file_names)
    assert ((ds.labels >= 0) & (ds.labels < ds.num_classes)).all()
    assert np.isfinite(ds.boxes).all() and np.isfinite(ds.areas).all()
    assert (ds.boxes[:, 2] > ds.boxes[:, 0]).all() and (ds.boxes[:, 3] > ds.boxes[:, 1]).all()
    image_of_ann = np.repeat(np.arange(num_images), np.diff(ds.ann_start))
    assert (ds.boxes[:, :2] >= 0).all()
    assert (ds.boxes[:, 2] <= ds.widths[image_of_ann]).all() and (ds.boxes[:, 3] <= ds.heights[image_of_ann]).all()
    if filter_empty:
        assert all((~ds.is_crowd[ds.annotation_slice(i)]).any() for i in range(num_images))
    report = ds.report
    assert len(report.items) == sum(report.counts.values())
    assert report.images_kept == num_images and report.annotations_kept == num_anns
    json.dumps(report.to_dict(), allow_nan=False)  # the report is plain JSON
    if load_masks:
        from pycocotools import mask as mask_utils

        segs = ds.segmentations
        for a in range(num_anns):
            h, w = int(ds.heights[image_of_ann[a]]), int(ds.widths[image_of_ann[a]])
            mask = segs.rle(a)
            if ds.is_crowd[a]:
                assert mask is None and not segs.polygons(a)
            elif mask is not None:
                assert rle_is_consistent(mask, h, w)
                assert mask_utils.decode(mask).shape == (h, w)
            else:
                polygons = segs.polygons(a)
                assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 and np.isfinite(p).all() for p in polygons)


@FUZZ
@given(data=st.one_of(json_values, coco_dicts(), coco_dicts(), coco_dicts()), filter_empty=st.booleans(),
       load_masks=st.booleans())
def test_reader_fuzz_only_documented_errors(data, filter_empty, load_masks):
    try:
        ds = CocoDataset.from_dict(data, filter_empty=filter_empty, load_masks=load_masks)
    except DatasetError:
        return
    check_invariants(ds, filter_empty, load_masks)


VALID = orjson.dumps({
    "images": [{"id": 1, "width": 10, "height": 8, "file_name": "a.jpg"},
               {"id": 2, "width": 6, "height": 6, "file_name": "b.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
                     "segmentation": [[1, 1, 5, 1, 5, 5]]},
                    {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 6, 6], "area": 36, "iscrowd": 0,
                     "segmentation": {"size": [6, 6], "counts": [0, 36]}}],
    "categories": [{"id": 1, "name": "a"}]})


@st.composite
def mutated_json(draw):
    """The valid file above with a few bytes replaced, inserted or deleted."""
    data = bytearray(VALID)
    rng = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(1, 4))):
        pos = rng.randrange(len(data))
        op = rng.choice("rid")
        byte = rng.choice(b'0123456789-.eE+[]{}",:NIaf \x00\xff') if rng.random() < 0.8 else rng.randrange(256)
        if op == "r":
            data[pos] = byte
        elif op == "i":
            data.insert(pos, byte)
        elif len(data) > 1:
            del data[pos]
    return bytes(data)


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), mutated_json(), mutated_json(), st.just(b"[" * 100_000)),
       load_masks=st.booleans())
def test_load_fuzz_bytes(tmp_path, content, load_masks):
    path = tmp_path / "instances.json"
    path.write_bytes(content)
    try:
        ds = CocoDataset.load(path, tmp_path, load_masks=load_masks)  # an OSError would fail the test
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    check_invariants(ds, False, load_masks)
