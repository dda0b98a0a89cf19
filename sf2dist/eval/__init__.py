"""Evaluation: verification pair sets, IJB-style templates, metrics, extraction and reports.

Modules: `bin_io` (safe `.bin` and pair-list loading), `metrics` (10-fold accuracy, exact
ROC, TAR@FAR, EER, AUC), `ijb` (template pooling, 1:1 and 1:N), `extract` (flip-fused
embeddings across ranks), `evaluate` (model + benchmark -> numbers), `results` (table,
JSON, ROC plot), `checkpoint` (backbones from checkpoints) and `cli` (`sf2dist-eval`).
"""
from sf2dist.eval.bin_io import (
    BenchmarkFormatError,
    PairSet,
    UnsafePickleError,
    load_bin,
    load_pair_list,
    load_pairs,
)
from sf2dist.eval.checkpoint import CheckpointError, build_backbone, load_backbone, newest_checkpoint, read_checkpoint
from sf2dist.eval.evaluate import BenchmarkResult, ExtractOptions, evaluate_benchmark, evaluate_pairs
from sf2dist.eval.extract import extract_embeddings, image_slice
from sf2dist.eval.ijb import (
    IJBImages,
    IJBProtocol,
    TemplateSubjects,
    align_face,
    identification_metrics,
    ijb_metrics,
    load_ijb,
    pool_templates,
    similarity_transform,
    template_pair_scores,
)
from sf2dist.eval.metrics import (
    DISTANCE_THRESHOLDS,
    FAR_TARGETS,
    Roc,
    best_accuracy,
    cosine_scores,
    equal_error_rate,
    kfold_accuracy,
    pair_metrics,
    roc_auc,
    roc_curve,
    roc_summary,
    squared_distances,
    tar_at_far,
    verification_accuracy,
)
from sf2dist.eval.results import format_table, plot_roc, write_results

__all__ = [
    "BenchmarkFormatError",
    "BenchmarkResult",
    "CheckpointError",
    "DISTANCE_THRESHOLDS",
    "ExtractOptions",
    "FAR_TARGETS",
    "IJBImages",
    "IJBProtocol",
    "PairSet",
    "Roc",
    "TemplateSubjects",
    "UnsafePickleError",
    "align_face",
    "best_accuracy",
    "build_backbone",
    "cosine_scores",
    "equal_error_rate",
    "evaluate_benchmark",
    "evaluate_pairs",
    "extract_embeddings",
    "format_table",
    "identification_metrics",
    "ijb_metrics",
    "image_slice",
    "kfold_accuracy",
    "load_backbone",
    "load_bin",
    "load_ijb",
    "load_pair_list",
    "load_pairs",
    "newest_checkpoint",
    "pair_metrics",
    "plot_roc",
    "pool_templates",
    "read_checkpoint",
    "roc_auc",
    "roc_curve",
    "roc_summary",
    "similarity_transform",
    "squared_distances",
    "tar_at_far",
    "template_pair_scores",
    "verification_accuracy",
    "write_results",
]
