"""Datasets, samplers and DataLoaders: decode and augment in workers, deterministic per seed, epoch and sample.

All training randomness comes from the batch sampler: it shuffles each epoch with (seed, epoch) and gives every
sample its own seed derived from (seed, epoch, position in the epoch). Augmentations therefore do not depend on the
number of workers, on which worker ran them, or on how a step's images are split over ranks and micro-batches, and a
run can resume at any step by skipping ahead.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import math
import random
import signal
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config.load import ConfigError
from ..config.schema import DataConfig
from .coco import CocoDataset, DatasetError
from .image_io import ImageDecodeError, read_annotated_image
from .transforms import Sample, TransformPipeline

logger = logging.getLogger(__name__)


class SampleError(ImageDecodeError):
    """An image decoded, but its annotations cannot become a sample (a mask pycocotools cannot decode)."""


@dataclass
class ImageMeta:
    index: int  # position in the CocoDataset
    image_id: int  # the COCO image id
    orig_size: tuple[int, int]  # (height, width) as annotated
    affine: tuple[float, float, float, float]  # original -> network pixel coordinates
    # (image_id, file_name, reason) of each image passed over to reach this one, because it could not be used
    skipped: list = field(default_factory=list)


@dataclass
class Targets:
    """Ground truth of one image in network pixel coordinates."""

    boxes: torch.Tensor  # (N, 4) float32 xyxy
    labels: torch.Tensor  # (N,) int64, contiguous 0..K-1
    ignore_boxes: torch.Tensor  # (M, 4) float32 xyxy, crowd regions
    masks: list | None = None  # N entries: polygons (list of float32 arrays) or (H, W) uint8 bitmaps

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Targets":
        return Targets(self.boxes.to(device, non_blocking=non_blocking),
                       self.labels.to(device, non_blocking=non_blocking),
                       self.ignore_boxes.to(device, non_blocking=non_blocking), self.masks)

    def pin_memory(self) -> "Targets":
        return Targets(self.boxes.pin_memory(), self.labels.pin_memory(), self.ignore_boxes.pin_memory(), self.masks)


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, H, W) uint8 RGB, zero-padded bottom/right
    image_sizes: torch.Tensor  # (N, 2) int64 (height, width) before padding
    targets: list  # N Targets
    metas: list  # N ImageMeta
    # (N,) float32 network pixels per original pixel, sqrt(|ax * ay|) of each meta's affine: sqrt(w * h) of a box
    # in the network divided by it is the box's sqrt(w * h) in the original image (TridentNet's size ranges)
    image_scales: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def skipped(self) -> list:
        """(image_id, file_name, reason) of every image skipped while loading this batch (the metas' `skipped`)."""
        return [entry for meta in self.metas for entry in meta.skipped]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return dataclasses.replace(
            self, images=self.images.to(device, non_blocking=non_blocking),
            image_sizes=self.image_sizes.to(device, non_blocking=non_blocking),
            targets=[t.to(device, non_blocking) for t in self.targets],
            image_scales=None if self.image_scales is None else self.image_scales.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return dataclasses.replace(
            self, images=self.images.pin_memory(), image_sizes=self.image_sizes.pin_memory(),
            targets=[t.pin_memory() for t in self.targets],
            image_scales=None if self.image_scales is None else self.image_scales.pin_memory())


class DetectionDataset(Dataset):
    """A `CocoDataset` whose items are decoded, transformed samples.

    Items are addressed by (index, sample_seed). An image that cannot be used (an unreadable file, a mask that
    cannot be decoded) is logged, recorded in the item's `ImageMeta.skipped`, and replaced by the next usable image
    in index order, so a bad file never kills a worker and the substitute depends on the key alone (resume stays
    exact).
    """

    def __init__(self, coco: CocoDataset, transform: TransformPipeline, *, load_masks: bool = False,
                 max_image_pixels: int = 178_956_970):
        self.coco = coco
        self.transform = transform
        self.load_masks = load_masks and coco.segmentations is not None
        self.max_image_pixels = max_image_pixels
        self._bad: dict[int, str] = {}  # index -> reason, of images this process failed to load: not decoded again

    def __len__(self) -> int:
        return len(self.coco)

    def load_sample(self, index: int) -> Sample:
        """Decode image `index` with its annotations, untransformed."""
        coco = self.coco
        path = coco.image_path(index)
        image = read_annotated_image(path, (int(coco.widths[index]), int(coco.heights[index])),
                                     self.max_image_pixels)
        rows = coco.annotation_slice(index)
        crowd = coco.is_crowd[rows]
        boxes = coco.boxes[rows]
        masks = None
        if self.load_masks:
            from pycocotools import mask as mask_utils

            segs = coco.segmentations
            masks = []
            for a in (np.flatnonzero(~crowd) + rows.start).tolist():
                rle = segs.rle(a)
                if rle is None:
                    masks.append(segs.polygons(a))
                    continue
                try:
                    mask = mask_utils.decode(rle)
                except (ValueError, TypeError, KeyError, OverflowError, MemoryError) as exc:
                    raise SampleError(path, f"mask of annotation {coco.ann_ids[a]} cannot be decoded ({exc})") \
                        from None
                if mask.shape != (image.height, image.width):
                    raise SampleError(path, f"mask of annotation {coco.ann_ids[a]} is {mask.shape[1]}x"
                                            f"{mask.shape[0]}, the image {image.width}x{image.height}")
                masks.append(mask)
        return Sample(image=image, boxes=boxes[~crowd], labels=coco.labels[rows][~crowd],
                      ignore_boxes=boxes[crowd], masks=masks)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Sample, ImageMeta]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        skipped = []
        # Walk forward to the first usable image; its sample keeps the key's seed. Only a dataset where every
        # image fails stops here.
        for _ in range(len(self)):
            reason = self._bad.get(index)
            if reason is None:
                try:
                    sample = self.load_sample(index)
                    break
                except ImageDecodeError as exc:
                    # a worker process would write across the main process's progress bar: there the main
                    # process says it, from the batch's `skipped` (`report_skipped`)
                    in_worker = torch.utils.data.get_worker_info() is not None
                    logger.log(logging.DEBUG if in_worker else logging.WARNING,
                               "skipping unreadable image (%s); using the next image instead", exc)
                    reason = self._bad[index] = exc.reason
            skipped.append((int(self.coco.image_ids[index]), str(self.coco.file_names[index]), reason))
            index = (index + 1) % len(self)
        else:
            raise DatasetError(f"none of the {len(self)} images in {self.coco.image_root} could be used, e.g. "
                               f"{self.coco.image_path(index)}: {self._bad.get(index)}. Run `detkit check-data "
                               f"--decode` on this dataset.")
        rng = np.random.default_rng(seed) if self.transform.train else None
        sample = self.transform(sample, rng)
        meta = ImageMeta(index=index, image_id=int(self.coco.image_ids[index]),
                         orig_size=(int(self.coco.heights[index]), int(self.coco.widths[index])),
                         affine=sample.affine, skipped=skipped)
        return sample, meta


def report_skipped(batch: Batch, num_workers: int) -> None:
    """Log the images that the workers of a loader with `num_workers` skipped to make `batch` (a loader without
    workers logged them as it skipped them), in the main process, where log lines print above a progress bar."""
    if num_workers > 0:
        for image_id, file_name, reason in batch.skipped:
            logger.warning("skipping unreadable image %s (id %d: %s); using the next image instead", file_name,
                           image_id, reason)


def collate(items: Sequence[tuple[Sample, ImageMeta]], size_divisibility: int = 32,
            fixed_size: tuple[int, int] | None = None) -> Batch:
    """Pad images into one uint8 tensor (to `fixed_size`, or to the largest rounded up to the divisibility)."""
    sizes = [s.size for s, _ in items]
    if fixed_size is not None:
        pad_h, pad_w = fixed_size
    else:
        d = size_divisibility
        pad_h = -(-max(h for h, _ in sizes) // d) * d
        pad_w = -(-max(w for _, w in sizes) // d) * d
    images = torch.zeros((len(items), 3, pad_h, pad_w), dtype=torch.uint8)
    targets = []
    for i, (sample, _) in enumerate(items):
        h, w = sample.size
        # (H, W, 3) -> (3, H, W)
        images[i, :, :h, :w] = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)
        targets.append(Targets(boxes=torch.from_numpy(np.ascontiguousarray(sample.boxes, np.float32)).reshape(-1, 4),
                               labels=torch.from_numpy(np.ascontiguousarray(sample.labels, np.int64)),
                               ignore_boxes=torch.from_numpy(
                                   np.ascontiguousarray(sample.ignore_boxes, np.float32)).reshape(-1, 4),
                               masks=sample.masks))
    scales = [math.sqrt(abs(m.affine[0] * m.affine[2])) for _, m in items]
    return Batch(images=images, image_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
                 targets=targets, metas=[m for _, m in items], image_scales=torch.tensor(scales, dtype=torch.float32))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample, hashed from (run seed, epoch, 0, position).

    `position` is the place in the whole epoch's permutation, so that a sample's seed does not depend on how a step
    batch is split over ranks and micro-batches. The 0 (once a rank) keeps the seeds of earlier runs.
    """
    return int(np.random.SeedSequence([seed, epoch, 0, position]).generate_state(1)[0])


def stream_state(seed: int, step_batch: int, steps_consumed: int) -> dict:
    """The training stream's position after `steps_consumed` optimiser steps, in the checkpoint's `data` format."""
    return {"scheme": 2, "seed": seed, "step_batch": step_batch, "steps_consumed": int(steps_consumed)}


class TrainBatchSampler(Sampler):
    """An endless stream of one rank's training micro-batches of (index, sample_seed) keys.

    Each epoch is a permutation drawn from (seed, epoch). Consecutive keys form step batches of
    `batch_size * world_size * accumulate` keys: what one optimiser step sees over all ranks and micro-batches.
    Micro-batch m of a step goes to rank r as the slice [(m * world_size + r) * batch_size, +batch_size). Seeds
    come from the position in the epoch, so one process with batch 4, two ranks with batch 2, and accumulate 2
    with batch 2 train on the same images with the same augmentations. With aspect-ratio grouping, a step batch
    holds only landscape or only portrait images; a group's leftovers carry over into the next epoch. With one
    rank and no accumulation a step batch is a batch, and the stream is the one detkit has always produced.

    Args:
        num_items: the number of images.
        batch_size: images per rank and micro-batch.
        seed: the run seed; shuffle: a new permutation every epoch (otherwise in order).
        group_ids: (num_items,) group of each image (0 landscape, 1 portrait), or None for no grouping.
        rank, world_size: this process and the number of processes.
        accumulate: micro-batches per optimiser step.
        start_step: optimiser steps already trained on (resume); they are skipped without computing seeds.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_ids: np.ndarray | None = None, rank: int = 0, world_size: int = 1, accumulate: int = 1,
                 start_step: int = 0):
        if num_items <= 0:
            raise ValueError("the training set is empty: nothing to sample (see `detkit check-data`)")
        if min(batch_size, world_size, accumulate) < 1 or not 0 <= rank < world_size or start_step < 0:
            raise ValueError(f"invalid sampler split: batch_size {batch_size}, rank {rank} of {world_size}, "
                             f"accumulate {accumulate}, start_step {start_step}")
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.group_ids = None if group_ids is None else np.asarray(group_ids).astype(np.int64)
        self.rank, self.world_size, self.accumulate, self.start_step = rank, world_size, accumulate, start_step
        self.step_batch = batch_size * world_size * accumulate

    def state(self, steps_consumed: int) -> dict:
        """The data position after `steps_consumed` optimiser steps, in the checkpoint's `data` format."""
        return stream_state(self.seed, self.step_batch, steps_consumed)

    def _step_batches(self) -> Iterator[list[tuple[int, int, int]]]:
        """Endless step batches of (index, epoch, position in the epoch's permutation) keys."""
        buckets: dict[int, list] = {}
        epoch = 0
        while True:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                order = np.arange(self.num_items)
            groups = [0] * self.num_items if self.group_ids is None else self.group_ids[order].tolist()
            for position, (index, group) in enumerate(zip(order.tolist(), groups)):
                bucket = buckets.setdefault(group, [])
                bucket.append((index, epoch, position))
                if len(bucket) == self.step_batch:
                    yield bucket
                    buckets[group] = []
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        size = self.batch_size
        # resume: the same stream minus the steps already trained on; their seeds are never computed
        for step in itertools.islice(self._step_batches(), self.start_step, None):
            for m in range(self.accumulate):
                start = (m * self.world_size + self.rank) * size
                yield [(index, sample_seed(self.seed, epoch, position))
                       for index, epoch, position in step[start:start + size]]


class InferenceBatchSampler(Sampler):
    """Every image once, in order (this rank's share: every world_size-th image)."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_items, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield [(idx, 0) for idx in self.indices[i:i + self.batch_size]]


def seed_worker(worker_id: int) -> None:
    """Seed Python and NumPy in a worker from the loader's per-epoch base seed, and make it ignore SIGTERM/SIGUSR1.

    A signal sent to the whole process group (SLURM, torchrun) would otherwise kill the workers first, and the main
    process would fail with "DataLoader worker killed by signal" before it could save a checkpoint and stop.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class DetectionLoader(DataLoader):
    """A DataLoader whose worker processes always end: on `close()`, and at the latest when the interpreter exits.

    The workers ignore SIGTERM (see `seed_worker`), so multiprocessing's exit handler, which sends them SIGTERM and
    waits for them, would wait forever for the persistent workers of a loader still referenced at exit. Every
    iterator with workers is tracked, and `shutdown_loaders` (registered with atexit after multiprocessing's
    handler, so it runs first) asks each one's workers to finish and joins them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._worker_iterators: weakref.WeakSet = weakref.WeakSet()

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(iterator)
            self._worker_iterators.add(iterator)
        return iterator

    def close(self) -> None:
        """Stop this loader's worker processes now (iterating again starts new ones)."""
        for iterator in list(self._worker_iterators):
            _shutdown_iterator(iterator)
        self._worker_iterators = weakref.WeakSet()
        self._iterator = None  # the persistent workers' iterator, which DataLoader would reuse

    def __enter__(self) -> "DetectionLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _shutdown_iterator(iterator) -> None:
    _LIVE_ITERATORS.discard(iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def shutdown_loaders() -> None:
    """Stop the worker processes of every loader iterator still alive in this process."""
    for iterator in list(_LIVE_ITERATORS):
        _shutdown_iterator(iterator)


# atexit runs its handlers last-registered first: this one before multiprocessing's, which joins the workers
atexit.register(shutdown_loaders)


def build_dataset(cfg: DataConfig, split: str) -> DetectionDataset:
    """The `train` or `val` split of `cfg` as a DetectionDataset (the reader's report is on `.coco.report`)."""
    ds_cfg = cfg.train if split == "train" else cfg.val
    if not ds_cfg.annotations:
        raise ConfigError(f"data.{split}.annotations is not set")
    train = split == "train"
    coco = CocoDataset.load(ds_cfg.annotations, ds_cfg.images, filter_empty=train and cfg.filter_empty,
                            load_masks=cfg.load_masks, min_box_size=cfg.min_box_size, on_invalid=cfg.on_invalid)
    transform = TransformPipeline(cfg.train_transform if train else cfg.test_transform, train=train,
                                  min_box_size=cfg.min_box_size)
    return DetectionDataset(coco, transform, load_masks=cfg.load_masks, max_image_pixels=cfg.max_image_pixels)


def _loader(dataset: DetectionDataset, batch_sampler: Sampler, cfg: DataConfig, seed: int,
            pin_memory: bool) -> DetectionLoader:
    t = dataset.transform
    workers = cfg.num_workers
    return DetectionLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=partial(collate, size_divisibility=t.cfg.size_divisibility, fixed_size=t.fixed_size),
                      pin_memory=pin_memory, worker_init_fn=seed_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def build_train_loader(dataset: DetectionDataset, cfg: DataConfig, *, seed: int = 0, rank: int = 0,
                       world_size: int = 1, accumulate: int = 1, start_step: int = 0,
                       pin_memory: bool = False) -> DetectionLoader:
    """An endless loader of this rank's training micro-batches (`Batch`es of cfg.batch_size images).

    One optimiser step consumes `accumulate` of them; `start_step` optimiser steps are skipped (resume). The
    sampler (`loader.batch_sampler`, a TrainBatchSampler) gives the checkpoint's data position with `.state(n)`.
    """
    groups = (dataset.coco.aspect_ratios < 1).astype(np.int64) if cfg.aspect_ratio_grouping else None
    sampler = TrainBatchSampler(len(dataset), cfg.batch_size, seed=seed, group_ids=groups, rank=rank,
                                world_size=world_size, accumulate=accumulate, start_step=start_step)
    return _loader(dataset, sampler, cfg, seed, pin_memory)


def build_test_loader(dataset: DetectionDataset, cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> DetectionLoader:
    """Every image once, in order, in batches of cfg.test_batch_size."""
    sampler = InferenceBatchSampler(len(dataset), cfg.test_batch_size, rank, world_size)
    return _loader(dataset, sampler, cfg, 0, pin_memory)
