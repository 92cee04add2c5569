"""Evaluation: the metrics the papers report (FID, Inception Score, precision / recall as in ADM's evaluator) and
their domain variants (FID-domain, class accuracy) for data that has no Inception.

Rooms: `sources` (samples / reference images from an npz, an array or an ImageFolder), `detectors` (the
TorchScript Inception detector and the domain classifier behind one interface), `features` (batched extraction,
split over ranks), `statistics` (the formulas, on features), `reference` (reference statistics and their cache),
`evaluate` (`evaluate_samples`: one call from a samples file to the metrics).

May import: models, data, parallel, config. Never train or launch (the trainer calls in here, not the reverse).
"""
from dpar_scale.evaluation.detectors import (
    DomainDetector, FeatureDetector, InceptionDetector, load_detector, parse_detector_spec,
)
from dpar_scale.evaluation.evaluate import compute_metrics, evaluate_samples, format_table
from dpar_scale.evaluation.features import Features, extract_features
from dpar_scale.evaluation.reference import ReferenceStats, reference_statistics
from dpar_scale.evaluation.sources import EvaluationError, ImageSource, open_images
from dpar_scale.evaluation.statistics import (
    class_accuracy, fid_statistics, frechet_distance, inception_score, manifold_radii, precision_recall,
)

__all__ = ["DomainDetector", "EvaluationError", "FeatureDetector", "Features", "ImageSource", "InceptionDetector",
           "ReferenceStats", "class_accuracy", "compute_metrics", "evaluate_samples", "extract_features",
           "fid_statistics", "format_table", "frechet_distance", "inception_score", "load_detector",
           "manifold_radii", "open_images", "parse_detector_spec", "precision_recall", "reference_statistics"]
