"""COCO-format data: reading and validation, synthetic data, decoding, transforms and loaders."""
from .coco import CocoDataset, DataReport, DatasetError
from .image_io import ImageDecodeError, read_image
from .loader import Batch, DetectionDataset, Targets, build_dataset, build_test_loader, build_train_loader
from .transforms import Sample, TransformPipeline, boxes_to_original, normalize

__all__ = ["Batch", "CocoDataset", "DataReport", "DatasetError", "DetectionDataset", "ImageDecodeError", "Sample",
           "Targets", "TransformPipeline", "boxes_to_original", "build_dataset", "build_test_loader",
           "build_train_loader", "normalize", "read_image"]
