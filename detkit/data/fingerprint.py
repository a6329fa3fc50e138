"""A dataset's identity for resuming: the same fingerprint means the same images, boxes and labels."""
from __future__ import annotations

import hashlib

import numpy as np

from .coco import CocoDataset


def dataset_fingerprint(coco: CocoDataset, **options) -> dict:
    """A sha256 over what training reads from a split: categories, image ids, file names and sizes, and every
    box, label and crowd flag, plus the reader `options` (e.g. filter_empty, min_box_size, load_masks).

    Paths (where the files live) are left out, so a dataset moved to another disk keeps its fingerprint; pixel
    content is left out too (hashing every image would take minutes on COCO).

    Returns:
        {"fingerprint": hex digest, "images": count, "annotations": count, "categories": count}.
    """
    h = hashlib.sha256()

    def add(name: str, value) -> None:
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(value.tobytes())
        else:
            h.update(repr(value).encode())

    add("category_ids", coco.category_ids.astype(np.int64))
    add("category_names", [str(n) for n in coco.category_names])
    add("image_ids", coco.image_ids.astype(np.int64))
    add("file_names", "\0".join(str(f) for f in coco.file_names.tolist()))
    add("widths", coco.widths.astype(np.int64))
    add("heights", coco.heights.astype(np.int64))
    add("ann_start", coco.ann_start.astype(np.int64))
    add("boxes", coco.boxes.astype(np.float32))
    add("labels", coco.labels.astype(np.int64))
    add("is_crowd", coco.is_crowd.astype(bool))
    add("options", sorted(options.items()))
    return {"fingerprint": h.hexdigest(), "images": len(coco), "annotations": int(len(coco.boxes)),
            "categories": coco.num_classes}
