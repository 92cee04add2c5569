"""Reference statistics, cached beside the reference so a second evaluation does not run the detector on it again.

The cache `REF.stats-<first 16 hex of the detector's sha256>.npz` (for an ImageFolder also `-<size>px`) holds the
reference features (precision / recall need them), their mu / sigma, and a key: the detector's sha256, the
reference's fingerprint (npz: path, bytes, mtime, shape; folder: every file's name, size and mtime, the crop size)
and the cache version. A cache whose key differs, or that cannot be read, is recomputed and rewritten, never used.
When the reference npz carries precomputed `mu` / `sigma` (ADM's reference batches do), FID uses those, as ADM
does; the features are still computed for precision / recall.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dpar_scale.parallel import process_group as pg

from .detectors import FeatureDetector
from .features import extract_features, group_rank
from .sources import ImageSource
from .statistics import fid_statistics

__all__ = ["CACHE_VERSION", "ReferenceStats", "cache_path", "reference_statistics"]

CACHE_VERSION = 1


@dataclass
class ReferenceStats:
    features: np.ndarray      # float32 [N, F]
    mu: np.ndarray            # float64 [F]: what FID uses (precomputed when the reference had it)
    sigma: np.ndarray         # float64 [F, F]
    source: str               # "precomputed" (the reference's mu / sigma) or "features"
    cache: str | None = None  # the cache file used or written, if any
    from_cache: bool = False


def cache_path(source: ImageSource, detector: FeatureDetector, cache_dir: str | None = None) -> str | None:
    """Where this reference's statistics under this detector are cached (None: not cacheable)."""
    fp = source.fingerprint()
    if fp is None or not detector.sha256:
        return None
    stem = fp["path"].rstrip(os.sep)
    name = f"{os.path.basename(stem)}.stats-{detector.sha256[:16]}"
    if fp["kind"] == "folder":
        name += f"-{fp['image_size']}px"
    return os.path.join(cache_dir or os.path.dirname(stem), name + ".npz")


def _key(source: ImageSource, detector: FeatureDetector) -> str:
    return json.dumps({"version": CACHE_VERSION, "detector_sha256": detector.sha256,
                       "reference": source.fingerprint()}, sort_keys=True)


def _read_cache(path: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return z["features"], z["mu"], z["sigma"]
    except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
        return None


def _write_cache(path: str, key: str, features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> bool:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), features=features, mu=mu, sigma=sigma)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(f"could not write the reference statistics cache {path} ({e}); continuing without it "
                      f"(pass cache_dir / --cache-dir to put it elsewhere)")
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


def reference_statistics(source: ImageSource, detector: FeatureDetector, batch_size: int = 64,
                         device: torch.device | str = "cpu", use_cache: bool = True, cache_dir: str | None = None,
                         progress: bool = True) -> ReferenceStats | None:
    """The reference's features and FID statistics, from the cache when it is valid.

    Collective under a process group: every rank must call it; rank 0 reads / writes the cache and gets the
    statistics, the other ranks help extract features and get None."""
    main = group_rank()[0] == 0
    path = cache_path(source, detector, cache_dir) if use_cache else None
    key = _key(source, detector) if path else ""
    cached = _read_cache(path, key) if path and main else None
    if pg.broadcast_object(cached is not None):
        if not main:  # only rank 0 read the cache; the other ranks have nothing to extract
            return None
        features, mu, sigma = cached
        from_cache = True
    else:
        features = extract_features(source, detector, batch_size, device, need_probs=False, progress=progress,
                                    desc="reference features").features
        if not main:
            return None
        mu, sigma = fid_statistics(features, device)
        from_cache = False
        if path and not _write_cache(path, key, features, mu, sigma):
            path = None
    if not main:
        return None
    precomputed = source.precomputed_fid_stats()
    if precomputed is not None:
        mu, sigma = precomputed
    return ReferenceStats(features, mu, sigma, "precomputed" if precomputed is not None else "features", path,
                          from_cache)
