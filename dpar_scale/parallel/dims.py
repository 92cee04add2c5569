"""Process layout: how many ranks replicate, shard and tensor-parallelise, and the device mesh over them.

World ranks are laid out row-major over (dp_replicate, dp_shard, tp), so the tensor-parallel ranks of one group
are adjacent (one node's fast links on a cluster) and FSDP's shard groups come next. `dp` is the flattened
(dp_replicate, dp_shard) dimension: the data-parallel rank that decides which slice of the global batch a
process reads (all TP ranks of one group read the same slice).

The environment comes from torchrun, the DeepSpeed launcher (both set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT) or plain Slurm `srun` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR must
be exported by the job script). Backend nccl on GPU, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from dpar_scale.config import ConfigError


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


@dataclass
class ParallelDims:
    """Degrees of the three parallel dimensions; `dp_shard=-1` takes whatever the other two leave."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    mesh: object = field(default=None, repr=False)  # DeviceMesh over (dp_replicate, dp_shard, tp) once built
    dp_mesh: object = field(default=None, repr=False)  # the flattened (dp_replicate, dp_shard) mesh

    def __post_init__(self):
        for name in ("dp_replicate", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        fixed = self.dp_replicate * self.tp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by parallel.dp_replicate × parallel.tp = "
                    f"{self.dp_replicate} × {self.tp}; launch a multiple of {fixed} processes or change "
                    f"parallel.tp / parallel.dp_replicate")
            self.dp_shard = self.world_size // fixed
        elif self.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest), got {self.dp_shard}")
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"parallel.dp_replicate × dp_shard × tp = {self.dp_replicate} × {self.dp_shard} × {self.tp} = "
                f"{product}, but {self.world_size} processes were launched; they must be equal (set "
                f"parallel.dp_shard=-1 to use the rest of the world for FSDP, or launch {product} processes)")

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> "ParallelDims":
        return cls(parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp, world_size)

    # -------------------------------------------------------------------------------------------- degrees
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 is applied whenever there is data parallelism (dp_replicate alone = HSDP with shard size 1)."""
        return self.dp > 1

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    # ------------------------------------------------------------------------------------------------ mesh
    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp")
        self.mesh = mesh
        return mesh

    def submesh(self, name: str):
        """"tp", "dp" (flattened), "fsdp" (what fully_shard gets: dp_shard, or (dp_replicate, dp_shard) for HSDP)."""
        if self.mesh is None:
            return None
        if name == "fsdp":
            return self.mesh["dp_replicate", "dp_shard"] if self.hsdp else self.mesh["dp_shard"]
        if name == "dp":
            return self.dp_mesh
        return self.mesh[name]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.mesh is not None else 0

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank() if self.mesh is not None else 0

    def dp_group(self):
        return self.dp_mesh.get_group() if self.mesh is not None else None

    def describe(self) -> str:
        return (f"world {self.world_size} = dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × "
                f"tp {self.tp}")


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(env: LaunchEnv, device: torch.device, timeout_s: float = 1800, force: bool = False) -> None:
    """Creates the default group (nccl on GPU, gloo on CPU) when more than one process runs and none exists.
    `force`: also for a single process (DeepSpeed needs a group even then); it gets a local rendezvous."""
    if dist.is_initialized() or (env.world_size <= 1 and not force):
        return
    if env.world_size <= 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (identity without a process group). Works on a copy; returns it."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
