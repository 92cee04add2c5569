"""Gradient-norm clipping for parameters that live on different device meshes.

After TP + FSDP a model holds plain tensors (no parallelism), DTensors on the FSDP mesh (parameters TP leaves
alone, e.g. DPAR's class embedding) and DTensors on the 2-D (dp, tp) mesh. `torch.nn.utils.clip_grad_norm_` stacks
all the per-tensor norms in one op, which DTensor refuses across meshes. Here the gradients are grouped by mesh,
each group's norm is computed (a DTensor norm is reduced over its mesh with `full_tensor()`), and the group norms
are combined: (Σ_g n_g^p)^(1/p), or max for p = inf. Plain tensors are identical on every rank (replicated
computation), so their norm needs no communication. Every rank ends with the same total norm and scales its
gradients by the same factor.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Iterable

import torch


@contextlib.contextmanager
def quiet_redistribute():
    """Silences DTensor's "N sequential all_gather/all_reduce operations will be performed" notice while a
    multi-dimensional DTensor is reduced to a full value (grad norms, checkpoint gathers): there it is expected,
    the result is the same on every rank, and it would print once per rank and step."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _group_by_mesh(grads: list[torch.Tensor]) -> dict:
    from torch.distributed.tensor import DTensor

    groups: dict = defaultdict(list)
    for g in grads:
        groups[g.device_mesh if isinstance(g, DTensor) else None].append(g)
    return groups


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The total gradient norm over all parameters (whatever their mesh), as a plain scalar tensor."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norms = []
    for mesh, group in _group_by_mesh(grads).items():
        with quiet_redistribute():
            n = torch.nn.utils.get_total_norm(group, norm_type, error_if_nonfinite=False, foreach=True)
            if isinstance(n, DTensor):
                n = n.full_tensor()
        norms.append(n.float().to(grads[0].device))  # stays on the device: nothing here waits for it
    stacked = torch.stack(norms)
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clips in place like torch.nn.utils.clip_grad_norm_ (max_norm <= 0: measure only); returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    if max_norm > 0 and params:
        # computed on the device, without reading the norm on the host: a non-finite norm leaves the gradients as
        # they are (the trainer stops on it)
        coef = (max_norm / (total.double() + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef)).float()
        for group in _group_by_mesh([p.grad for p in params]).values():
            torch._foreach_mul_(group, coef)
    return total
