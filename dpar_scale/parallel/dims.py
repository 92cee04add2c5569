"""Process layout: how many ranks replicate, shard and tensor-parallelise, and the device mesh over them.

World ranks are laid out row-major over (dp_replicate, dp_shard, tp), so the tensor-parallel ranks of one group
are adjacent (one node's fast links on a cluster) and FSDP's shard groups come next. `dp` is the flattened
(dp_replicate, dp_shard) dimension: the data-parallel rank that decides which slice of the global batch a
process reads (all TP ranks of one group read the same slice).

Who the processes are and how their group is created is dpar_scale.parallel.process_group's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dpar_scale.config import ConfigError


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
