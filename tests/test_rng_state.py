"""Per-rank RNG state in checkpoints (CPU generators, and every CUDA generator when CUDA is in use), and the
process-wide numeric settings a run asks for (`train.deterministic`, `train.tf32`).

There is no GPU here: the CUDA branch runs against a stand-in device API whose generators are real torch
generators, so "restored" means the stand-in devices draw the same numbers again after a round trip through the
checkpoint file."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dpar_scale.checkpoint import rng
from dpar_scale.config import load_config
from dpar_scale.train.numerics import CUBLAS_WORKSPACE, configure_numerics


def draws(generators=()):
    return (random.random(), float(np.random.rand()), torch.rand(4).tolist(),
            [torch.rand(3, generator=g).tolist() for g in generators])


def through_file(state, tmp_path):
    """What a resume reads back: the file a rank wrote, loaded the way load_checkpoint loads it."""
    torch.save(state, tmp_path / "rank-00000.pt")
    return torch.load(tmp_path / "rank-00000.pt", weights_only=True)


class FakeCuda:
    """torch.cuda's RNG calls over stand-in device generators (real torch.Generator objects)."""

    def __init__(self, monkeypatch, devices: int, current: int):
        self.generators = [torch.Generator().manual_seed(100 + i) for i in range(devices)]
        self.current = current
        for name, fn in {"is_available": lambda: True, "is_initialized": lambda: True,
                         "device_count": lambda: len(self.generators), "current_device": lambda: self.current,
                         "get_rng_state_all": lambda: [g.get_state() for g in self.generators],
                         "set_rng_state_all": self.set_all, "set_rng_state": self.set_one}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def set_all(self, states):
        assert len(states) == len(self.generators)
        for g, s in zip(self.generators, states):
            g.set_state(s)

    def set_one(self, state, device):
        self.generators[device].set_state(state)


def test_cpu_generators_round_trip_through_the_checkpoint_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # move every generator off its seed
    saved = through_file(rng.rng_state(), tmp_path)
    expected = draws()
    assert "cuda" not in saved  # no CUDA here
    rng.set_rng_state(saved)
    assert draws() == expected


def test_cuda_generators_are_saved_and_restored(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, devices=2, current=1)
    draws(cuda.generators)
    saved = through_file(rng.rng_state(), tmp_path)
    assert len(saved["cuda"]) == 2 and saved["cuda_device"] == 1
    expected = draws(cuda.generators)
    rng.set_rng_state(saved)
    assert draws(cuda.generators) == expected  # both devices draw the same numbers again (dropout masks on GPU)


def test_cuda_state_restored_on_another_device_count_sets_the_rank_s_device(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, devices=2, current=1)
    draws(cuda.generators)  # off their seeds, so a fresh generator would not draw the same by chance
    saved = through_file(rng.rng_state(), tmp_path)
    device_1 = torch.rand(3, generator=cuda.generators[1]).tolist()
    resumed = FakeCuda(monkeypatch, devices=4, current=1)  # the resume sees 4 devices, trains on device 1
    untouched = resumed.generators[0].get_state()
    rng.set_rng_state(saved)
    assert torch.rand(3, generator=resumed.generators[1]).tolist() == device_1
    assert torch.equal(resumed.generators[0].get_state(), untouched)


def test_cpu_checkpoint_resumes_where_cuda_is_present(tmp_path, monkeypatch):
    saved = through_file(rng.rng_state(), tmp_path)  # written without CUDA: no "cuda" entry
    cuda = FakeCuda(monkeypatch, devices=1, current=0)
    before = cuda.generators[0].get_state()
    rng.set_rng_state(saved)
    assert torch.equal(cuda.generators[0].get_state(), before)


@pytest.fixture
def restore_numerics():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def test_deterministic_and_tf32_settings(restore_numerics, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_numerics(load_config(None, []).train)  # defaults: TF32 on, nothing forced deterministic
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    configure_numerics(load_config(None, ["train.deterministic=true", "train.tf32=false"]).train)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
