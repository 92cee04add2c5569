"""The default engine: plain PyTorch (one process, or FSDP2 / HSDP / TP+SP under torchrun).

It owns what happens between "the loss of one micro-batch" and "the weights moved": backward, gradient clipping
across device meshes, the optimizer and LR-scheduler step, and the model/optimizer part of checkpoints.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dpar_scale.checkpoint.dcp_io import dcp_load, dcp_save, dcp_save_async


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
        if self.dims.fsdp_enabled:
            # FSDP2 reduce-scatters gradients after each backward unless told not to: with gradient accumulation
            # the micro-batches before the last keep their unsharded gradients and the last reduces the sum once
            # per optimizer step (same result: the reduction is linear).
            self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def step(self, check=None) -> torch.Tensor:
        """Clip (norm over all meshes) -> `check(norm)` (may raise; None: the caller checks the norm later, so
        nothing here waits for the device) -> optimizer + scheduler step. Returns the norm, a device tensor."""
        from dpar_scale.parallel.clip import clip_grad_norm_

        if self.dims.tp_enabled and not self.dims.fsdp_enabled:
            reduce_partial_grads(self.model)
        norm = clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if check is not None:
            check(float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    # ------------------------------------------------------------------------------------------- checkpoints
    # model/, ema/ and optimizer/ are DCP folders keyed by parameter name (wrapper parts of activation
    # checkpointing / compile removed), so any layout (one process, FSDP2, HSDP, TP, or a mix) reads any other's.
    def save_state(self, folder: Path, ema=None, client_state: dict | None = None, background: bool = False):
        """Collective: every rank writes its own shards; nothing is gathered. (`client_state` is for engines that
        keep their own copy of the train state; train_state.pt has it here.) `background`: the tensors are
        copied to CPU memory now and written by a thread; returns the futures to wait for (else [])."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        parts = [(get_model_state_dict(self.model), folder / "model")]
        if ema is not None:
            parts.append((named_ema(ema), folder / "ema"))
        parts.append((get_optimizer_state_dict(self.model, self.optimizer), folder / "optimizer"))
        if not background:
            for state, target in parts:
                dcp_save(state, target)
            return []
        return [dcp_save_async(state, target, self._writer_group(target.name)) for state, target in parts]

    def _writer_group(self, part: str):
        """A gloo group of all ranks per part (model / ema / optimizer): each background save runs in its own
        thread and coordinates over its own group, so no two threads, nor the training loop on the default group,
        ever interleave collectives on one group. Created once per part, collectively, in the same order."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        groups = self.__dict__.setdefault("_writer_groups", {})
        if part not in groups:
            groups[part] = dist.new_group(backend="gloo")
        return groups[part]

    def load_state(self, folder: Path, ema=None, saved_layout: dict | None = None) -> None:
        """Collective: each rank reads the pieces of its own shards (DCP reshards across layouts)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        model_state = get_model_state_dict(self.model)
        dcp_load(model_state, folder / "model")
        set_model_state_dict(self.model, model_state)
        if ema is not None:
            if (folder / "ema").is_dir():
                dcp_load(named_ema(ema), folder / "ema")  # in place into the EMA's own tensors
            else:
                ema.load_state_dict({k: v.detach().float() for k, v in self.model.state_dict().items()
                                     if k in ema.shadow})
        # Only the per-parameter state (moments, step counts) is read: the parameter groups depend on the layout
        # (one group per device mesh, see build_optimizer), and their hyperparameters come from the config; the
        # learning rate is set from the schedule's step by load_checkpoint.
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        state_only = {"state": optim_state["state"]}
        dcp_load(state_only, folder / "optimizer")
        set_optimizer_state_dict(self.model, self.optimizer,
                                 {"state": state_only["state"], "param_groups": optim_state["param_groups"]})


def named_ema(ema) -> dict:
    """The EMA tensors under the model's clean parameter names (the same keys as model/)."""
    from dpar_scale.parallel.init import clean_name

    return {clean_name(k): v for k, v in ema.state_dict().items()}
