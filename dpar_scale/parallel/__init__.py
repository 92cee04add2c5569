"""Multi-process training: process layout (ParallelDims / DeviceMesh), TP+SP plans, FSDP2/HSDP, activation
checkpointing, compile, layout-independent init and gradient clipping across meshes.

Entry points: `ParallelDims`, `parallelize(model, dims, cfg)`, `build_parallel_model(...)`, `clip_grad_norm_`.
"""
from dpar_scale.parallel.clip import clip_grad_norm_, grad_norm
from dpar_scale.parallel.dims import ParallelDims
from dpar_scale.parallel.process_group import (
    LaunchEnv, all_reduce_sum, default_device, free_port, init_process_group,
)
from dpar_scale.parallel.parallelize import build_parallel_model, parallelize
from dpar_scale.parallel.tensor_parallel import apply_tensor_parallel, check_tp_compatible

__all__ = ["LaunchEnv", "ParallelDims", "all_reduce_sum", "apply_tensor_parallel", "build_parallel_model",
           "check_tp_compatible", "clip_grad_norm_", "default_device", "free_port", "grad_norm", "init_process_group",
           "parallelize"]
