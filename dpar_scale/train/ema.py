"""Exponential moving average of the weights (train.ema), kept in fp32 beside the model."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    """An fp32 exponential moving average of the model's floating-point state."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- shadow + (1 - decay) (weight - shadow), every tensor in one foreach op (a few fused kernels
        instead of one launch per tensor). On sharded (DTensor) state each rank updates its own shards."""
        shadows, values = [], []
        for k, v in model.state_dict().items():
            if k in self.shadow:
                shadows.append(_local(self.shadow[k]))
                values.append(_local(v).float())
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Temporarily loads the EMA weights into `model` (for validation / sampling)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
