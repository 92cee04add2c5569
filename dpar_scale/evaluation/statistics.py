"""The statistics of ADM's evaluator (guided-diffusion evaluations/evaluator.py, the one behind the DPAR and
LlamaGen tables), on features that were already extracted.

* FID: mean and covariance (N - 1) of each feature set in float64; d = |mu1 - mu2|^2 + tr(S1) + tr(S2)
  - 2 tr(sqrtm(S1 S2)) with scipy.linalg.sqrtm; when the square root is not finite (a singular product) it is
  retried with 1e-6 added to both diagonals; a complex result keeps its real part (an imaginary diagonal above
  1e-3 is an error).
* Inception Score: splits of `split_size` (5,000) consecutive samples in file order, i.e. rows [0, 5000),
  [5000, 10000), ..., the last one shorter when N is not a multiple (ADM's `range(0, N, split_size)`); per split
  exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean; the mean (and std) over splits.
* Precision / recall (Kynkaennimi et al. 2019, k = 3): each point's radius is the squared distance to its k-th
  nearest neighbour in its own set (self excluded: the (k+1)-th smallest distance, self included at 0);
  precision = fraction of samples within the radius of some reference point (<=), recall = fraction of reference
  points within the radius of some sample. Distances are computed in blocks, so 50k x 50k never builds the full
  matrix.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

__all__ = ["class_accuracy", "fid_statistics", "frechet_distance", "inception_score", "manifold_radii",
           "precision_recall"]


def fid_statistics(features: np.ndarray, device: torch.device | str = "cpu",
                   chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance with N - 1 [F, F]) in float64, two passes over row chunks (centred, like np.cov)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {n}")
    device = torch.device(device)
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
    for i in range(0, n, chunk):
        total += torch.from_numpy(features[i:i + chunk]).to(device, torch.float64).sum(0)
    mu = total / n
    scatter = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=device)
    for i in range(0, n, chunk):
        x = torch.from_numpy(features[i:i + chunk]).to(device, torch.float64) - mu
        scatter += x.T @ x
    return mu.cpu().numpy(), (scatter / (n - 1)).cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM computes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (features of different detectors?)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the covariance product is singular; adding {eps} to both diagonals (as ADM does)")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> tuple[float, float, int]:
    """(mean, std over splits, number of splits) of exp(E_x KL(p(y|x) || p(y))), splits in file order.

    0 * log 0 counts as 0 (ADM's np.log would give NaN for an exact zero probability; Inception's softmax in
    float32 essentially never produces one)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(0, probs.shape[0], split_size):
        part = probs[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores)), len(scores)


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] via |a|^2 - 2 a.b + |b|^2, clamped at 0 (as ADM).

    One matrix product into the |b|^2 row, then in place: a [10k, 10k] block is 400 MB, and building it from three
    temporaries took 3.5x as long on CPU (4.1 s against 1.2 s, one thread)."""
    d = torch.addmm((b * b).sum(1)[None], a, b.T, alpha=-2)
    return d.add_((a * a).sum(1, keepdim=True)).clamp_min_(0)


def _blocks(features: np.ndarray, chunk: int, device: torch.device):
    for i in range(0, features.shape[0], chunk):
        yield i, torch.from_numpy(np.ascontiguousarray(features[i:i + chunk])).to(device, torch.float32)


def manifold_radii(features: np.ndarray, k: int = 3, chunk: int = 10000,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """float32 [N]: squared distance of each point to its k-th nearest other point of the same set."""
    device = torch.device(device)
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} points per set, got {n}")
    radii = np.empty(n, dtype=np.float32)
    for i, rows in _blocks(features, chunk, device):
        best = None  # the k+1 smallest distances of each row so far (self, at ~0, included)
        for _, cols in _blocks(features, chunk, device):
            d = _sq_distances(rows, cols)
            d = torch.cat([best, d], 1) if best is not None else d
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[i:i + rows.shape[0]] = best[:, k].cpu().numpy()
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, chunk: int = 10000,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` by k-NN manifolds (ADM's definition)."""
    device = torch.device(device)
    ref_radii = torch.from_numpy(manifold_radii(reference, k, chunk, device)).to(device)
    sample_radii = torch.from_numpy(manifold_radii(samples, k, chunk, device)).to(device)
    sample_in = torch.zeros(samples.shape[0], dtype=torch.bool, device=device)   # inside some reference ball
    ref_in = torch.zeros(reference.shape[0], dtype=torch.bool, device=device)     # inside some sample ball
    for i, s in _blocks(samples, chunk, device):
        for j, r in _blocks(reference, chunk, device):
            d = _sq_distances(s, r)
            sample_in[i:i + s.shape[0]] |= (d <= ref_radii[None, j:j + r.shape[0]]).any(1)
            ref_in[j:j + r.shape[0]] |= (d <= sample_radii[i:i + s.shape[0], None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose most probable class is their label."""
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"{probs.shape[0]} predictions for {labels.shape[0]} labels")
    return float((np.asarray(probs).argmax(1) == np.asarray(labels)).mean())
