"""Generate a synthetic COCO-format detection dataset: shapes on textured, noisy backgrounds.

Eight classes differ in shape, not colour (every class draws from the same colour distribution). Objects
range from COCO-small to large, overlap and occlude one another; each annotation holds the *visible* part of
its object as polygons (computed with shapely), the exact rasterised `area`, and the tight box. A few images
hold a crowd region (a cluster of small objects) annotated with `iscrowd: 1` and an RLE mask. Some images are
PNG, some grayscale, some stored rotated with an EXIF orientation tag, so the real decoding paths run.
Output is a pure function of the seed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from ..utils.fileio import write_json_atomic

# Non-contiguous on purpose, like COCO's.
CATEGORIES = [
    (1, "circle"), (3, "square"), (4, "triangle"), (7, "star"),
    (10, "cross"), (12, "hexagon"), (15, "crescent"), (20, "arrow"),
]
CROWD_CATEGORY_INDEX = 0  # crowds are clusters of small circles
EXIF_ORIENTATION = 0x0112
SPLIT_STREAMS = {"train": 0, "val": 1}  # the random stream of each named split (others follow, by position)
SYNTH_FILE_NAME = re.compile(r"\d{6}\.(?:jpg|png)")  # what render_image names its images: 000042.jpg


@dataclass
class SynthSpec:
    """What to generate. Sizes are in pixels."""

    num_images: int = 2000
    min_size: int = 256  # image short side range
    max_size: int = 512
    max_aspect: float = 2.0  # long/short side up to this
    min_objects: int = 1
    max_objects: int = 8
    min_object_size: float = 12.0  # object diameter range
    max_object_size: float = 0.7  # fraction of the image's short side
    crowd_fraction: float = 0.05
    png_fraction: float = 0.1
    gray_fraction: float = 0.05
    exif_fraction: float = 0.03
    seed: int = 0


def _shape_polygon(kind: str, rng: np.random.Generator) -> Polygon:
    """A unit-sized shape centred on the origin (radius about 1)."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return Polygon(np.stack([np.cos(t), np.sin(t)], 1))
    if kind == "square":
        return Polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if kind == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return Polygon(np.stack([np.cos(t), np.sin(t)], 1))
    if kind == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return Polygon(np.stack([r * np.cos(t), r * np.sin(t)], 1))
    if kind == "cross":
        a, b = 0.3, 1.0
        return Polygon([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                        (-b, -a), (-a, -a)])
    if kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        return Polygon(np.stack([np.cos(t), np.sin(t)], 1))
    if kind == "crescent":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        outer = Polygon(np.stack([np.cos(t), np.sin(t)], 1))
        inner = affinity.translate(outer, 0.45, 0.0)
        return outer.difference(inner)
    if kind == "arrow":
        return Polygon([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(kind)


_UNIT_SHAPES = {name: _shape_polygon(name, np.random.default_rng(0)) for _, name in CATEGORIES}


def _place(kind: str, center: tuple[float, float], size: float, rng: np.random.Generator) -> Polygon:
    shape = _UNIT_SHAPES[kind]
    aspect = rng.uniform(0.75, 1.33) if kind in ("square", "circle", "hexagon") else 1.0
    shape = affinity.scale(shape, xfact=size / 2 * aspect, yfact=size / 2 / aspect, origin=(0, 0))
    shape = affinity.rotate(shape, rng.uniform(0, 360), origin=(0, 0))
    return affinity.translate(shape, *center)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Textured, noisy background: smooth colour field + stripes or checks + pixel noise."""
    low = rng.uniform(40, 215, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 40)
    angle = rng.uniform(0, np.pi)
    kind = rng.integers(3)
    if kind == 0:
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:
        pattern = np.sign(np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period))
    else:
        pattern = np.zeros_like(xx)
    base += pattern[..., None] * rng.uniform(5, 25)
    base += rng.normal(0, rng.uniform(4, 14), size=base.shape).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def _exterior_polygons(geom) -> list[list[float]]:
    """COCO polygons (flat x, y lists) of a shapely geometry's parts."""
    parts = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    out = []
    for part in parts:
        if part.is_empty or part.area < 1.0:
            continue
        coords = np.asarray(orient(part).exterior.coords)[:-1]
        if len(coords) >= 3:
            out.append([round(float(v), 2) for v in coords.reshape(-1)])
    return out


def _has_holes(geom) -> bool:
    parts = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    return any(len(p.interiors) for p in parts if isinstance(p, Polygon))


def _occlude(placed: list, visible: list, covers: list) -> list | None:
    """The visible parts of `placed` once `covers` are drawn on top, or None when that would leave an object
    with a hole (COCO polygons cannot hold one) or less than 30% of it visible."""
    out = []
    for (_, full), vis in zip(placed, visible):
        for cover in covers:
            if vis.intersects(cover):
                vis = vis.difference(cover)
        if _has_holes(vis) or vis.area < 0.3 * full.area:
            return None
        out.append(vis)
    return out


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def render_image(index: int, spec: SynthSpec) -> tuple[Image.Image, dict, list[dict]]:
    """Render image `index`: (RGB image as displayed, image record, annotation records without ids)."""
    rng = np.random.default_rng([spec.seed, index])
    short = int(rng.integers(spec.min_size, spec.max_size + 1))
    long = int(round(short * rng.uniform(1.0, spec.max_aspect)))
    h, w = (short, long) if rng.random() < 0.6 else (long, short)
    canvas = Image.fromarray(_background(h, w, rng))
    draw = ImageDraw.Draw(canvas)

    placed: list[tuple[int, Polygon]] = []  # (category index, full shape), in drawing order
    visible: list = []  # what is still visible of each placed shape
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    max_size = max(spec.max_object_size * min(h, w), 2 * spec.min_object_size)
    for _ in range(n_obj):
        for _attempt in range(10):
            cat = int(rng.integers(len(CATEGORIES)))
            # log-uniform sizes cover COCO's small, medium and large ranges
            size = float(np.exp(rng.uniform(np.log(spec.min_object_size), np.log(max_size))))
            shape = _place(CATEGORIES[cat][1], (rng.uniform(0, w), rng.uniform(0, h)), size, rng)
            update = _occlude(placed, visible, [shape])
            if update is not None:
                placed.append((cat, shape))
                visible = update + [shape]
                break

    crowd = None
    if rng.random() < spec.crowd_fraction:
        # A cluster of small circles painted last and annotated as one crowd region (iscrowd 1, RLE).
        cw, ch = rng.uniform(0.2, 0.35) * w, rng.uniform(0.2, 0.35) * h
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        blobs = [_place("circle", (x0 + rng.uniform(0, cw), y0 + rng.uniform(0, ch)), rng.uniform(6, 12), rng)
                 for _ in range(int(rng.integers(8, 16)))]
        update = _occlude(placed, visible, blobs)
        if update is not None:
            crowd, visible = blobs, update

    image_bounds = Polygon([(0, 0), (w, 0), (w, h), (0, h)])
    annotations = []
    for (cat, shape), vis in zip(placed, visible):
        color = _color(rng)
        draw.polygon([tuple(p) for p in np.asarray(shape.exterior.coords)[:-1]], fill=color,
                     outline=tuple(max(0, c - 60) for c in color))
        polygons = _exterior_polygons(vis.intersection(image_bounds))
        if not polygons:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        area = float(mask_utils.area(rle))
        if area < 4:
            continue
        # The box of the rasterised mask: what is visible, also where sub-pixel tips vanish from the mask.
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        annotations.append({"category_id": CATEGORIES[cat][0], "bbox": bbox,
                            "area": area, "iscrowd": 0, "segmentation": polygons})
    if crowd is not None:
        color = _color(rng)
        for blob in crowd:
            draw.polygon([tuple(p) for p in np.asarray(blob.exterior.coords)[:-1]], fill=color)
        union = MultiPolygon(crowd).buffer(0).intersection(image_bounds)
        rle = mask_utils.merge(mask_utils.frPyObjects(_exterior_polygons(union), h, w))
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append({"category_id": CATEGORIES[CROWD_CATEGORY_INDEX][0], "bbox": [x, y, bw, bh],
                            "area": float(mask_utils.area(rle)), "iscrowd": 1,
                            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=0.6))

    r = rng.random()
    if r < spec.gray_fraction:
        canvas = canvas.convert("L")
    ext = ".png" if rng.random() < spec.png_fraction else ".jpg"
    exif = rng.random() < spec.exif_fraction and ext == ".jpg"
    record = {"width": w, "height": h, "file_name": f"{index:06d}{ext}", "exif_rotated": bool(exif)}
    return canvas, record, annotations


def _write_one(args: tuple[int, SynthSpec, str]) -> tuple[dict, list[dict]]:
    index, spec, image_dir = args
    image, record, anns = render_image(index, spec)
    path = os.path.join(image_dir, record["file_name"])
    if record.pop("exif_rotated"):
        # Stored rotated 90 degrees counter-clockwise with orientation 6 ("rotate 90 CW to display"):
        # a reader that ignores EXIF sees the wrong picture.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif.tobytes())
    elif path.endswith(".png"):
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=92)
    return record, anns


def remove_stale_images(image_dir: str | Path, keep: set[str]) -> list[Path]:
    """Delete the images an earlier generation left in `image_dir` that this one did not write.

    Only files named as `render_image` names them (`000042.jpg`, `000042.png`) are candidates; anything else in the
    folder (and any subfolder) is left alone.

    Args:
        image_dir: one split's image folder.
        keep: the file names just written.

    Returns:
        The removed paths.
    """
    removed = []
    for path in sorted(Path(image_dir).iterdir()):
        if path.name not in keep and SYNTH_FILE_NAME.fullmatch(path.name) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def generate(out_dir: str | Path, splits: dict[str, int] | None = None, *, seed: int = 0, workers: int = 0,
             progress: bool = False, **spec_kwargs) -> dict[str, Path]:
    """Write a synthetic dataset: `out_dir/<split>/` images and `out_dir/annotations/instances_<split>.json`.

    Generating into an existing dataset replaces the splits generated: their images from an earlier run that this
    run did not write (say, image 000150 when a split shrinks to 100, or 000007.jpg that is a PNG this time) are
    deleted (`remove_stale_images`), so that a split folder holds exactly the images of its annotations. Other
    splits and files are not touched.

    Args:
        out_dir: dataset root.
        splits: images per split, e.g. {"train": 2000, "val": 200}; different splits use different seeds.
        seed: the whole output is a pure function of it.
        workers: processes to render with (0: one per core).
        progress: a bar per split on a terminal (see `progress_bar`).
        spec_kwargs: other `SynthSpec` fields (image and object sizes, fractions).

    Returns:
        {split: path of its instances JSON}.
    """
    from ..utils.progress import progress_bar

    splits = splits or {"train": 2000, "val": 200}
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    written = {}
    for position, (split, num) in enumerate(splits.items()):
        # each split's stream follows its name, so that regenerating one split alone makes the same images
        index = SPLIT_STREAMS.get(split, len(SPLIT_STREAMS) + position)
        spec = SynthSpec(num_images=num, seed=seed * 1000 + index, **spec_kwargs)
        image_dir = out_dir / split
        image_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(i, spec, str(image_dir)) for i in range(num)]
        with progress_bar(num, f"synth {split}", enabled=progress, unit="img") as bar:
            if workers > 1 and num > 16:
                with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
                    results = []
                    for result in pool.imap(_write_one, jobs, chunksize=16):  # in order, as map
                        results.append(result)
                        bar.update()
            else:
                results = []
                for job in jobs:
                    results.append(_write_one(job))
                    bar.update()
        remove_stale_images(image_dir, {record["file_name"] for record, _ in results})
        images, annotations = [], []
        for image_id, (record, anns) in enumerate(results, start=1):
            images.append({"id": image_id, **record})
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        data = {
            "info": {"description": f"detkit synthetic dataset ({split}, seed {seed})", "version": "1.0"},
            "images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in CATEGORIES],
        }
        written[split] = write_json_atomic(data, out_dir / "annotations" / f"instances_{split}.json")
    return written
