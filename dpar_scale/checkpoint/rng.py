"""Random-number generator state per rank: saved in every checkpoint, restored on a resume with the same layout,
re-derived from (seed, step, rank) on another one."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": list(keys), "python_version": version, "python_gauss": gauss,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG streams for a rank that has no saved state of its own (the layout changed on resume): a function of
    (seed, step, rank), so two resumes of the same checkpoint on the same layout still agree."""
    value = (seed * 1_000_003 + step * 7919 + rank) % (1 << 63)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)
