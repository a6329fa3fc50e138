"""The run-level record of what training left out: records the reader dropped and images that failed to load."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .coco import DataReport
from ..utils.fileio import write_json_atomic


class SkipLedger:
    """Collects the reader's reports and the loader's skips of one training run, for `data_report.json`.

    Reader reports list every dropped, clipped or rejected record. Loader skips (`Batch.skipped`) arrive once per
    time a bad image is drawn; the ledger keeps one entry per image id with the number of times it was skipped.

    Args:
        num_images: images in the training set as read (the share of unreadable ones is taken of this).
    """

    def __init__(self, num_images: int):
        self.num_images = int(num_images)
        self.reports: list[DataReport] = []
        self.unreadable: dict[int, dict] = {}  # image_id -> {"image_id", "file_name", "reason", "count"}

    def add_report(self, report: DataReport) -> None:
        """Add a reader's report (its `items` are written out in full)."""
        self.reports.append(report)

    def add_skipped(self, entries: Iterable[tuple[int, str, str]]) -> None:
        """Add loader skips: (image_id, file_name, reason) tuples, as in `Batch.skipped`."""
        for image_id, file_name, reason in entries:
            entry = self.unreadable.get(int(image_id))
            if entry is None:
                self.unreadable[int(image_id)] = {"image_id": int(image_id), "file_name": str(file_name),
                                                  "reason": str(reason), "count": 1}
            else:
                entry["count"] += 1

    def state(self) -> list[dict]:
        """The loader skips as plain values, for a checkpoint: one {"image_id", "file_name", "reason", "count"}
        per unreadable image, by image id."""
        return [dict(self.unreadable[k]) for k in sorted(self.unreadable)]

    def restore(self, entries: Iterable[dict]) -> None:
        """Add loader skips saved by `state` (this or another ledger's), adding up the counts of shared images."""
        for entry in entries:
            image_id = int(entry["image_id"])
            mine = self.unreadable.setdefault(image_id, {"image_id": image_id, "file_name": str(entry["file_name"]),
                                                         "reason": str(entry["reason"]), "count": 0})
            mine["count"] += int(entry["count"])

    @property
    def num_unreadable_images(self) -> int:
        """Distinct images the loader had to skip."""
        return len(self.unreadable)

    def too_many(self, fraction: float) -> bool:
        """True when more than `fraction` of the training images could not be loaded (data.max_unreadable_fraction)."""
        return self.num_unreadable_images > fraction * self.num_images

    def _counts(self) -> dict[str, int]:
        """Records left out as invalid (repairs and images without objects are not): images, annotations, files."""
        images = annotations = 0
        for report in self.reports:
            invalid = report.invalid_counts()
            images += invalid["images"]
            annotations += invalid["annotations"]
        return {"images": images, "annotations": annotations, "files": self.num_unreadable_images}

    def to_dict(self) -> dict:
        """JSON-ready: the skipped counts, each reader report with every item, and each unreadable image."""
        return {"num_images": self.num_images, "skipped": self._counts(),
                "datasets": [report.to_dict() for report in self.reports],
                "unreadable_images": self.state()}

    def write(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON at `path`, atomically (readers never see half a report)."""
        return write_json_atomic(self.to_dict(), path)

    def summary(self, path: str | Path = "data_report.json") -> str:
        """One line for the log, e.g. 'skipped 3 images, 7 annotations, 2 files: see data_report.json'."""
        parts = [f"{n:,} {name if n != 1 else name[:-1]}" for name, n in self._counts().items()]
        return f"skipped {', '.join(parts)}: see {path}"
