"""Evaluation metrics on precomputed embeddings: zero-shot classification, retrieval, VQA.

Pure torch; metric names and conventions follow CLIP_benchmark (and DataComp for mean_recall@1).
"""

from .retrieval import retrieval_metrics
from .vqa import vqa_accuracy
from .zeroshot import build_classifier, classification_metrics, zero_shot_classification

__all__ = ["build_classifier", "classification_metrics", "zero_shot_classification",
           "retrieval_metrics", "vqa_accuracy"]
