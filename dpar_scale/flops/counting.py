"""Op-level FLOP counters (fvcore and FlopCounterMode) that cross-check the analytic count of dpar_scale.flops.analytic.

Counting method of the op-level counters: `torch.jit.trace` (fvcore) needs real tensors, so a big model is counted
on a *probe*: the same widths, one layer per group (encoder / global / decoder; the GPT's one stack), zero
weights, a real batch and patch layout. The count of a group's layer 0 is then multiplied by the group's real
depth. That is exact because the layers of a group have identical shapes and see the same attention mask;
tests/test_flops.py proves probe == full count on a multi-layer model. fvcore skips attention, and neither counter
can see *which* keys a mask allows from shapes alone, so an `AttentionRecorder` wraps the model's attention
backends while counting and records, per call, the pairs its `AttentionMask` allows; the op handles (fvcore) and
formulas (FlopCounterMode) look them up by the (q, k) shapes of the call.

The attention side (`attention_pairs`, `AttentionRecorder`, `sdpa_pair_counter`) is
dpar_scale.flops.attention_recording, re-exported here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from dpar_scale.flops.analytic import (
    FLOPS_PER_MAC, LAYER_CONTAINERS, FlopBreakdown, _resolve, analytic_breakdown, max_disagreement,
)
from dpar_scale.flops.attention_recording import AttentionRecorder, attention_pairs, sdpa_pair_counter

__all__ = ["counting_model", "count_ops", "Measurement", "measure", "AttentionRecorder", "attention_pairs",
           "sdpa_pair_counter"]


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
