"""Process-wide numeric settings of a training run: TF32 for fp32 matmuls on CUDA, and `train.deterministic`.

Applied by the trainer before it builds anything. What is and is not reproducible on a GPU is in the README
("Checkpoints and resume"); in short: the RNG streams are restored exactly, but some CUDA kernels (atomics in
backward passes) and NCCL's reduction order across layouts are not bit-reproducible.
"""
from __future__ import annotations

import os
import sys

import torch

CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings with which cuBLAS is deterministic


def configure_numerics(train_cfg) -> None:
    """TF32 for fp32 matmuls / convolutions on CUDA (`train.tf32`), and deterministic kernels
    (`train.deterministic`). The legacy `allow_tf32` flags, not `fp32_precision`: mixing the two APIs makes torch
    refuse to read either, and libraries (inductor, DeepSpeed) still read the legacy ones. Neither flag changes
    CPU matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(train_cfg.tf32)
    if train_cfg.deterministic:
        make_deterministic()


def make_deterministic() -> None:
    """Deterministic algorithms where torch has them; a warning naming each op that has none (`warn_only`: a run
    should not die at step 1 because one kernel lacks a deterministic variant). cuBLAS reads its workspace
    setting when its first handle is created, so it must be set before the first matmul on the GPU."""
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print(f"dpar-scale: train.deterministic=true but CUDA was initialised before CUBLAS_WORKSPACE_CONFIG "
                  f"was set; cuBLAS may not be deterministic in this process: export "
                  f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before starting", file=sys.stderr, flush=True)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    elif current not in (":4096:8", ":16:8"):
        print(f"dpar-scale: CUBLAS_WORKSPACE_CONFIG={current} is not a deterministic cuBLAS setting; use "
              f"{CUBLAS_WORKSPACE} (or :16:8)", file=sys.stderr, flush=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
