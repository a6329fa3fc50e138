"""Shared fixtures: one small synthetic dataset per test session."""
from __future__ import annotations

import pytest

from detkit.data.synth import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, {"train": 24, "val": 12}, seed=3, workers=1, min_size=96, max_size=160, max_objects=6,
             crowd_fraction=0.25, exif_fraction=0.15, gray_fraction=0.15, png_fraction=0.2)
    return root


# --- a copy of the synthetic dataset with bad files and records planted in its train split -------------------------

def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG built by hand: IHDR as given, `raw` (filter bytes and pixel rows) deflated into one IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def garbage_exif_jpeg(image) -> bytes:
    """`image` as a JPEG with an EXIF block Pillow reads but cannot write back (orientation 6 and an ImageWidth of
    -5 as SLONG): `ImageOps.exif_transpose` raises struct.error on it."""
    import io
    import struct

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x0100, 9, 1, struct.pack("<i", -5))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries) + bytes(4)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app1 + data[2:]


def _plant_bad_data(root) -> dict:
    """Add bad image files and bad records to root's train split; return the table of what was planted."""
    import json

    import numpy as np
    from PIL import Image

    ann_path = root / "annotations" / "instances_train.json"
    data = json.loads(ann_path.read_text())
    images_dir = root / "train"
    w, h = 64, 48
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    picture = Image.fromarray(np.stack([x, y, 255 - x], axis=2))

    def jpeg(name, image, **kw):
        image.save(images_dir / name, "JPEG", quality=90, **kw)

    # Files the loader must skip, with a phrase of the reason it gives.
    jpeg("bad_truncated.jpg", picture)
    full = (images_dir / "bad_truncated.jpg").read_bytes()
    (images_dir / "bad_truncated.jpg").write_bytes(full[:len(full) // 2])
    (images_dir / "bad_zero_bytes.jpg").write_bytes(b"")
    (images_dir / "bad_text.jpg").write_text("this is a text file, not a JPEG\n")
    # 40000 x 40000 1-bit gray: refused from its header, the IDAT is never inflated
    (images_dir / "bad_bomb.png").write_bytes(png_bytes(40000, 40000, 1, 0, bytes(64)))
    jpeg("bad_wrong_size.jpg", picture)
    unreadable = [("bad_truncated.jpg", (w, h), "corrupt or truncated image"),
                  ("bad_zero_bytes.jpg", (w, h), "not a recognised image file"),
                  ("bad_text.jpg", (w, h), "not a recognised image file"),
                  ("bad_bomb.png", (40000, 40000), "decompression bomb"),
                  ("bad_wrong_size.jpg", (w + 6, h), "differs from the annotated")]

    # Valid files in unusual forms: the loader must use them, not skip them.
    jpeg("odd_cmyk.jpg", picture.convert("CMYK"))
    Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257).save(images_dir / "odd_gray16.png")
    rgb48 = np.asarray(picture, dtype=">u2") * 257  # (H, W, 3) big-endian 16-bit samples
    rows = b"".join(b"\x00" + rgb48[r].tobytes() for r in range(h))
    (images_dir / "odd_rgb48.png").write_bytes(png_bytes(w, h, 16, 2, rows))
    jpeg("odd_gray.jpg", picture.convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed w x h
    jpeg("odd_exif_rotated.jpg", picture.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    (images_dir / "odd_garbage_exif.jpg").write_bytes(garbage_exif_jpeg(picture))  # used as stored: w x h
    odd = ["odd_cmyk.jpg", "odd_gray16.png", "odd_rgb48.png", "odd_gray.jpg", "odd_exif_rotated.jpg",
           "odd_garbage_exif.jpg"]

    # Every planted image gets one valid object, so that filter_empty keeps it. Ids follow one another, so the
    # loader's walk to a substitute passes over all unreadable files from the first one drawn.
    next_ann = 200_001
    for image_id, (name, (iw, ih)) in enumerate([(n, s) for n, s, _ in unreadable] + [(n, (w, h)) for n in odd],
                                                start=1001):
        data["images"].append({"id": image_id, "width": iw, "height": ih, "file_name": name})
        data["annotations"].append({"id": next_ann, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 20, 16],
                                    "area": 320.0, "iscrowd": 0, "segmentation": [[2, 2, 22, 2, 22, 18, 2, 18]]})
        next_ann += 1

    # Records the reader must drop or reject: (record as the report names it, reason, needs load_masks).
    reader_items = []
    for image_id, name in [(1, "dup_of_1.jpg"), (2001, "../escape.jpg"), (2002, "/etc/passwd"),
                           (2003, "C:\\x.jpg")]:
        data["images"].append({"id": image_id, "width": w, "height": h, "file_name": name})
        reason = "image: duplicate id" if image_id == 1 else "image: file_name escapes the image root"
        reader_items.append((name, reason, False))
    first = next(im for im in data["images"] if im["id"] == 1)
    iw, ih = first["width"], first["height"]
    rle_elsewhere = {"size": [ih, iw], "counts": "0" + "1" * 40}  # well-formed string, wrong total
    bad_annotations = [
        ({"bbox": [10, 10, -5, -5]}, "annotation: degenerate box", False),  # negative w and h
        ({"bbox": [float("nan"), 10, 5, 5]}, "annotation: non-finite bbox", False),
        ({"bbox": [10, 10, float("inf"), 5]}, "annotation: non-finite bbox", False),
        ({"bbox": [10 ** 400, 10, 5, 5]}, "annotation: missing or malformed bbox", False),
        ({"bbox": ["1", "1", "5", "5"]}, "annotation: missing or malformed bbox", False),
        ({"category_id": 999}, "annotation: unknown category_id", False),
        ({"image_id": 999_999}, "annotation: unknown image_id", False),
        # a 4-number polygon beside a valid one: the polygon goes, the annotation stays
        ({"segmentation": [[10, 10, 30, 10, 30, 30], [1, 2, 3, 4]]}, "annotation: polygon with fewer than 3 points",
         True),
        ({"segmentation": [[5, 6, 7, 8]]}, "annotation: malformed segmentation", True),  # no polygon left
        ({"segmentation": {"size": [ih, iw], "counts": [3, 4]}}, "annotation: RLE does not cover the image", True),
        ({"segmentation": {"size": [ih, iw], "counts": "garbage!!"}}, "annotation: RLE does not cover the image",
         True),
        ({"segmentation": rle_elsewhere}, "annotation: RLE does not cover the image", True),
    ]
    for fields, reason, masks_only in bad_annotations:
        data["annotations"].append({"id": next_ann, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                                    "area": 400.0, "iscrowd": 0, "segmentation": [[10, 10, 30, 10, 30, 30]],
                                    **fields})
        reader_items.append((str(next_ann), reason, masks_only))
        if fields.get("segmentation") == [[5, 6, 7, 8]]:  # its polygon is short, too
            reader_items.append((str(next_ann), "annotation: polygon with fewer than 3 points", True))
        next_ann += 1
    dup = dict(next(a for a in data["annotations"] if a["id"] == 1))
    data["annotations"].append(dup)  # same id as the first annotation: the later record goes
    reader_items.append(("1", "annotation: duplicate id", False))
    # Python's json writes NaN, Infinity and 10**400 as it reads them; the reader falls back to it for those.
    ann_path.write_text(json.dumps(data))

    planted = {
        "reader_items": [{"record": r, "reason": reason, "load_masks_only": m} for r, reason, m in reader_items],
        "unreadable_images": [{"image_id": 1001 + i, "file_name": name, "reason": phrase}
                              for i, (name, _, phrase) in enumerate(unreadable)],
        "must_not_skip": [{"image_id": 1001 + len(unreadable) + i, "file_name": name} for i, name in enumerate(odd)],
    }
    (root / "planted.json").write_text(json.dumps(planted, indent=1))
    return planted


@pytest.fixture(scope="session")
def bad_synth_root(synth_root, tmp_path_factory):
    """`synth_root` copied, with bad files and records planted in its train split (val is unchanged).

    `planted.json` at the root lists them: `reader_items` (record as the reader's report names it, reason, and
    whether only `load_masks` finds it), `unreadable_images` (image_id, file_name and a phrase of the reason the
    loader gives for skipping it) and `must_not_skip` (valid files in odd forms: CMYK, 16-bit gray and 48-bit RGB
    PNG, grayscale, EXIF-rotated, unreadable EXIF).
    """
    import shutil

    root = tmp_path_factory.mktemp("bad_synth") / "data"
    shutil.copytree(synth_root, root)
    _plant_bad_data(root)
    return root


def assert_report_covers(report_dict: dict, planted: dict) -> None:
    """`report_dict` (a `SkipLedger.to_dict()` as written to data_report.json) lists each problem planted in the bad
    corpus with its reason, and none of its valid odd images."""
    items = {tuple(item) for item in report_dict["datasets"][0]["items"]}
    for entry in planted["reader_items"]:
        assert (entry["reason"], entry["record"]) in items, entry
    unreadable = {e["file_name"]: e for e in report_dict["unreadable_images"]}
    assert set(unreadable) == {e["file_name"] for e in planted["unreadable_images"]}
    for entry in planted["unreadable_images"]:
        assert entry["reason"] in unreadable[entry["file_name"]]["reason"], entry
        assert unreadable[entry["file_name"]]["image_id"] == entry["image_id"]
    skipped_names = set(unreadable) | {record for _, record in items}
    assert not skipped_names & {e["file_name"] for e in planted["must_not_skip"]}
