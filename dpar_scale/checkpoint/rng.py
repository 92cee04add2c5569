"""Random-number generator state per rank: saved in every checkpoint, restored on a resume with the same layout,
re-derived from (seed, step, rank) on another one.

A rank's file (`rng/rank-00003.pt`) holds the Python, NumPy and torch CPU generators and, when CUDA is in use,
every CUDA device generator the process sees (`torch.cuda.get_rng_state_all()`, plus the index of the device the
rank trains on). Dropout on a GPU draws from the CUDA generator, so without it a resumed run would draw other
masks than the uninterrupted one. Everything is a tensor or a plain value (`torch.load(weights_only=True)`).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": list(keys), "python_version": version, "python_gauss": gauss,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only once CUDA is in use: querying it earlier would create a context on every visible device.
        state["cuda"] = list(torch.cuda.get_rng_state_all())
        state["cuda_device"] = torch.cuda.current_device()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved and torch.cuda.is_available():
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # another number of visible devices: at least the one this rank trains on
            device = torch.cuda.current_device()
            index = state.get("cuda_device", device)
            if index < len(saved):
                torch.cuda.set_rng_state(saved[index], device)


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG streams for a rank that has no saved state of its own (the layout changed on resume): a function of
    (seed, step, rank), so two resumes of the same checkpoint on the same layout still agree. (`torch.manual_seed`
    seeds every CUDA device too.)"""
    value = (seed * 1_000_003 + step * 7919 + rank) % (1 << 63)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)
