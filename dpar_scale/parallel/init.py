"""Layout-independent weight initialisation for models built on the meta device and materialised sharded.

The model's own `init_weights()` is the single source of truth for *how* each parameter is initialised. We run it
once on the meta model under a TorchFunctionMode that records, per parameter, the in-place init calls it makes
(`nn.init.normal_(w, 0, 0.02)`, `zeros_`, `ones_`, ...). After the model has been parallelised and materialised
with `to_empty`, every parameter is re-created from its record on the CPU at full size, with the RNG seeded by
(seed, parameter name), and only this rank's shard is copied in (`distribute_tensor(..., src_data_rank=None)`
slices locally: no communication). Consequences:

* initial weights are bit-identical whatever the layout (1 process, FSDP, TP, HSDP, DeepSpeed), which is what
  makes the parity tests meaningful and a resumed run on another layout consistent;
* peak extra memory is one full parameter at a time (the largest is an embedding / head matrix), never the model.
"""
from __future__ import annotations

import hashlib
import re

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Wrappers that insert path components into parameter names (activation checkpointing, torch.compile).
_WRAPPER_PARTS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)(?=\.|$)")


def clean_name(name: str) -> str:
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


class _InitRecorder(TorchFunctionMode):
    def __init__(self, targets: dict[int, str]):
        super().__init__()
        self.targets = targets
        self.calls: dict[str, list] = {name: [] for name in targets.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # nn.init.* pass the tensor as a keyword (tensor=...); Tensor methods as the first argument.
        target, key = (args[0], None) if args else (kwargs.get("tensor"), "tensor")
        if isinstance(target, torch.Tensor) and id(target) in self.targets:
            name = getattr(func, "__name__", "")
            if name.endswith("_"):  # in-place: normal_, zero_, fill_, uniform_, nn.init.* ...
                rest = list(args[1:]) + [v for k, v in kwargs.items() if k != key]
                if any(isinstance(a, torch.Tensor) for a in rest):
                    raise ValueError(f"init of {self.targets[id(target)]} uses a tensor argument ({name}); "
                                     f"layout-independent init only replays scalar-argument init calls")
                saved = {k: v for k, v in kwargs.items() if k != key}
                self.calls[self.targets[id(target)]].append((func, key, tuple(args[1:]), saved))
        return func(*args, **kwargs)


def record_init(model: nn.Module) -> dict[str, list]:
    """{parameter name: [(init fn, tensor keyword or None, args, kwargs), ...]} from running `model.init_weights()`
    (on the meta device is fine: nothing is computed that the record needs)."""
    targets = {id(p): clean_name(n) for n, p in model.named_parameters()}
    recorder = _InitRecorder(targets)
    with torch.no_grad(), recorder:
        if hasattr(model, "init_weights"):
            model.init_weights()
        else:
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    missing = [n for n, calls in recorder.calls.items() if not calls]
    if missing:
        raise ValueError(f"init_weights() does not initialise {missing[:5]}; every parameter needs an init")
    return recorder.calls


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_value(calls: list, shape, dtype: torch.dtype, seed: int, name: str) -> torch.Tensor:
    """The full-size initial value of one parameter (CPU), reproducible from (seed, name)."""
    value = torch.empty(tuple(shape), dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(seed, name))
        for func, key, args, kwargs in calls:
            if key is None:
                func(value, *args, **kwargs)
            else:
                func(*args, **{key: value}, **kwargs)
    return value


@torch.no_grad()
def copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copies a full tensor into `dst`, keeping only this rank's shard when `dst` is a DTensor (no communication:
    `distribute_tensor(src_data_rank=None)` slices the local copy every rank holds)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(dst.shape):
        raise ValueError(f"shape mismatch: source {tuple(full.shape)} vs destination {tuple(dst.shape)}")
    if isinstance(dst, DTensor):
        full = full.to(dst.to_local().device)
        dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
    else:
        dst.copy_(full)


@torch.no_grad()
def init_weights_sharded(model: nn.Module, calls: dict[str, list], seed: int) -> None:
    """Fills every (possibly sharded) parameter of a materialised model from the recorded init calls."""
    for raw_name, param in model.named_parameters():
        name = clean_name(raw_name)
        if name not in calls:
            raise KeyError(f"no recorded init for parameter {name}")
        copy_full_into(param, full_init_value(calls[name], param.shape, torch.float32, seed, name))
