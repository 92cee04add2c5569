"""Per-step values that stay on the device until they are logged.

A step's loss (a code-loss sum on each rank) and gradient norm are device tensors; reading them on the host
(`float(...)`) waits for the whole step to finish, so the next step cannot be queued behind it. The training loop
keeps them here and reads them all at once — one all-reduce of the window's loss sums over the data-parallel
ranks, one device→host copy — at a log line, and before anything that must not happen after a non-finite step:
a checkpoint, a validation, a stop. The non-finite check therefore runs there too, on values that are the same on
every rank (all-reduced losses, global gradient norms), so all ranks raise together, naming the first bad step.

The trade-off: up to train.log_every - 1 steps may run after a non-finite one before the run stops (their work is
wasted, the weights they leave are never saved); no checkpoint ever holds them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dpar_scale.errors import DparError
from dpar_scale.parallel.process_group import all_reduce_sum


class NonFiniteLossError(DparError, RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the message names the step and the batch's samples."""


@dataclass
class _Step:
    record: dict
    loss_sum: torch.Tensor  # this rank's code-loss sum (float32, on the device)
    total_codes: float  # the step's global code count (what the sum is divided by)
    grad_norm: torch.Tensor | float | None  # None: the engine computed none (DeepSpeed without clipping)
    sample_ids: np.ndarray  # this rank's samples of the step (for the error message)
    reduce_flops: bool  # record["flops_per_device"] is this rank's part: summed over the data-parallel ranks


class PendingSteps:
    def __init__(self, dp_group):
        self.dp_group = dp_group
        self.steps: list[_Step] = []

    def add(self, record: dict, loss_sum: torch.Tensor, total_codes: float, grad_norm, sample_ids,
            reduce_flops: bool = False) -> None:
        self.steps.append(_Step(record, loss_sum.detach(), total_codes, grad_norm, sample_ids, reduce_flops))

    def flush(self, run_dir) -> list[dict]:
        """The pending records with `loss` and `grad_norm` filled in, oldest first (then forgotten). Collective
        over the data-parallel ranks when anything is pending (every rank has the same steps pending). Raises
        NonFiniteLossError for the first non-finite step, naming it, its samples and run_dir's last checkpoint."""
        steps, self.steps = self.steps, []
        if not steps:
            return []
        # (no process group, e.g. one process standing in for a rank of a bigger run: the sum is the identity)
        sums = all_reduce_sum(torch.stack([s.loss_sum.float() for s in steps]), self.dp_group)
        device = sums.device
        norms = torch.stack([torch.as_tensor(math.nan if s.grad_norm is None else s.grad_norm,
                                             dtype=torch.float32).to(device) for s in steps])
        loss_sums, grad_norms = torch.stack([sums, norms]).tolist()  # the one device→host sync
        partial = [s for s in steps if s.reduce_flops]
        if partial:  # the same steps on every rank (the same config)
            flops = torch.tensor([s.record["flops_per_device"] for s in partial], dtype=torch.float64)
            if sums.device.type != "cpu":
                flops = flops.to(sums.device)
            for s, value in zip(partial, all_reduce_sum(flops, self.dp_group).tolist()):
                s.record["flops_per_device"] = value
        for s, total, norm in zip(steps, loss_sums, grad_norms):
            loss = total / s.total_codes
            for what, value in (("loss", loss), ("gradient norm", norm)):
                if not math.isfinite(value) and (what == "loss" or s.grad_norm is not None):
                    raise NonFiniteLossError(nonfinite_message(run_dir, what, value, s.record["step"], s.sample_ids))
            s.record["loss"], s.record["grad_norm"] = loss, norm
        return [s.record for s in steps]


def nonfinite_message(run_dir, what: str, value: float, step: int, ids: np.ndarray) -> str:
    from dpar_scale.checkpoint.save_load import list_checkpoints

    ids = ids.tolist()
    last = list_checkpoints(run_dir)
    keep = f"the last checkpoint ({last[-1]}) is untouched" if last else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step}; batch sample ids {ids[:64]}{' …' if len(ids) > 64 else ''}; "
            f"{keep}. Lower optim.lr, check those samples, or use train.precision=fp32, then resume with "
            f"checkpoint.resume=auto")
