"""The default engine: plain PyTorch (one process, or FSDP2 / HSDP / TP+SP under torchrun).

It owns what happens between "the loss of one micro-batch" and "the weights moved": backward, gradient clipping
across device meshes, the optimizer and LR-scheduler step, and the model/optimizer part of checkpoints.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def reduce_partial_grads(model: torch.nn.Module) -> None:
    """Sequence-parallel norm weights are replicated, but their gradients come out of the backward as Partial
    DTensors (each TP rank saw only its sequence shard). FSDP2 reduces them before its reduce-scatter; without FSDP
    we all-reduce them once here, otherwise every optimizer op touching them would all-reduce them again."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(g.device_mesh, p.placements)


class NativeEngine:
    name = "fsdp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg, dims, device):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.dims, self.device = cfg, dims, device
        # With FSDP the MixedPrecisionPolicy casts parameters to bf16; autocast is only for unsharded runs.
        self._autocast = cfg.train.precision == "bf16" and not dims.fsdp_enabled

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.model

    def autocast(self):
        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        loss.backward()

    def step(self, check) -> float:
        """Clip (norm over all meshes) -> `check(norm)` (may raise) -> optimizer + scheduler step. Returns norm."""
        from dpar_scale.parallel.clip import clip_grad_norm_

        if self.dims.tp_enabled and not self.dims.fsdp_enabled:
            reduce_partial_grads(self.model)
        norm = float(clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        check(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -------------------------------------------------------------------------------- checkpoints (multi-rank)
    def save(self, folder: Path) -> dict | None:
        """Writes the sharded optimizer state (DCP) into folder/optimizer; returns full weights on rank 0."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from dpar_scale.parallel.checkpoint import full_model_state

        weights = full_model_state(self.model)
        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                 checkpoint_id=str(folder / "optimizer"))
        return weights if dist.get_rank() == 0 else None

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from dpar_scale.parallel.checkpoint import load_full_model_state

        load_full_model_state(self.model, load_file(folder / "model.safetensors"))
        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(state, checkpoint_id=str(folder / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
