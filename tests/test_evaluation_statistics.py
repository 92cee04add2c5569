"""Evaluation statistics: ADM's FID, Inception Score and precision / recall against independent formulas (numpy +
scipy, written here; tests/test_evaluation.py reuses them for tools/evaluate.py) and constructed answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from dpar_scale.evaluation import fid_statistics, frechet_distance, inception_score, manifold_radii, precision_recall


# ---- independent ADM formulas (numpy + scipy, written here) ----

def fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def is_reference(p: np.ndarray, split: int) -> float:
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split].astype(np.float64)
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ---- FID ----

def test_fid_equals_independent_formula_and_is_zero_against_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)).astype(np.float32)
    b = (rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) * 0.7 + 0.3).astype(np.float32)
    mu_a, sig_a = fid_statistics(a, chunk=64)  # chunked two-pass sums == np.cov
    np.testing.assert_allclose(sig_a, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-14)
    got = frechet_distance(mu_a, sig_a, *fid_statistics(b))
    expected = fid_reference(a, b)
    assert expected > 1.0
    assert abs(got - expected) <= 1e-9 * expected  # both float64; sqrtm of an 8x8 matrix
    self_fid = frechet_distance(mu_a, sig_a, mu_a, sig_a)
    assert abs(self_fid) <= 1e-10 * np.trace(sig_a)  # tr(S) + tr(S) - 2 tr(sqrtm(S S)): float64 cancellation


def test_fid_matches_torchmetrics_on_the_same_features():
    """A maintained implementation (eigvals of S1 S2, uncentred sums) agrees with ours (scipy sqrtm, centred)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(180, 8)) * 1.3 + 0.2
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    ours = frechet_distance(*fid_statistics(b.astype(np.float32)), *fid_statistics(a.astype(np.float32)))
    assert abs(metric.compute().item() - ours) <= 1e-6 * ours  # ours rounds features to float32 first


def test_non_finite_sqrtm_is_retried_with_eps_on_both_diagonals(monkeypatch):
    from dpar_scale.evaluation import statistics

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    seen, real_sqrtm = [], linalg.sqrtm

    def sqrtm(m):  # the first product "fails" (as a singular one can), the retry gets the real square root
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(statistics.linalg, "sqrtm", sqrtm)
    with pytest.warns(UserWarning, match="singular; adding 1e-06 to both diagonals"):
        got = frechet_distance(mu1, s1, mu2, s2)
    eye = np.eye(3) * 1e-6
    np.testing.assert_array_equal(seen[1], (s1 + eye) @ (s2 + eye))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        real_sqrtm((s1 + eye) @ (s2 + eye)).real)
    assert got == pytest.approx(expected, rel=1e-12)


# ---- Inception Score ----

def test_inception_score_constructed_probabilities():
    uniform = np.full((100, 7), 1 / 7)
    assert inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(5)[np.arange(100) % 5]  # balanced over C = 5 classes
    score, std, splits = inception_score(one_hot)
    assert (score, splits) == (pytest.approx(5.0, rel=1e-12), 1)
    rng = np.random.default_rng(3)
    soft = rng.dirichlet(np.full(6, 0.3), size=1200)
    mean, std, splits = inception_score(soft, split_size=500)  # splits of 500, 500, 200 in file order
    assert splits == 3
    assert mean == pytest.approx(is_reference(soft, 500), rel=1e-12)


def test_inception_score_splits_in_file_order_without_permutation():
    half = np.eye(2)[np.r_[np.zeros(5000, int), np.ones(5000, int)]]  # first split all class 0, second class 1
    alternating = np.eye(2)[np.arange(10000) % 2]                      # the same rows, each split half / half
    assert inception_score(half) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12), 2)
    assert inception_score(alternating)[0] == pytest.approx(2.0, rel=1e-12)


# ---- precision / recall ----

def brute_force_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def test_manifold_radii_equal_brute_force_across_chunks():
    x = np.random.default_rng(4).normal(size=(37, 5)).astype(np.float32)
    expected = brute_force_radii(x, 3)
    for chunk in (5, 37, 100):
        np.testing.assert_allclose(manifold_radii(x, 3, chunk), expected, rtol=1e-5)  # float32 |a|^2-2ab+|b|^2


def on_a_line(positions: np.ndarray, dim: int = 6, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    return (rng.normal(size=dim) + positions[:, None] * direction).astype(np.float32)


def test_precision_recall_constructed_sets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    far = x + np.float32(1000.0)
    assert precision_recall(x, far) == (0.0, 0.0)
    # Reference: points 0, 1, ..., 99 on a line (squared 3-NN radius 4; 9 at both ends). Samples: 0.25, 0.75, ...,
    # 49.75 (spacing 0.5: radius 1, 2.25 at the ends). Every sample lies 0.25 from a reference point -> precision
    # 1. Reference points 0..50 lie 0.25 from a sample; 51 lies 1.25 from the end sample 49.75 (1.5625 <= 2.25);
    # 52 lies 2.25 away (5.06 > 2.25) -> recall = 52 / 100: the samples cover half the reference line.
    reference = on_a_line(np.arange(100.0))
    samples = on_a_line(0.25 + 0.5 * np.arange(100.0))
    for chunk in (7, 10000):
        assert precision_recall(reference, samples, chunk=chunk) == (1.0, 0.52)


def test_precision_recall_balls_include_their_boundary():
    """ADM tests distance <= radius. Integer points repeated 4 times have a 3-NN radius of exactly 0 (float32 is
    exact on small integers), so a sample on a reference point is inside only because of the <=."""
    points = np.random.default_rng(7).integers(-5, 6, size=(10, 4)).astype(np.float32)
    reference = np.repeat(points, 4, axis=0)
    assert (manifold_radii(reference) == 0).all()
    assert precision_recall(reference, reference[::4].repeat(4, 0)) == (1.0, 1.0)
    assert precision_recall(reference, reference + np.float32(0.5)) == (0.0, 0.0)
