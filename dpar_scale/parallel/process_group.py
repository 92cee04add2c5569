"""Processes: who this process is (rank, world size, local rank) and the one place a process group is created.

The environment comes from torchrun or the DeepSpeed launcher (both set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT) or plain Slurm `srun` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR must
be exported by the job script). The trainer and the offline tools (code extraction, entropies, sampling) all
call `init_process_group`; with one process it creates nothing unless asked to (DeepSpeed wants a group even
then), so every tool runs unchanged as plain `python tool.py`. The small collectives below are identities
without a group.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dpar_scale.config import ConfigError
from dpar_scale.integrity import WorkShare


@dataclass
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single process"

    @classmethod
    def detect(cls) -> "LaunchEnv":
        """rank / world size / local rank from torchrun or DeepSpeed (RANK ...), else Slurm, else one process."""
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                       "torchrun/deepspeed launcher")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            world = int(env["SLURM_NTASKS"])
            if "MASTER_ADDR" not in env:
                raise ConfigError("running under Slurm with SLURM_NTASKS=%d but MASTER_ADDR is not set: export "
                                  "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) (and "
                                  "MASTER_PORT) in the job script, or launch with torchrun" % world)
            env.setdefault("MASTER_PORT", "29500")
            # torch.distributed's env:// rendezvous reads these names.
            env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(world)
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
            return cls(int(env["SLURM_PROCID"]), world, int(env["LOCAL_RANK"]), "slurm")
        return cls()


def free_port() -> int:
    """A TCP port free on this machine now (MASTER_PORT of a local rendezvous or multi-process launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(env: LaunchEnv | None = None, device: torch.device | None = None, *,
                       backend: str | None = None, timeout_s: float = 1800, force: bool = False) -> LaunchEnv:
    """Creates the default group when more than one process runs and none exists yet; returns the environment.

    `backend`: nccl when `device` is a CUDA device, else gloo (tools that only exchange small Python objects and
    barriers pass "gloo" so they work on any device). `force`: also for a single process, with a local
    rendezvous on a free port. Offline tools pass a long `timeout_s`: their ranks can finish their share at very
    different times and then wait at a barrier for the slowest one.
    """
    env = env or LaunchEnv.detect()
    if dist.is_initialized() or (env.world_size <= 1 and not force):
        return env
    if env.world_size <= 1:
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    device = device if device is not None else torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        # nccl collectives run on the current device; pin it before the group exists.
        torch.cuda.set_device(device if device.type == "cuda" else torch.device("cuda", env.local_rank))
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return env


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the live process group if any, else the launcher's RANK, else 0."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


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


def work_share() -> WorkShare:
    """This process's share of file checks (dpar_scale.integrity): every rank of the live group, else all of it."""
    if not is_initialized():
        return WorkShare()
    return WorkShare(dist.get_rank(), dist.get_world_size(), all_gather_object)


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (identity without a process group). Works on a copy; returns it."""
    out = values.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
