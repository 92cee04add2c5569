"""One call from a samples file (or array) and a reference to the metrics the papers report.

`evaluate_samples` works with and without a process group: under torchrun every rank calls it, feature extraction
is split over the ranks (see `features`), rank 0 computes the statistics, and every rank returns the same dict.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from dpar_scale.parallel import process_group as pg

from .detectors import FeatureDetector, load_detector
from .features import Features, extract_features, full_fp32, group_rank
from .reference import ReferenceStats, reference_statistics
from .sources import EvaluationError, ImageSource, open_images
from .statistics import class_accuracy, fid_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["compute_metrics", "evaluate_samples", "format_table"]


def compute_metrics(samples: Features, reference: ReferenceStats, detector: FeatureDetector,
                    labels: np.ndarray | None = None, split_size: int = 5000, k: int = 3, chunk: int = 10000,
                    device: torch.device | str = "cpu") -> dict:
    """The metrics of extracted sample features against reference statistics (one process, no collectives)."""
    device = torch.device(device)
    mu, sigma = fid_statistics(samples.features, device)
    if reference.mu.shape != mu.shape:
        raise EvaluationError(f"the reference statistics are {reference.mu.shape[0]}-d but {detector.path} gives "
                              f"{mu.shape[0]}-d features: precomputed mu / sigma only fit the detector they were "
                              f"made with (Inception pool features are 2048-d)")
    out: dict = {detector.fid_key: frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if detector.kind == "inception" and samples.probs is not None:
        score, std, splits = inception_score(samples.probs, split_size)
        out.update(inception_score=score, inception_score_std=std, inception_score_splits=splits)
    n_s, n_r = samples.features.shape[0], reference.features.shape[0]
    if min(n_s, n_r) > k:
        with full_fp32(device):
            out["precision"], out["recall"] = precision_recall(reference.features, samples.features, k, chunk, device)
    else:  # a k-th neighbour needs k + 1 points
        out["precision"] = out["recall"] = None
    if detector.kind == "domain" and labels is not None and samples.probs is not None:
        out["class_accuracy"] = class_accuracy(samples.probs, labels)
    out.update(num_samples=n_s, num_reference=n_r, reference_statistics=reference.source,
               reference_cache=reference.cache, reference_from_cache=reference.from_cache,
               detector=detector.describe())
    return out


def evaluate_samples(samples, reference, detector, *, labels=None, batch_size: int = 64,
                     device: torch.device | str | None = None, use_cache: bool = True, cache_dir: str | None = None,
                     split_size: int = 5000, k: int = 3, chunk: int = 10000, progress: bool = True) -> dict:
    """FID (or FID-domain), IS, precision, recall [, class accuracy] of `samples` against `reference`.

    samples:   path of an ADM-layout npz (`arr_0` uint8 [N, H, W, 3], optional `labels`), a uint8 array / CPU
               tensor [N, H, W, 3] (the same full array on every rank), or an ImageSource.
    reference: an ADM reference batch npz (`arr_0`, and `mu` / `sigma` when present: FID uses them), another
               samples npz, an ImageFolder (centre-cropped to the samples' size), an array, or an ImageSource.
    detector:  'inception:PATH', 'domain:PATH', or a FeatureDetector.
    labels:    int [N] class of each sample (default: the samples file's `labels`); gives class_accuracy with a
               domain detector.
    Returns the same dict on every rank; see `compute_metrics` for the keys, plus samples / reference / seconds.
    """
    start = time.perf_counter()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    sample_source = open_images(samples, what="samples")
    h, w = sample_source.shape[1:3]
    if h != w and isinstance(reference, (str, os.PathLike)) and os.path.isdir(reference):
        raise EvaluationError(f"{reference}: an ImageFolder reference is centre-cropped to square images, but the "
                              f"samples are {h}x{w}; give a reference npz of the samples' shape instead")
    ref_source = open_images(reference, image_size=h, what="reference")
    if labels is None:
        labels = sample_source.labels
    elif len(labels) != len(sample_source):
        raise EvaluationError(f"{len(labels)} labels for {len(sample_source)} samples")
    det = load_detector(detector, device)
    ref_stats = reference_statistics(ref_source, det, batch_size, device, use_cache, cache_dir, progress)
    feats = extract_features(sample_source, det, batch_size, device, need_probs=True, progress=progress,
                             desc="sample features")
    result = None
    rank, world = group_rank()
    if rank == 0:
        try:
            result = compute_metrics(feats, ref_stats, det, None if labels is None else np.asarray(labels),
                                     split_size, k, chunk, device)
        except EvaluationError as e:  # every rank raises it, instead of the others waiting forever
            result = {"error": str(e)}
        else:
            result.update(samples=_describe(samples, sample_source), reference=_describe(reference, ref_source),
                          world_size=world, seconds=round(time.perf_counter() - start, 3))
    result = pg.broadcast_object(result)
    if set(result) == {"error"}:
        raise EvaluationError(result["error"])
    return result


def _describe(given, source: ImageSource) -> str:
    return str(given) if isinstance(given, (str, bytes)) or hasattr(given, "__fspath__") else source.name


def format_table(result: dict) -> str:
    """A small two-column table of the headline numbers."""
    fid_name = "FID-domain" if "fid_domain" in result else "FID"
    rows = [(fid_name, result.get("fid_domain", result.get("fid")))]
    if "inception_score" in result:
        rows.append(("Inception Score", f"{result['inception_score']:.2f} ± {result['inception_score_std']:.2f} "
                                        f"({result['inception_score_splits']} splits)"))
    for key, name in (("precision", "Precision"), ("recall", "Recall"), ("class_accuracy", "Class accuracy")):
        if key in result:
            rows.append((name, "n/a (needs > 3 images per set)" if result[key] is None else result[key]))
    rows += [("samples", f"{result['num_samples']:,}"), ("reference", f"{result['num_reference']:,}"),
             ("reference mu/sigma", result["reference_statistics"]),
             ("detector", f"{result['detector']['kind']} {result['detector']['path']} "
                          f"(sha256 {result['detector']['sha256'][:12]})")]
    width = max(len(name) for name, _ in rows)
    fmt = [f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
           for name, value in rows]
    return "\n".join(fmt)
