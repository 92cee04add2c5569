"""Minimal process-group helpers for tools launched with torchrun.

Only what offline tools (code extraction, entropy precompute) need: the rank/world size torchrun puts in the
environment, a process group when there is more than one process, a barrier and a small-object broadcast.
Training parallelism (device meshes, FSDP, TP) lives elsewhere and builds on its own process group; these
helpers are safe to call when a group already exists (they reuse it).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def get_rank() -> int:
    """Global rank: from the live process group if any, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float = 2 * 3600) -> tuple[int, int]:
    """Create the default process group when torchrun started more than one process.

    Returns (rank, world_size). With WORLD_SIZE unset or 1 nothing is created, so tools run unchanged as
    plain `python tool.py`. backend=None picks nccl when CUDA is available and gloo otherwise; tools that
    only exchange small Python objects and barriers should pass "gloo" so they work on any device.
    The long default timeout is deliberate: ranks of an offline tool can finish their share at very different
    times and then wait at a barrier for the slowest one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_initialized():
        return get_rank(), get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # nccl collectives run on the current device; pin it before the group exists.
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object per rank, in rank order ([obj] without a process group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
