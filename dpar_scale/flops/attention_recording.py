"""Which (query, key) pairs attention computes, recorded while a model runs: what an `AttentionMask` allows
(`attention_pairs`, under the "full" or "exact" convention), per call of the model's attention backends
(`AttentionRecorder`, which the op-level counters of dpar_scale.flops.counting look up by the shapes of each
attention op), and what `F.scaled_dot_product_attention` is handed, padding included (`sdpa_pair_counter`).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from dpar_scale.flops.analytic import ATTENTION_CONVENTIONS


# ----------------------------------------------------------------------------------- attention recording
def attention_pairs(mask, batch: int, lq: int, lk: int, attention: str = "full") -> int:
    """(query, key) pairs over a batch that an `AttentionMask` allows (padding queries see nothing).

    Convention "full" ignores the causal triangle (a causal sequence of length L costs L², packed sequences
    Σ L_i²); "exact" counts precisely what the mask allows (L(L+1)/2 for a causal sequence).
    """
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention convention {attention!r} is not one of {ATTENTION_CONVENTIONS}")
    causal, offset = mask.causal and attention == "exact", mask.q_offset
    if mask.q_ids is None:
        if not causal:
            return batch * lq * lk
        return batch * int((torch.arange(lq) + offset + 1).clamp(0, lk).sum())
    q_ids, kv_ids = mask.q_ids.detach().cpu().long(), mask.kv_ids.detach().cpu().long()
    total = 0
    span = lk + 1
    for qi, ki in zip(q_ids, kv_ids):  # one row of ids per batch row (or one shared row)
        keys, _ = torch.sort(ki * span + torch.arange(lk))  # keys of id c occupy [c·span, c·span + lk)
        valid = qi >= 0
        base = qi[valid] * span
        last = (torch.arange(lq)[valid] + offset).clamp(max=lk - 1) if causal else torch.full_like(base, lk - 1)
        first = torch.searchsorted(keys, base)
        upto = torch.searchsorted(keys, base + last, right=True)
        total += int((upto - first).clamp(min=0).sum())
    return total * (batch // int(q_ids.shape[0]))


def _ints(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


class AttentionRecorder:
    """While active, wraps the model's attention backends and records, per call, the pairs its mask allows.

    `macs(q_shape, k_shape, v_dim)` then gives the multiply-adds of a call with those shapes. Ops are matched to
    calls in execution order, separately for each `consumer` (a counter): the i-th forward op with given shapes is
    the i-th call with those shapes, backward ops (`backward=True`) are matched from the last call. That matters
    when calls of equal shapes see different masks (a patch cross-attention with as many patches as codes has
    the encoder's shapes); the layers of one group see the same mask, so there any order would do.
    """

    def __init__(self, attention: str = "full"):
        if attention not in ATTENTION_CONVENTIONS:
            raise ValueError(f"attention convention {attention!r} is not one of {ATTENTION_CONVENTIONS}")
        self.attention = attention
        self.pairs: dict[tuple, list[int]] = defaultdict(list)
        self._cursor: dict[tuple, int] = defaultdict(int)
        self._saved: dict = {}

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.pairs.values())

    def _record(self, q, k, mask, backend):
        from dpar_scale.models.attention import sdpa_ops

        shape = (_ints(q.shape), _ints(k.shape))  # under jit.trace sizes are traced values: read them as ints
        tracing = torch._C._get_tracing_state()  # keep the bookkeeping out of a jit trace's graph
        torch._C._set_tracing_state(None)
        try:
            # The ops that run may have other shapes than the call (SDPA runs packed documents as groups, one op
            # each, and patch queries against their gathered keys); each op is credited the pairs the mask allows
            # among its documents (the whole call's when it is the only op).
            ops = sdpa_ops(q, k, mask) if backend == "_attend_sdpa" else [(shape[0], shape[1], None)]
            for q_shape, k_shape, docs in ops:
                if docs is None:
                    pairs = attention_pairs(mask, shape[0][0], shape[0][-2], shape[1][-2], self.attention)
                else:
                    pairs = sum(n * n if self.attention == "full" else n * (n + 1) // 2 for n in docs)
                self.pairs[(_ints(q_shape), _ints(k_shape))].append(pairs)
        finally:
            torch._C._set_tracing_state(tracing)

    def __enter__(self):
        from dpar_scale.models import attention as attn_mod

        for name in ("_attend_sdpa", "_attend_flex", "_attend_varlen"):
            if not hasattr(attn_mod, name):
                raise RuntimeError(f"dpar_scale.models.attention.{name} is gone: update AttentionRecorder")
            original = getattr(attn_mod, name)
            self._saved[name] = original

            def wrapped(q, k, v, mask, _original=original, _name=name):
                self._record(q, k, mask, _name)
                return _original(q, k, v, mask)

            setattr(attn_mod, name, wrapped)
        return self

    def __exit__(self, *exc):
        from dpar_scale.models import attention as attn_mod

        for name, original in self._saved.items():
            setattr(attn_mod, name, original)
        self._saved.clear()
        return False

    def macs(self, q_shape, k_shape, v_dim: int | None = None, *, backward: bool = False,
             consumer: str = "") -> int:
        key = (_ints(q_shape), _ints(k_shape))
        found = self.pairs.get(key)
        if not found:
            raise RuntimeError(f"an attention op with shapes q{key[0]} k{key[1]} ran outside the model's attention "
                               f"backends (recorded: {sorted(self.pairs)}); its pairs are unknown")
        at = (consumer, backward, key)
        i = self._cursor[at]
        if i < len(found):  # the i-th op of these shapes this consumer sees is the i-th call (from the end, backward)
            pairs = found[-1 - i] if backward else found[i]
            self._cursor[at] += 1
        elif len(set(found)) == 1:  # seen again (a second analysis pass): unambiguous
            pairs = found[0]
        else:
            raise RuntimeError(f"more attention ops with shapes {key} than recorded calls ({len(found)})")
        heads, dq = key[0][1], key[0][-1]
        return pairs * heads * (dq + (v_dim or dq))  # QKᵀ and PV


@contextlib.contextmanager
def sdpa_pair_counter(modules):
    """Counts the query-key pairs handed to `F.scaled_dot_product_attention` (batch · Lq · Lk per call, heads
    aside; padding included: what the kernels compute, not what the mask allows) while any of `modules` runs.
    Yields a dict whose "pairs" and "calls" grow as the model runs."""
    import math

    import torch.nn.functional as nnf

    state = {"depth": 0, "pairs": 0, "calls": 0}
    real = nnf.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        if state["depth"]:
            state["pairs"] += math.prod(q.shape[:-3]) * q.shape[-2] * k.shape[-2]
            state["calls"] += 1
        return real(q, k, v, *args, **kwargs)

    def enter(*_):
        state["depth"] += 1

    def leave(*_):
        state["depth"] -= 1

    hooks = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    nnf.scaled_dot_product_attention = counting
    try:
        yield state
    finally:
        nnf.scaled_dot_product_attention = real
        for h in hooks:
            h.remove()
