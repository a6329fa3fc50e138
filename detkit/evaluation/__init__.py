"""COCO evaluation (pycocotools) and its reports."""
from .coco_eval import EvalResult, ResultsError, evaluate, plot_per_category, plot_precision_recall, save_evaluation

__all__ = ["EvalResult", "ResultsError", "evaluate", "plot_per_category", "plot_precision_recall",
           "save_evaluation"]
