"""FLOP accounting: an analytic count, two op-level counters (fvcore, FlopCounterMode), and the GPU peak table.

Conventions (every number in this module and in tools/count_flops.py follows them):

* **FLOPs = 2 x multiply-adds.** fvcore counts one per multiply-add; its counts are doubled here. FlopCounterMode
  already counts two.
* **What is counted:** the matmuls of the weights (every nn.Linear, the 16,384-way head included) and attention's
  two matmuls, QKᵀ and PV. Norms, softmax, RoPE, SwiGLU's elementwise product, max-pooling and embedding lookups
  are not (they are <1% and neither counter counts them either).
* **Attention counts the (query, key) pairs a varlen kernel computes, never padding.** A packed sequence of images
  with lengths L_i costs Σ_i L_i² pairs, not T² for the padded length T; a patch query of the encoder's cross-
  attention sees only its own codes (Σ over patches of their lengths = N per image). Causal self-attention is
  counted as the full L² per sequence (convention "full", the default: the PaLM / Megatron / LlamaGen-style
  accounting, and what torch's FlopCounterMode does for causal SDPA); convention "exact" counts only the L(L+1)/2
  pairs the causal mask allows. Per pair: 2·d multiply-adds (QKᵀ and PV over all heads), i.e. 4·d FLOPs.
* **Training = 3 x forward.** The backward of each matmul y = x·W computes dx = dy·Wᵀ and dW = xᵀ·dy, two matmuls
  of the forward's size (attention's likewise: dQ, dK from dS; dP, dV from dO), so backward = 2 x forward.
  Activation recomputation is not counted (it is hardware work, not model work: MFU excludes it).
* **Padding.** The analytic count is, by default, the useful work (Σ (M_i + 1) global positions, Σ M_i patch
  queries): padding then shows up as lower MFU. `include_padding=True` counts the rows the dense implementation
  really runs (the packed sequence padded to `pad_to_multiple`, B x max M_i patch queries): that is what the
  op-level counters see on a batch of several images. `measure` counts each DPAR image in a forward of its own,
  so there nothing is padding.

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
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

FLOPS_PER_MAC = 2
TRAIN_FACTOR = 3  # forward + backward, backward = 2 x forward
ATTENTION_CONVENTIONS = ("full", "exact")
GROUPS = ("encoder", "global", "decoder", "head")
LAYER_CONTAINERS = {"layers": "n_layers", "encoder_layers": "n_encoder_layers",
                    "global_layers": "n_global_layers", "decoder_layers": "n_decoder_layers"}


# ------------------------------------------------------------------------------------------------ breakdown
@dataclass
class FlopBreakdown:
    """Forward FLOPs of one batch (2 per multiply-add) by module group; attention kept apart from the weights."""

    matmul: dict[str, float]  # group -> FLOPs of the weight matmuls (nn.Linear)
    attention: dict[str, float]  # group -> FLOPs of QKᵀ and PV
    batch_images: int = 1
    source: str = ""

    @property
    def total(self) -> float:
        return sum(self.matmul.values()) + sum(self.attention.values())

    def groups(self, per_image: bool = True) -> dict[str, float]:
        """encoder / global / decoder / head (weights only) + attention (all groups) + total."""
        div = self.batch_images if per_image else 1
        out = {g: self.matmul.get(g, 0.0) / div for g in GROUPS}
        extra = sum(v for g, v in self.matmul.items() if g not in GROUPS)
        if extra:
            out["other"] = extra / div
        out["attention"] = sum(self.attention.values()) / div
        out["total"] = self.total / div
        return out

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        """The counts of two batches together (e.g. images counted one forward each)."""
        def merged(a, b):
            return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}

        return FlopBreakdown(matmul=merged(self.matmul, other.matmul),
                             attention=merged(self.attention, other.attention),
                             batch_images=self.batch_images + other.batch_images, source=self.source)

    def forward_per_image(self) -> float:
        return self.total / self.batch_images

    def train_per_image(self) -> float:
        return TRAIN_FACTOR * self.total / self.batch_images


def max_disagreement(a: FlopBreakdown, b: FlopBreakdown) -> float:
    """Largest relative difference of the totals, and of every group measured against the total."""
    ga, gb = a.groups(), b.groups()
    scale = max(ga["total"], gb["total"], 1e-30)
    worst = abs(ga["total"] - gb["total"]) / scale
    for key in set(ga) | set(gb):
        worst = max(worst, abs(ga.get(key, 0.0) - gb.get(key, 0.0)) / scale)
    return worst


# ------------------------------------------------------------------------------------------------- analytic
def _resolve(cfg):
    from dpar_scale.models import resolve_model_config

    return resolve_model_config(cfg)


def causal_pairs(length: int, attention: str = "full") -> int:
    """(query, key) pairs of causal self-attention over one sequence, under the attention convention."""
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention convention {attention!r} is not one of {ATTENTION_CONVENTIONS}")
    return length * length if attention == "full" else length * (length + 1) // 2


def _patch_counts(batch_images, patch_lengths, num_patches, layout, n_codes):
    if layout is not None:
        patch_lengths = layout.lengths
    if patch_lengths is not None:
        counts = [len(x) for x in patch_lengths]
        sums = {sum(x) for x in patch_lengths}
        if len(sums) != 1 or (n_codes is not None and sums != {n_codes}):
            raise ValueError(f"patch lengths must cover the same {n_codes} codes in every image, got sums {sums}")
        n_codes = sums.pop()
    elif num_patches is not None:
        counts = [int(m) for m in (num_patches.tolist() if torch.is_tensor(num_patches) else num_patches)]
    else:
        raise ValueError("DPAR FLOPs depend on the patch layout: pass patch_lengths (per image), num_patches "
                         "or layout")
    if len(counts) != batch_images:
        raise ValueError(f"batch_images={batch_images} but the layout describes {len(counts)} images")
    return counts, n_codes


def analytic_breakdown(model_cfg, *, batch_images: int = 1, patch_lengths: Sequence[Sequence[int]] | None = None,
                       num_patches: Sequence[int] | torch.Tensor | None = None, layout=None,
                       n_codes: int | None = None, attention: str = "full", include_padding: bool = False,
                       pad_to_multiple: int | None = None) -> FlopBreakdown:
    """Forward FLOPs of one batch from the model's shapes and the batch's layout (see the module docstring).

    `model_cfg` is a ModelConfig (resolved or not). For DPAR give the per-image patch lengths (or patch counts
    M_i, or the PatchLayout); N (codes per image) defaults to the config's grid. Per matmul row: attention block
    4·d², SwiGLU 3·d·h, head d·V, global-to-local d²; per attention pair 2·d multiply-adds.
    """
    from dpar_scale.models.layers import ffn_hidden_dim

    cfg = _resolve(model_cfg)
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    d, v = cfg.dim, cfg.vocab_size
    h = ffn_hidden_dim(d, cfg.ffn_multiple_of, cfg.ffn_dim_multiplier or None)
    block = 4 * d * d + 3 * d * h  # MACs per position of one LLaMA block's weights
    pair = 2 * d  # MACs per attention (query, key) pair: QKᵀ and PV over all heads
    b = batch_images
    matmul, attn = defaultdict(float), defaultdict(float)
    if cfg.kind in ("gpt", "entropy"):
        n = n_codes or cfg.grid[0] * cfg.grid[1]  # [cond, x_0 .. x_{N-2}]: N positions
        matmul["global"] = cfg.n_layers * b * n * block
        attn["global"] = cfg.n_layers * b * causal_pairs(n, attention) * pair
        matmul["head"] = b * n * d * v
    else:
        counts, n = _patch_counts(b, patch_lengths, num_patches, layout, n_codes)
        n = n or cfg.grid[0] * cfg.grid[1]
        pad = pad_to_multiple or (layout.pad_to_multiple if layout is not None else 1)
        positions = sum(m + 1 for m in counts)  # [class, patches] per image
        global_rows = -(-positions // pad) * pad if include_padding else positions
        query_rows = b * max(counts) if include_padding else sum(counts)
        codes = b * n
        # encoder: causal self-attention blocks over the codes, then the patch cross-attention block (q, o and
        # the FFN on the patch queries, k and v on the codes; each query sees its own codes: N pairs per image)
        matmul["encoder"] = cfg.n_encoder_layers * codes * block + query_rows * (2 * d * d + 3 * d * h) \
            + codes * 2 * d * d
        attn["encoder"] = (cfg.n_encoder_layers * b * causal_pairs(n, attention) + codes) * pair
        matmul["global"] = cfg.n_global_layers * global_rows * block
        attn["global"] = cfg.n_global_layers * sum(causal_pairs(m + 1, attention) for m in counts) * pair
        matmul["decoder"] = codes * d * d + cfg.n_decoder_layers * codes * block  # global-to-local + blocks
        attn["decoder"] = cfg.n_decoder_layers * b * causal_pairs(n, attention) * pair
        matmul["head"] = codes * d * v
    return FlopBreakdown(matmul={k: FLOPS_PER_MAC * x for k, x in matmul.items()},
                         attention={k: FLOPS_PER_MAC * x for k, x in attn.items()}, batch_images=b,
                         source="analytic")


def forward_flops(model_cfg, *, batch_images: int, patch_lengths=None, **kwargs) -> float:
    """Analytic forward FLOPs of one batch (see `analytic_breakdown` for the keywords)."""
    return analytic_breakdown(model_cfg, batch_images=batch_images, patch_lengths=patch_lengths, **kwargs).total


def train_flops(model_cfg, *, batch_images: int, patch_lengths=None, **kwargs) -> float:
    """Analytic training FLOPs (forward + backward = 3 x forward) of one batch, attention from its real lengths.

    GPT / entropy model: `train_flops(cfg, batch_images=B)`; DPAR: `patch_lengths=batch.patch_lengths`
    (or `num_patches=`, `layout=`). `n_codes=` when the batch is not the config's full grid.
    """
    return TRAIN_FACTOR * forward_flops(model_cfg, batch_images=batch_images, patch_lengths=patch_lengths, **kwargs)


# ------------------------------------------------------------------------------------------ GPU peak table
# bf16 dense tensor-core peaks (no sparsity) from the vendors' data sheets, per device as torch sees it (an MI250X
# is two devices). First match wins, so the specific names come before the general ones.
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    (r"H100.*NVL", 835e12), (r"H100.*PCIe", 756e12), (r"\bH100\b", 989e12),
    (r"H200.*NVL", 835e12), (r"\bG?H200\b", 989e12), (r"\bH800\b", 989e12), (r"\bH20\b", 148e12),
    (r"\bGB200\b", 2.5e15), (r"\bB200\b", 2.25e15), (r"\bB100\b", 1.75e15),
    (r"\bA100\b", 312e12), (r"\bA800\b", 312e12), (r"\bA30\b", 165e12),
    (r"\bL40S\b", 362e12), (r"\bL40\b", 181e12), (r"\bL4\b", 121e12),
    (r"MI325X", 1307e12), (r"MI300X", 1307e12), (r"MI300A", 980e12), (r"MI250X", 191.5e12),
    (r"MI250\b", 181e12), (r"MI210", 181e12),
)


def peak_flops_for_name(name: str) -> float | None:
    """bf16 dense peak FLOP/s for a device name as `torch.cuda.get_device_name()` spells it; None if unknown."""
    for pattern, peak in PEAK_BF16_DENSE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(device=None, *, override: float | None = None) -> float | None:
    """Peak bf16 dense FLOP/s of one device: `override` if given (> 0), else looked up by the GPU's name.

    None on CPU / MPS and for GPUs not in the table (then log achieved TFLOP/s only, or configure the peak).
    `device` is a torch.device, a string, or None for the current CUDA device if there is one.
    """
    if override:
        return float(override)
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def throughput(flops: float, seconds: float, *, peak: float | None = None, num_devices: int = 1) -> dict:
    """{"tflops": achieved TFLOP/s per device, "mfu": fraction of `peak` (only when a peak is known)}."""
    per_device = flops / max(seconds, 1e-12) / num_devices
    out = {"tflops": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out


# ------------------------------------------------------------------------------------------- patch layouts
def lengths_with_mean(grid: Sequence[int], mean_length: float, max_patch_length: int,
                      batch_images: int = 1) -> list[list[int]]:
    """A valid layout (per image, patch lengths) whose mean patch length is as close to `mean_length` as the
    patch count allows: the patch rule's own constraints hold (codes 0 and 1 start patches, no patch crosses a
    row, no patch is longer than P_max), and patches are spread as evenly as possible over images and rows.

    FLOPs depend on the layout only through the patch counts M_i, so an even layout costs what an entropy
    layout with the same counts costs. The achieved mean is B·N / Σ M_i.
    """
    h, w = int(grid[0]), int(grid[1])
    n, p = h * w, int(max_patch_length)
    if p < 1 or mean_length < 1:
        raise ValueError(f"need max_patch_length >= 1 and mean_length >= 1, got {p}, {mean_length}")
    row_min = [-(-w // p)] * h
    row_min[0] = 1 + -(-(w - 1) // p) if w > 1 else 1  # code 0 is a patch of its own
    lo, hi = sum(row_min), n
    total = round(batch_images * n / mean_length)
    if not batch_images * lo <= total <= batch_images * hi:
        raise ValueError(f"mean patch length {mean_length} is not reachable on a {h}x{w} grid with P_max={p} "
                         f"(row resets allow {n / hi:.3f}..{n / lo:.3f})")
    out = []
    for i in range(batch_images):
        m = total // batch_images + (i < total % batch_images)
        per_row, extra = list(row_min), m - lo
        while extra:  # spread the extra patches over the rows, one at a time, keeping each row <= W patches
            for r in range(h):
                if extra and per_row[r] < w:
                    per_row[r] += 1
                    extra -= 1
        lengths = []
        for r, k in enumerate(per_row):
            span, head = (w - 1, [1]) if r == 0 and w > 1 else (w, [])
            k -= len(head)
            q, rem = divmod(span, k) if k else (0, 0)
            lengths += head + [q + 1] * rem + [q] * (k - rem)
        out.append(lengths)
    return out


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
        from dpar_scale.models.attention import sdpa_op_shapes

        shape = (_ints(q.shape), _ints(k.shape))  # under jit.trace sizes are traced values: read them as ints
        tracing = torch._C._get_tracing_state()  # keep the bookkeeping out of a jit trace's graph
        torch._C._set_tracing_state(None)
        try:
            # The op that runs may have other shapes than the call (SDPA lays packed documents out as a batch).
            key = tuple(map(_ints, sdpa_op_shapes(q, k, mask))) if backend == "_attend_sdpa" else shape
            self.pairs[key].append(attention_pairs(mask, shape[0][0], shape[0][-2], shape[1][-2], self.attention))
        finally:
            torch._C._set_tracing_state(tracing)

    def __enter__(self):
        from dpar_scale.models import attention as attn_mod

        for name in ("_attend_sdpa", "_attend_flex"):
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

    def __init__(self, model, layout):
        super().__init__()
        self.counted, self.layout = model, layout

    def forward(self, codes, labels=None):
        return self.counted(codes, labels, self.layout) if self.layout is not None else self.counted(codes, labels)


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
              backward: bool = False) -> dict[str, FlopBreakdown]:
    """Op-level counts of one forward: {"fvcore": ..., "FlopCounterMode": ...} (whichever are asked for).

    fvcore's FlopCountAnalysis traces the model (doubled to FLOPs; attention by op handles fed by the recorder);
    FlopCounterMode, when both are asked for, watches the dispatched ops of that same traced forward (one forward
    feeds both, each with its own bookkeeping). With `backward` (FlopCounterMode only, no fvcore) the summed
    logits are back-propagated and "backward" holds the backward's totals (matmul / attention, group "backward").
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

            analysis = FlopCountAnalysis(_Traced(model, layout), (codes,) if labels is None else (codes, labels))
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
                logits = model(codes, labels, layout) if layout is not None else model(codes, labels)
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
            attention: str = "full", probe: bool = True, per_image: bool = True, seed: int = 0) -> Measurement:
    """Counts training-shaped forwards of the model three ways (analytic, fvcore, FlopCounterMode).

    DPAR needs `patch_lengths` (per image, the batch size follows from them); a GPT / entropy model counts
    `batch_images` images. With `per_image` (default) each DPAR image is its own forward, so nothing is padding
    and the counts are the model FLOPs; without it the images share one forward, whose patch queries are padded
    to the longest image (the dense implementation runs those rows), and the analytic count includes padding.
    """
    from dpar_scale.layout import PatchLayout
    from dpar_scale.models import build_model, count_params

    cfg = _resolve(model_cfg)
    h, w = cfg.grid
    layout = None
    if cfg.kind == "dpar":
        if patch_lengths is None:
            raise ValueError("counting a DPAR model needs patch_lengths (per image)")
        layout = PatchLayout.from_lengths(patch_lengths, (h, w))
        batch_images = layout.batch_size
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (batch_images, h * w), generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch_images,), generator=gen) if cfg.num_classes else None
    with torch.device("meta"):
        params = count_params(build_model(cfg))
    model, scale = counting_model(cfg, probe=probe)
    analytic = analytic_breakdown(cfg, batch_images=batch_images, layout=layout, attention=attention,
                                  include_padding=not per_image)
    if layout is not None and per_image and batch_images > 1:
        parts = [count_ops(model, codes[i:i + 1], None if labels is None else labels[i:i + 1],
                           PatchLayout.from_lengths([layout.lengths[i]], (h, w)), attention=attention, scale=scale)
                 for i in range(batch_images)]
        fv, fc = (sum((p[k] for p in parts[1:]), parts[0][k]) for k in ("fvcore", "FlopCounterMode"))
    else:
        counts = count_ops(model, codes, labels, layout, attention=attention, scale=scale)
        fv, fc = counts["fvcore"], counts["FlopCounterMode"]
    worst = max(max_disagreement(analytic, fv), max_disagreement(analytic, fc), max_disagreement(fv, fc))
    if layout is None:
        positions, mean_length = float(h * w), 1.0
    else:
        patches = layout.num_global_positions - batch_images
        positions, mean_length = layout.num_global_positions / batch_images, h * w * batch_images / patches
    return Measurement(analytic=analytic, fvcore=fv, flop_counter=fc, params=params,
                       global_positions_per_image=positions, mean_patch_length=mean_length, disagreement=worst)
