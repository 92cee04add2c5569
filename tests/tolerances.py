"""Tolerances for comparing two floating-point computations of the same quantity, derived from the format.

Two computations that agree in exact arithmetic but round differently (another summation order, kernel blocking,
tensor shape, process layout or CPU) disagree by a few units of the format's eps relative to the magnitude of
what they compute. Each reduction of n terms rounds n times; independent rounding errors add like a random walk,
so a reduction contributes ~eps·√n relative error, and a chain of `depth` such reductions (layers, optimizer
steps) adds up their errors (at most linearly). Hence

    tolerance = SAFETY · eps(dtype) · magnitude · √reduction · depth

`reduction` is the longest sum in the chain (a matmul's inner dimension, an attention's keys, a loss's terms),
`magnitude` the scale of the values (their max |x|), `depth` the number of chained reductions. SAFETY covers the
constants of the estimate and kernels that block differently on other CPUs. The disagreement measured on this
suite's comparisons is 10–1000x below these tolerances; a real defect (a leak, a wrong alignment, a missing
all-reduce) moves values by a sizable fraction of their magnitude, orders of magnitude above them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SAFETY = 4.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon (spacing of the format at 1): 2^-23 float32, 2^-7 bfloat16, 2^-10 float16, 2^-52 float64."""
    return torch.finfo(dtype).eps


def rel_tol(*, reduction: int = 1, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance (a fraction of the magnitude) of `depth` chained reductions of `reduction` terms."""
    return SAFETY * eps(dtype) * math.sqrt(max(reduction, 1)) * max(depth, 1)


def abs_tol(magnitude: float, *, reduction: int = 1, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for values of scale `magnitude` (see the module docstring)."""
    return rel_tol(reduction=reduction, depth=depth, dtype=dtype) * float(magnitude)


def model_chain(model: torch.nn.Module, seq_len: int) -> dict:
    """`reduction` and `depth` of a transformer's forward, for `abs_tol(..., **model_chain(model, n))`: the longest
    sum is the widest linear layer's input or the attention over `seq_len` keys; the chain is every layer of every
    stack (nn.ModuleList) plus two (the input side, e.g. embeddings and patch pooling, and the output head)."""
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=1)
    layers = sum(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    return {"reduction": max(widest, seq_len), "depth": layers + 2}


def magnitude(x) -> float:
    """max |x| of a tensor, array or list of numbers (at least the smallest normal number, never 0)."""
    values = x.detach().double().abs() if isinstance(x, torch.Tensor) else torch.as_tensor(np.abs(np.asarray(x, float)))
    return max(float(values.max()) if values.numel() else 0.0, torch.finfo(torch.float32).tiny)


def assert_close(actual, expected, *, reduction: int = 1, depth: int = 1, dtype: torch.dtype = torch.float32,
                 msg: str = "") -> None:
    """|actual - expected| <= abs_tol(max |expected|) elementwise (tensors, arrays or lists)."""
    tol = abs_tol(magnitude(expected), reduction=reduction, depth=depth, dtype=dtype)
    a = actual.detach().double() if isinstance(actual, torch.Tensor) else torch.as_tensor(np.asarray(actual, float))
    b = expected.detach().double() if isinstance(expected, torch.Tensor) else torch.as_tensor(
        np.asarray(expected, float))
    assert a.shape == b.shape, f"{msg}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    worst = float((a - b).abs().max()) if a.numel() else 0.0
    assert worst <= tol, (f"{msg}: max |Δ| {worst:.3g} > tolerance {tol:.3g} ({dtype}, magnitude "
                          f"{magnitude(expected):.3g}, reduction {reduction}, depth {depth})")
