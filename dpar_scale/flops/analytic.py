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
* **Text models** (`text_lengths`, a caption length L_i per image): the caption's tokens replace the class
  position, so DPAR's global documents are M_i + L_i long and a text GPT's rows L_i + N - 1 (its left padding to
  the batch's longest caption is padding, below). Their embedding lookup is not counted; the head runs on codes.
* **Padding.** The analytic count is, by default, the useful work (Σ (M_i + 1) global positions, Σ M_i patch
  queries): padding then shows up as lower MFU. `include_padding=True` counts the rows the dense implementation
  really runs (the packed sequence padded to `pad_to_multiple`, B x max M_i patch queries): that is what the
  op-level counters see on a batch of several images. `measure` counts each DPAR image in a forward of its own,
  so there nothing is padding.
The op-level counters (fvcore, FlopCounterMode) live in dpar_scale.flops.counting.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dpar_scale.patching import layout as _layout

# An even layout of a given mean patch length; it lives with the layouts (the fractional static rule uses it).
lengths_with_mean = _layout.lengths_with_mean

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
    """(query, key) pairs of causal self-attention over one sequence, under the attention convention (elementwise
    over an integer array of lengths)."""
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention convention {attention!r} is not one of {ATTENTION_CONVENTIONS}")
    return length * length if attention == "full" else length * (length + 1) // 2


def _patch_counts(batch_images, patch_lengths, num_patches, layout, n_codes):
    if layout is not None:
        patch_lengths = layout.lengths
    if patch_lengths is not None:  # map: C loops over the images (the planner calls this every step)
        counts = np.fromiter(map(len, patch_lengths), dtype=np.int64, count=len(patch_lengths))
        sums = set(map(sum, patch_lengths))
        if len(sums) != 1 or (n_codes is not None and sums != {n_codes}):
            raise ValueError(f"patch lengths must cover the same {n_codes} codes in every image, got sums {sums}")
        n_codes = sums.pop()
    elif num_patches is not None:
        counts = np.asarray([int(m) for m in (num_patches.tolist() if torch.is_tensor(num_patches) else num_patches)],
                            dtype=np.int64)
    else:
        raise ValueError("DPAR FLOPs depend on the patch layout: pass patch_lengths (per image), num_patches "
                         "or layout")
    if len(counts) != batch_images:
        raise ValueError(f"batch_images={batch_images} but the layout describes {len(counts)} images")
    return counts, n_codes


def analytic_breakdown(model_cfg, *, batch_images: int = 1, patch_lengths: Sequence[Sequence[int]] | None = None,
                       num_patches: Sequence[int] | torch.Tensor | None = None, layout=None,
                       n_codes: int | None = None, attention: str = "full", include_padding: bool = False,
                       pad_to_multiple: int | None = None, text_lengths: Sequence[int] | int | None = None
                       ) -> FlopBreakdown:
    """Forward FLOPs of one batch from the model's shapes and the batch's layout (see the module docstring).

    `model_cfg` is a ModelConfig (resolved or not). For DPAR give the per-image patch lengths (or patch counts
    M_i, or the PatchLayout); N (codes per image) defaults to the config's grid. Per matmul row: attention block
    4·d², SwiGLU 3·d·h, head d·V, global-to-local d² (per code and per decoder layer with
    model.dpar.decoder_injection=every, once with first), patch cross-attention 4·d² (+ a SwiGLU with
    model.dpar.cross_attn_ffn); per attention pair 2·d multiply-adds. `text_lengths`: a text model's caption
    lengths (one per image, or one for all), the prefix replacing the class position.
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
    if text_lengths is None:
        cond = [1] * b  # the class position
    else:
        cond = [int(text_lengths)] * b if isinstance(text_lengths, int) else [int(x) for x in text_lengths]
        if len(cond) != b or min(cond) < 1:
            raise ValueError(f"text_lengths: need one caption length >= 1 per image ({b}), got {cond}")
    matmul, attn = defaultdict(float), defaultdict(float)
    if cfg.kind in ("gpt", "entropy"):
        n = n_codes or cfg.grid[0] * cfg.grid[1]  # [cond..., x_0 .. x_{N-2}]: N - 1 + C_i positions
        rows = [c + n - 1 for c in cond]
        if include_padding and text_lengths is not None:  # left-padded to the longest caption
            rows = [max(cond) + n - 1] * b
        matmul["global"] = cfg.n_layers * sum(rows) * block
        attn["global"] = cfg.n_layers * sum(causal_pairs(c + n - 1, attention) for c in cond) * pair
        matmul["head"] = b * n * d * v
    else:
        counts, n = _patch_counts(b, patch_lengths, num_patches, layout, n_codes)
        n = n or cfg.grid[0] * cfg.grid[1]
        pad = pad_to_multiple or (layout.pad_to_multiple if layout is not None else 1)
        runs = counts + np.asarray(cond, dtype=np.int64)  # [class | caption, patches] per image
        positions = int(runs.sum())
        global_rows = -(-positions // pad) * pad if include_padding else positions
        query_rows = b * int(counts.max()) if include_padding else int(counts.sum())
        codes = b * n
        # encoder: causal self-attention blocks over the codes, then the patch cross-attention block (q, o and,
        # with model.dpar.cross_attn_ffn, the FFN on the patch queries, k and v on the codes; each query sees its
        # own codes: N pairs per image)
        ffn = 3 * d * h if cfg.dpar.cross_attn_ffn else 0
        matmul["encoder"] = cfg.n_encoder_layers * codes * block + query_rows * (2 * d * d + ffn) + codes * 2 * d * d
        attn["encoder"] = (cfg.n_encoder_layers * b * causal_pairs(n, attention) + codes) * pair
        matmul["global"] = cfg.n_global_layers * global_rows * block
        attn["global"] = cfg.n_global_layers * int(causal_pairs(runs, attention).sum()) * pair
        # decoder: the global-to-local Linear on every code, before every layer (decoder_injection=every) or once
        injections = cfg.n_decoder_layers if cfg.dpar.decoder_injection == "every" else 1
        matmul["decoder"] = injections * codes * d * d + cfg.n_decoder_layers * codes * block
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
# Dense peaks (no sparsity) from the vendors' data sheets, per device as torch sees it (an MI250X is two devices),
# in FLOP/s, per precision of the matmuls: bf16 tensor cores; TF32 tensor cores (what fp32 matmuls run on when
# TF32 is allowed, as the trainer does on CUDA unless train.tf32=false); plain fp32 (CUDA cores / fp32 matrix
# cores; for AMD the fp32 matrix peak, and its "tf32" entry is the XF32 peak where the chip has one, else the fp32
# one). First match wins, so the specific names come before the general ones.
PEAKS_DENSE: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"H100.*PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bH100\b", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"H200.*NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bG?H200\b", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH800\b", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH20\b", {"bf16": 148e12, "tf32": 74e12, "fp32": 44e12}),
    (r"\bGB200\b", {"bf16": 2.5e15, "tf32": 1.25e15, "fp32": 80e12}),
    (r"\bB200\b", {"bf16": 2.25e15, "tf32": 1.125e15, "fp32": 75e12}),
    (r"\bB100\b", {"bf16": 1.75e15, "tf32": 0.875e15, "fp32": 60e12}),
    (r"\bA100\b", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bA800\b", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bA30\b", {"bf16": 165e12, "tf32": 82e12, "fp32": 10.3e12}),
    (r"\bL40S\b", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"MI325X", {"bf16": 1307e12, "tf32": 653.7e12, "fp32": 163.4e12}),
    (r"MI300X", {"bf16": 1307e12, "tf32": 653.7e12, "fp32": 163.4e12}),
    (r"MI300A", {"bf16": 980.6e12, "tf32": 490.3e12, "fp32": 122.6e12}),
    (r"MI250X", {"bf16": 191.5e12, "tf32": 47.9e12, "fp32": 47.9e12}),
    (r"MI250\b", {"bf16": 181e12, "tf32": 45.3e12, "fp32": 45.3e12}),
    (r"MI210", {"bf16": 181e12, "tf32": 45.3e12, "fp32": 45.3e12}),
)
PEAK_PRECISIONS = ("bf16", "tf32", "fp32")


def matmul_precision(precision: str, tf32: bool = True) -> str:
    """The precision the matmuls of a run use: bf16 for train.precision=bf16, else TF32 when allowed, else fp32."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if tf32 else "fp32"


def peak_flops_for_name(name: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `precision` (bf16 | tf32 | fp32) for a device name as `torch.cuda.get_device_name()`
    spells it; None if the device is unknown."""
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PEAK_PRECISIONS)}")
    for pattern, peaks in PEAKS_DENSE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks[precision]
    return None


def peak_flops(device=None, *, precision: str = "bf16", override: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `precision` (see `matmul_precision`): `override` if given
    (> 0), else looked up by the GPU's name.

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
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision)


def throughput(flops: float, seconds: float, *, peak: float | None = None, num_devices: int = 1) -> dict:
    """{"tflops": achieved TFLOP/s per device, "mfu": fraction of `peak` (only when a peak is known)}."""
    per_device = flops / max(seconds, 1e-12) / num_devices
    out = {"tflops": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out
