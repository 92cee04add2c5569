"""Checkpoints of multi-process runs, in the same folder layout as single-process ones where possible.

`<run>/checkpoints/step-000123/`:
  model.safetensors   full fp32 weights, gathered on rank 0 (what sampling / export / `load_model_for_inference`
                      read, whatever layout trained them)
  ema.safetensors     full EMA weights (FSDP2 engine, when EMA is on)
  train_state.pt      scheduler, TrainState, rank 0's RNG, "optimizer": None and the engine/layout that wrote it
  optimizer/          FSDP2 engine: the sharded optimizer state as a torch.distributed.checkpoint (DCP) folder,
                      loadable on a different number of ranks
  deepspeed/          DeepSpeed engine: DeepSpeed's own checkpoint (ZeRO partitions of weights + optimizer)
  rng/rank-00001.pt   the other ranks' RNG states
  config.yaml
Written into `step-000123.tmp` by all ranks and renamed by rank 0 after a barrier, so an interrupted save never
looks complete.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dpar_scale.checkpoint import (
    TrainState, checkpoint_root, publish_checkpoint, read_checkpoint_file, read_train_state, rng_state,
    set_rng_state, write_data_info,
)
from dpar_scale.config import save_config
from dpar_scale.parallel.init import clean_name, copy_full_into


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) CPU copy of a parameter/state tensor; a collective for DTensors (call on all ranks)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from dpar_scale.parallel.clip import quiet_redistribute

        with quiet_redistribute():
            t = t.full_tensor()
    return t.detach().cpu().contiguous()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{clean parameter name: full fp32 CPU tensor}; every rank must call it (DTensors all-gather)."""
    return {clean_name(k): full_value(v).float() for k, v in model.state_dict().items()}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {clean_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"checkpoint weights do not match the model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}")
    for name, tensor in own.items():
        copy_full_into(tensor, state[name])


def save_distributed_checkpoint(output_dir, cfg, engine, scheduler, state: TrainState, ema=None,
                                keep_last: int = 0, protect: Path | None = None,
                                data_info: dict | None = None) -> Path:
    rank = _rank()
    final = checkpoint_root(output_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    weights = engine.save(tmp)  # all ranks: optimizer / engine state; returns full weights on rank 0 (else None)
    ema_full = {k: full_value(v).float() for k, v in ema.state_dict().items()} if ema is not None else None
    if rank != 0:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        save_file(weights, tmp / "model.safetensors")
        if ema_full is not None:
            save_file({clean_name(k): v for k, v in ema_full.items()}, tmp / "ema.safetensors")
        torch.save({"optimizer": None, "scheduler": scheduler.state_dict(), "train_state": asdict(state),
                    "rng": rng_state(), "engine": engine.name,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1}, tmp / "train_state.pt")
        save_config(cfg, tmp / "config.yaml")
        write_data_info(tmp, data_info)
        publish_checkpoint(tmp, final, output_dir, keep_last, protect)
    _barrier()
    return final


def load_distributed_checkpoint(path: Path, engine, scheduler, ema=None) -> TrainState:
    blob = read_train_state(path)
    written_by = blob.get("engine", "single process")
    if blob.get("optimizer") is not None or written_by != engine.name:
        raise ValueError(f"checkpoint {path} was written by the {written_by!r} engine; this run uses "
                         f"{engine.name!r}. Resume it with the same engine (a single-process checkpoint with one "
                         f"process), or start a new run from its model.safetensors")
    engine.load(path)
    if ema is not None and (path / "ema.safetensors").is_file():
        full = read_checkpoint_file(path / "ema.safetensors", load_file)
        for k, v in ema.state_dict().items():
            copy_full_into(v, full[clean_name(k)])
    scheduler.load_state_dict(blob["scheduler"])
    rank = _rank()
    own = path / "rng" / f"rank-{rank:05d}.pt"
    if rank == 0:
        set_rng_state(blob["rng"])
    elif own.is_file():
        set_rng_state(read_checkpoint_file(own, lambda f: torch.load(f, weights_only=True)))
    return TrainState(**blob["train_state"])
