"""LLaMA-style building blocks shared by the GPT baseline, the entropy model and DPAR.

Module and parameter names follow LLaMA / LlamaGen / torchtitan (`attention.wq`, `feed_forward.w1`, `attention_norm`
...) so that a tensor-parallel plan written for those models targets these ones unchanged: wq/wk/wv and w1/w3 are
the column-parallel inputs, wo and w2 the row-parallel outputs. Nothing here knows about ranks or devices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpar_scale.data.captions import splitmix_unit

from .attention import AttentionMask, KVCache, attend
from .rope import apply_rope


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's rule: 2/3 of 4·dim, optionally scaled, rounded up to a multiple (768 -> 2048, 1280 -> 3584)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 mean-of-squares loses too much), return in the input dtype.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None):
        super().__init__()
        hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Multi-head attention without biases; self-attention, or cross-attention when `kv_input` is given.

    The forward is three separable steps so an incremental decoder can cache between them:
    `project(x, kv_input, rope, kv_rope)` -> q, k, v [B, H, L, Dh]; `attend` (backend switch) with the caller's
    mask; `wo` on the merged heads. A KV cache appends the new k/v after `project` and passes a mask with
    `q_offset`; nothing in here has to change.
    """

    def __init__(self, dim: int, n_heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim, self.backend = n_heads, dim // n_heads, backend
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim)

    def project(self, x, kv_input=None, rope=None, kv_rope=None):
        """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh], RoPE applied to q (rope) and k (kv_rope, default rope)."""
        src = x if kv_input is None else kv_input
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(src)), self._heads(self.wv(src))
        if rope is not None:
            q = apply_rope(q, rope)
            k = apply_rope(k, rope if kv_rope is None else kv_rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, L, Dh] -> wo([B, L, H·Dh])."""
        out = out.transpose(1, 2)
        return self.wo(out.reshape(out.shape[0], out.shape[1], -1))

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: torch.Tensor | None = None,
                kv_input: torch.Tensor | None = None, kv_rope: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, kv_input, rope, kv_rope)
        return self.merge(attend(q, k, v, mask, self.backend))

    def step(self, x: torch.Tensor, cache: KVCache, layer: int, rope: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """Incremental self-attention: x [R, L, D] are the new positions; their k/v join `cache` (layer `layer`)
        and the queries attend to everything cached before them (see KVCache for `rows`)."""
        q, k, v = self.project(x, rope=rope)
        keys, values, mask = cache.update(layer, k, v, rows)
        return self.merge(attend(q, keys, values, mask, "sdpa"))


class TransformerBlock(nn.Module):
    """Pre-norm LLaMA block: x + drop(attn(norm x)); x + drop(ffn(norm x))."""

    def __init__(self, dim: int, n_heads: int, *, multiple_of: int = 256, ffn_dim_multiplier: float | None = None,
                 dropout: float = 0.0, norm_eps: float = 1e-5, backend: str = "sdpa"):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads, backend)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier)
        self.resid_dropout = nn.Dropout(dropout)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), mask, rope))
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))

    def step(self, x: torch.Tensor, cache: KVCache, layer: int, rope: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` for new positions only, with the keys/values of earlier ones taken from `cache`."""
        x = x + self.resid_dropout(self.attention.step(self.attention_norm(x), cache, layer, rope, rows))
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))


class DecoderBlock(TransformerBlock):
    """A `TransformerBlock` that first adds an injected state to its input through its own RMSNorm + Linear:
    x + W·norm(context), then attention and FFN as usual. DPAR's decoder feeds each code its patch's global state
    this way before every layer (the authors' "single-key cross-attention": one key per query makes the
    attention weights 1 and q/k/v pointless, so only the output projection W remains). `context` has x's shape."""

    def __init__(self, dim: int, n_heads: int, *, norm_eps: float = 1e-5, **kwargs):
        super().__init__(dim, n_heads, norm_eps=norm_eps, **kwargs)
        self.global_to_local_norm = RMSNorm(dim, norm_eps)
        self.global_to_local = nn.Linear(dim, dim, bias=False)

    def inject(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.global_to_local(self.global_to_local_norm(context))

    # `context` is a keyword so that tensor-parallel plans of the (x, mask, rope) inputs apply unchanged.
    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: torch.Tensor | None = None, *,
                context: torch.Tensor) -> torch.Tensor:
        return super().forward(self.inject(x, context), mask, rope)

    def step(self, x: torch.Tensor, cache: KVCache, layer: int, rope: torch.Tensor | None = None,
             rows: torch.Tensor | None = None, *, context: torch.Tensor) -> torch.Tensor:
        return super().step(self.inject(x, context), cache, layer, rope, rows)


class CrossAttentionBlock(nn.Module):
    """Queries x attend to `kv` (no RoPE: which keys a query sees is fixed by the mask, and the keys already carry
    position through the self-attention that produced them), pre-norm and residual; with `ffn` a pre-norm SwiGLU
    FFN follows (the authors' DPAR has none). Separate norms for queries and keys/values because they come from
    different streams (as BLT does)."""

    def __init__(self, dim: int, n_heads: int, *, ffn: bool = False, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, dropout: float = 0.0, norm_eps: float = 1e-5,
                 backend: str = "sdpa"):
        super().__init__()
        self.query_norm = RMSNorm(dim, norm_eps)
        self.kv_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads, backend)
        self.resid_dropout = nn.Dropout(dropout)
        self.has_ffn = ffn
        if ffn:
            self.ffn_norm = RMSNorm(dim, norm_eps)
            self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier)
            self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        x = x + self.resid_dropout(self.attention(self.query_norm(x), mask, kv_input=self.kv_norm(kv)))
        if not self.has_ffn:
            return x
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))


def init_llamagen_(model: nn.Module, std: float = 0.02) -> None:
    """LlamaGen's initialisation: Linear and Embedding weights N(0, std), biases 0, norms 1."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()


def drop_labels(labels: torch.Tensor, null_class: int, prob: float, training: bool,
                drop: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free-guidance training: each label becomes the null class with probability `prob`.
    `drop` ([B] bool) is the caller's decision (the trainer derives it from sample id and step with
    `class_drop_mask`, so it does not depend on how the batch is split over ranks); without it the decision is
    drawn from the global RNG."""
    if not training or prob <= 0:
        return labels
    if drop is None:
        drop = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def class_drop_mask(sample_ids: torch.Tensor, step: int, seed: int, prob: float) -> torch.Tensor:
    """[B] bool: whether each sample's label is dropped at optimizer step `step`; a pure function of
    (seed, step, sample id) — a splitmix64 hash mapped to [0, 1) — so every parallel layout, and a run resumed on
    another one, drops exactly the same labels."""
    return torch.from_numpy(splitmix_unit(seed, step, sample_ids.cpu().numpy()) < prob)
