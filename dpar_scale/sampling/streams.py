"""Where generation's randomness comes from: one stream per sample, and the labels, as pure functions of the seed.

Sample i of a run draws its randomness from its own generator, seeded by (seed, i) only: one uniform number per
code, so the whole stream can be drawn up front as U [B, N] (row i from sample i's generator) and the sampler
consumes column k at code k (`dpar_scale.sampling.generate.sample_logits` inverts the CDF at that number). Which
other samples share the batch, which rank runs it and how many ranks there are cannot change the numbers a
sample reads. (The floats of the logits can still depend on the batch's shape and composition, so the
world-size-independent sampler always generates the same fixed chunks of samples together; see
`dpar_scale.sampling.chunked`.)

The generators are NumPy's PCG64 seeded through `SeedSequence(seed, spawn_key=(purpose, ...))`: independent
streams for every (seed, i) without collisions (torch's CPU generator keeps only 32 bits of its seed, so 50,000
per-sample seeds would collide), and the same numbers on every platform. Purposes: 0 = the codes of sample i,
1 = the order of the balanced labels, 2 = random labels.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["LABEL_MODES", "sample_uniforms", "sample_labels"]

LABEL_MODES = ("balanced", "per-class", "random")
_CODES, _BALANCED_ORDER, _RANDOM_LABELS = 0, 1, 2


def _generator(seed: int, *key: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def sample_uniforms(seed: int, sample_ids, num_codes: int) -> torch.Tensor:
    """U [len(sample_ids), num_codes] float32 in [0, 1): row r is the stream of sample `sample_ids[r]`."""
    ids = [int(i) for i in sample_ids]
    if any(i < 0 for i in ids):
        raise ValueError("sample ids must be >= 0")
    rows = [_generator(seed, _CODES, i).random(num_codes, dtype=np.float32) for i in ids]
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, num_codes), np.float32))


def sample_labels(seed: int, num_samples: int, num_classes: int, mode: str = "balanced") -> np.ndarray:
    """int64 [num_samples]: the class of every sample of a run, a function of (seed, num_samples, mode) only.

    balanced: num_samples / num_classes per class (the first num_samples % num_classes classes get one more), in
      a seeded shuffled order, so contiguous splits (Inception Score's) are not sorted by class;
    per-class: the same counts, sorted by class (galleries; an IS over this file order is meaningless);
    random: each label uniform over the classes, independently (LlamaGen's evaluation draws them so).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode {mode!r} is not one of {', '.join(LABEL_MODES)}")
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples} and {num_classes}")
    if mode == "random":
        return _generator(seed, _RANDOM_LABELS).integers(0, num_classes, size=num_samples, dtype=np.int64)
    counts = np.full(num_classes, num_samples // num_classes, dtype=np.int64)
    counts[: num_samples % num_classes] += 1
    sorted_labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
    if mode == "per-class":
        return sorted_labels
    return sorted_labels[_generator(seed, _BALANCED_ORDER, num_samples).permutation(num_samples)]
