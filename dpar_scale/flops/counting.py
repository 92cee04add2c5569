"""Op-level FLOP counters (fvcore and FlopCounterMode) that cross-check the analytic count of dpar_scale.flops.analytic.

Counting method of the op-level counters: `torch.jit.trace` (fvcore) needs real tensors, so a big model is counted
on a *probe*: the same widths, one layer per group (encoder / global / decoder; the GPT's one stack), zero
weights, a real batch and patch layout. The count of a group's layer 0 is then multiplied by the group's real
depth. That is exact because the layers of a group have identical shapes and see the same attention mask;
tests/test_flops.py proves probe == full count on a multi-layer model. fvcore skips attention, and neither counter
can see *which* keys a mask allows from shapes alone, so an `AttentionRecorder` wraps the model's attention
backends while counting and records, per call, the pairs its `AttentionMask` allows; the op handles (fvcore) and
formulas (FlopCounterMode) look them up by the (q, k) shapes of the call.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from dpar_scale.flops.analytic import (
    ATTENTION_CONVENTIONS, FLOPS_PER_MAC, LAYER_CONTAINERS, FlopBreakdown, _resolve, analytic_breakdown,
    max_disagreement,
)


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


# ---------------------------------------------------------------------------------------- op-level counters
def counting_model(model_cfg, *, probe: bool = True) -> tuple[torch.nn.Module, dict[str, float]]:
    """(model, depth scale) for counting: built on the meta device, materialised on the CPU with zero weights,
    in eval mode. With `probe` each layer stack has one layer and the scale maps the stack's name to its real
    depth, so `count * scale` is the full model's count."""
    import torch.nn as nn

    from dpar_scale.models import build_model

    cfg = dataclasses.replace(_resolve(model_cfg), dropout=0.0, class_dropout=0.0, attention_backend="sdpa")
    depths = {c: getattr(cfg, f) for c, f in LAYER_CONTAINERS.items()
              if (f == "n_layers") == (cfg.kind != "dpar")}
    built = cfg if not probe else dataclasses.replace(cfg, **{LAYER_CONTAINERS[c]: 1 for c in depths})
    with torch.device("meta"):
        model = build_model(built)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    model.eval()
    scale = {c: depths[c] / len(getattr(model, c)) for c in depths if isinstance(getattr(model, c), nn.ModuleList)}
    return model, scale


def _group_counts(per_module: dict[str, dict[str, float]], group_of: dict[str, str], scale: dict[str, float],
                  total: float, source: str, batch_images: int) -> FlopBreakdown:
    """Sums per-module op counts of the model's direct children and of each layer of its stacks (module names
    relative to the model), multiplied by the stack's depth scale, into a FlopBreakdown."""
    matmul, attn = defaultdict(float), defaultdict(float)
    seen = 0.0
    for name, ops in per_module.items():
        parts = name.split(".") if name else []
        if len(parts) == 1 and parts[0] not in LAYER_CONTAINERS:
            mult = 1.0
        elif len(parts) == 2 and parts[0] in LAYER_CONTAINERS:
            mult = scale.get(parts[0], 1.0)
        else:
            continue
        group = group_of.get(parts[0], "other")
        for op, count in ops.items():
            seen += count
            (attn if "attention" in str(op) else matmul)[group] += count * mult
    if abs(seen - total) > 1e-6 * max(total, 1.0):
        raise RuntimeError(f"{source}: {total - seen:.4g} FLOPs were counted outside the model's children")
    return FlopBreakdown(matmul=dict(matmul), attention=dict(attn), batch_images=batch_images, source=source)


class _Traced(torch.nn.Module):
    """jit.trace takes tensors only: the layout is held here and captured as constants."""

    def __init__(self, model, layout, text=None):
        super().__init__()
        self.counted, self.layout = model, layout
        self.text = {} if text is None else {"text_ids": text[0], "text_lengths": text[1]}

    def forward(self, codes, labels=None):
        if self.layout is not None:
            return self.counted(codes, labels, self.layout, **self.text)
        return self.counted(codes, labels, **self.text)


_SDPA_JIT_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_cudnn_attention")


def _flop_counter_formulas(recorder: AttentionRecorder) -> dict:
    """FlopCounterMode formulas for the attention ops (forward and backward = 2 x forward), from the recorder.
    Without them FlopCounterMode misses CPU flash SDPA and counts T² for a packed sequence."""
    aten, hop = torch.ops.aten, torch.ops.higher_order

    def formula(qi, ki, vi, factor):
        def f(*args, out_val=None, **kwargs):
            return FLOPS_PER_MAC * factor * recorder.macs(args[qi].shape, args[ki].shape, args[vi].shape[-1],
                                                          backward=factor != 1, consumer="FlopCounterMode")

        f._get_raw = True  # receive the tensors (we only read their shapes)
        return f

    fwd = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    out = {getattr(aten, name): formula(0, 1, 2, 1) for name in fwd if hasattr(aten, name)}
    out.update({getattr(aten, name + "_backward"): formula(1, 2, 3, 2) for name in fwd
                if hasattr(aten, name + "_backward")})
    if hasattr(hop, "flex_attention"):
        out[hop.flex_attention] = formula(0, 1, 2, 1)
        out[hop.flex_attention_backward] = formula(0, 1, 2, 2)
    return out


def count_ops(model, codes, labels=None, layout=None, *, attention: str = "full",
              scale: dict[str, float] | None = None, fvcore: bool = True, flop_counter: bool = True,
              backward: bool = False, text=None) -> dict[str, FlopBreakdown]:
    """Op-level counts of one forward: {"fvcore": ..., "FlopCounterMode": ...} (whichever are asked for).

    fvcore's FlopCountAnalysis traces the model (doubled to FLOPs; attention by op handles fed by the recorder);
    FlopCounterMode, when both are asked for, watches the dispatched ops of that same traced forward (one forward
    feeds both, each with its own bookkeeping). With `backward` (FlopCounterMode only, no fvcore) the summed
    logits are back-propagated and "backward" holds the backward's totals (matmul / attention, group "backward").
    `text`: a text model's captions, (text_ids [Σ L], text_lengths [B]) (the layout built with their lengths).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if backward and fvcore:
        raise ValueError("backward counting runs FlopCounterMode alone: pass fvcore=False")
    recorder = AttentionRecorder(attention)
    counter = FlopCounterMode(display=False, custom_mapping=_flop_counter_formulas(recorder)) if flop_counter \
        else contextlib.nullcontext()
    groups, scale, batch = getattr(model, "PARAM_GROUPS", {}), scale or {}, int(codes.shape[0])
    out = {}
    with recorder, counter:
        if fvcore:
            from fvcore.nn import FlopCountAnalysis
            from fvcore.nn.jit_handles import get_shape

            def sdpa_handle(inputs, outputs):
                q, k, v = (get_shape(x) for x in inputs[:3])
                return recorder.macs(q, k, v[-1], consumer="fvcore")

            analysis = FlopCountAnalysis(_Traced(model, layout, text), (codes,) if labels is None else (codes, labels))
            for op in _SDPA_JIT_OPS:
                analysis.set_op_handle(op, sdpa_handle)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            with torch.no_grad():
                per_module = analysis.by_module_and_operator()  # the trace (and every handle) runs here
            rel = {name[len("counted."):]: {op: FLOPS_PER_MAC * c for op, c in ops.items()}
                   for name, ops in per_module.items() if name.startswith("counted.")}
            out["fvcore"] = _group_counts(rel, groups, scale, FLOPS_PER_MAC * analysis.total(), "fvcore", batch)
        else:
            with torch.set_grad_enabled(backward):
                logits = _Traced(model, layout, text).forward(codes, labels)
        if flop_counter:
            fwd_counts, root = counter.get_flop_counts(), type(model).__name__ + "."
            rel = {}
            for name, ops in fwd_counts.items():
                if ".counted." in name:  # inside the trace: <jit wrappers>.counted.<child>
                    rel[name.split(".counted.", 1)[1]] = ops
                elif name.startswith(root):
                    rel[name[len(root):]] = ops
            out["FlopCounterMode"] = _group_counts(rel, groups, scale, counter.get_total_flops(), "FlopCounterMode",
                                                   batch)
        if backward:
            logits.float().sum().backward()
    if backward:
        bwd = defaultdict(float)
        for op, count in counter.get_flop_counts()["Global"].items():
            bwd["attention" if "attention" in str(op) else "matmul"] += count - fwd_counts["Global"].get(op, 0)
        out["backward"] = FlopBreakdown(matmul={"backward": bwd["matmul"]}, attention={"backward": bwd["attention"]},
                                        batch_images=batch, source="FlopCounterMode backward")
    return out


@dataclass
class Measurement:
    """One model counted three ways on one batch (per-batch breakdowns; per image via their methods)."""

    analytic: FlopBreakdown
    fvcore: FlopBreakdown
    flop_counter: FlopBreakdown
    params: int
    global_positions_per_image: float  # positions of the big transformer: N for a GPT, M_i + 1 for DPAR
    mean_patch_length: float  # codes per patch (1 for a GPT)
    disagreement: float  # largest pairwise relative difference of the three (totals and groups)

    def counters(self) -> dict[str, FlopBreakdown]:
        return {"fvcore": self.fvcore, "FlopCounterMode": self.flop_counter, "analytic": self.analytic}

    def check(self, tolerance: float = 0.02) -> None:
        """Raises if the three counts disagree by more than `tolerance` (relative)."""
        if self.disagreement > tolerance:
            rows = "\n".join(f"  {name:>16}: " + ", ".join(f"{k} {v / 1e9:.4f}" for k, v in b.groups().items())
                             for name, b in self.counters().items())
            raise AssertionError(f"FLOP counts disagree by {100 * self.disagreement:.2f}% (> {100 * tolerance:g}%),"
                                 f" GFLOP per image:\n{rows}")


def measure(model_cfg, *, patch_lengths: Sequence[Sequence[int]] | None = None, batch_images: int = 1,
            attention: str = "full", probe: bool = True, per_image: bool = True, seed: int = 0,
            text_length: int = 0) -> Measurement:
    """Counts training-shaped forwards of the model three ways (analytic, fvcore, FlopCounterMode).

    DPAR needs `patch_lengths` (per image, the batch size follows from them); a GPT / entropy model counts
    `batch_images` images. With `per_image` (default) each DPAR image is its own forward, so nothing is padding
    and the counts are the model FLOPs; without it the images share one forward, whose patch queries are padded
    to the longest image (the dense implementation runs those rows), and the analytic count includes padding.
    `text_length`: a text model (model.conditioning=text) counted with captions of that many tokens.
    """
    from dpar_scale.patching.layout import PatchLayout
    from dpar_scale.models import build_model, count_params

    cfg = _resolve(model_cfg)
    h, w = cfg.grid
    layout = None
    is_text = cfg.conditioning == "text"
    if is_text != (text_length > 0):
        raise ValueError("a text model is counted with text_length >= 1 caption tokens (and only a text model)")
    if cfg.kind == "dpar":
        if patch_lengths is None:
            raise ValueError("counting a DPAR model needs patch_lengths (per image)")
        layout = PatchLayout.from_lengths(patch_lengths, (h, w), cond_lengths=[text_length] * len(patch_lengths)
                                          if is_text else None)
        batch_images = layout.batch_size
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (batch_images, h * w), generator=gen)
    labels = (torch.randint(0, cfg.num_classes, (batch_images,), generator=gen)
              if cfg.num_classes and not is_text else None)
    text = None
    if is_text:
        text = (torch.randint(0, cfg.text.vocab_size, (batch_images * text_length,), generator=gen),
                torch.full((batch_images,), text_length, dtype=torch.long))
    with torch.device("meta"):
        params = count_params(build_model(cfg))
    model, scale = counting_model(cfg, probe=probe)
    analytic = analytic_breakdown(cfg, batch_images=batch_images, layout=layout, attention=attention,
                                  include_padding=not per_image, text_lengths=text_length if is_text else None)
    if layout is not None and per_image and batch_images > 1:
        parts = [count_ops(model, codes[i:i + 1], None if labels is None else labels[i:i + 1],
                           PatchLayout.from_lengths([layout.lengths[i]], (h, w), cond_lengths=layout.cond_lengths[i:i + 1]),
                           attention=attention, scale=scale,
                           text=None if text is None else (text[0][i * text_length:(i + 1) * text_length],
                                                           text[1][i:i + 1]))
                 for i in range(batch_images)]
        fv, fc = (sum((p[k] for p in parts[1:]), parts[0][k]) for k in ("fvcore", "FlopCounterMode"))
    else:
        counts = count_ops(model, codes, labels, layout, attention=attention, scale=scale, text=text)
        fv, fc = counts["fvcore"], counts["FlopCounterMode"]
    worst = max(max_disagreement(analytic, fv), max_disagreement(analytic, fc), max_disagreement(fv, fc))
    if layout is None:
        positions, mean_length = float(h * w + (text_length - 1 if is_text else 0)), 1.0
    else:
        patches = layout.num_global_positions - layout.num_cond_positions
        positions, mean_length = layout.num_global_positions / batch_images, h * w * batch_images / patches
    return Measurement(analytic=analytic, fvcore=fv, flop_counter=fc, params=params,
                       global_positions_per_image=positions, mean_patch_length=mean_length, disagreement=worst)


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
