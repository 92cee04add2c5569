"""The LlamaGen-equivalent token model: the GPT baseline and (with num_classes == 0) the entropy model.

Input sequence [cond, x_0, ..., x_{N-2}] -> logits for x_0 ... x_{N-1}, so `logits[:, t]` predicts `codes[:, t]`
from the condition and codes < t. cond is the class embedding (index `num_classes` is the null class used for
classifier-free guidance) or, for the unconditional entropy model, a learned start vector.

Positions follow LlamaGen: input position i >= 1 holds code i-1 and gets the 2-D RoPE of that code's grid cell.
The condition position gets the identity rotation by default (`class_rope="identity"`), so the class token can
be attended to by content. LlamaGen's table holds cos = sin = 0 there instead, which zeroes the class token's q
and k: every query scores it 0 (it still contributes its value through the softmax) and its own query is the
zero vector. `class_rope="zero"` reproduces that, which models imported from LlamaGen checkpoints need.

Text conditioning (text_vocab_size > 0; dpar_scale.models.text_prefix): the condition is the caption's tokens,
[text..., x_0, ..., x_{N-2}], left-padded to the batch's longest caption (padding masked), eos at the class
position's identity rotation and earlier tokens at negative rows; logits are those from the eos on.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionMask, KVCache
from .layers import RMSNorm, TransformerBlock, drop_labels, init_llamagen_
from .rope import rope_2d, rope_identity
from .text_prefix import MaskedKVCache, check_text_inputs, left_padded, text_drop, text_rope, text_width


class GPT(nn.Module):
    # Top-level children -> parameter group, for count_params / tools/count_params.py.
    PARAM_GROUPS = {"tok_embeddings": "embeddings", "class_embedding": "embeddings", "start_token": "embeddings",
                    "text_embeddings": "embeddings",
                    "layers": "global", "norm": "head", "output": "head"}

    def __init__(self, *, dim: int, n_layers: int, n_heads: int, vocab_size: int, num_classes: int,
                 grid: tuple[int, int], multiple_of: int = 256, ffn_dim_multiplier: float | None = None,
                 dropout: float = 0.0, class_dropout: float = 0.0, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, attention_backend: str = "auto", class_rope: str = "identity",
                 text_vocab_size: int = 0, text_dropout: float = 0.0):
        super().__init__()
        if class_rope not in ("identity", "zero"):
            raise ValueError(f"class_rope must be identity or zero, got {class_rope!r}")
        self.class_rope = class_rope
        self.dim, self.vocab_size, self.num_classes = dim, vocab_size, num_classes
        self.grid, self.head_dim, self.rope_base = tuple(grid), dim // n_heads, rope_base
        self.class_dropout = class_dropout
        self.text_vocab_size, self.text_dropout = text_vocab_size, text_dropout
        # tensor parallelism sets this to its degree: a text batch's rows are then padded to split evenly
        self.sequence_multiple = 1
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        if text_vocab_size > 0:
            self.text_embeddings = nn.Embedding(text_vocab_size, dim)
        elif num_classes > 0:
            self.class_embedding = nn.Embedding(num_classes + 1, dim)  # + the null class for CFG
        else:
            self.start_token = nn.Parameter(torch.zeros(dim))
        self.tok_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_heads, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
                             dropout=dropout, norm_eps=norm_eps, backend=attention_backend)
            for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.init_weights()

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.text_conditioned

    @property
    def text_conditioned(self) -> bool:
        return self.text_vocab_size > 0

    def init_weights(self) -> None:
        """LlamaGen init (N(0, 0.02), zero output head). Call again after materialising from the meta device."""
        init_llamagen_(self)
        if not self.conditional:
            nn.init.normal_(self.start_token, std=0.02)
        nn.init.zeros_(self.output.weight)

    def condition(self, labels: torch.Tensor | None, batch: int, device,
                  drop_class: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] condition vectors: class embeddings (null class when labels is None) or the start token."""
        if not self.conditional:
            return self.start_token[None].expand(batch, -1)
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        labels = drop_labels(labels, self.num_classes, self.class_dropout, self.training, drop_class)
        return self.class_embedding(labels)

    def rope_table(self, length: int, device) -> torch.Tensor:
        """[length, head_dim/2, 2]: the condition position (identity, or zeros for class_rope="zero"), then the
        codes' 2-D RoPE."""
        grid = rope_2d(*self.grid, self.head_dim, self.rope_base, device=device)
        cond = rope_identity(1, self.head_dim, device)
        if self.class_rope == "zero":
            cond = torch.zeros_like(cond)
        return torch.cat([cond, grid[: length - 1]], dim=0)

    def _text_input(self, text_ids, text_lengths, width: int, drop=None):
        """(embedded left-padded captions [B, width, D], attention ids [B, width]: 0, or -1 where hidden)."""
        ids, valid = left_padded(text_ids, text_lengths.tolist(), width)
        valid = valid.to(ids.device)
        if drop is not None:  # the empty caption: every token but the eos hidden
            valid = valid & ~(drop[:, None] & (torch.arange(width, device=ids.device) < width - 1)[None])
        attn_ids = torch.where(valid, 0, -1)
        return self.text_embeddings(ids), attn_ids

    def _forward_text(self, codes, text_ids, text_lengths, drop_text) -> torch.Tensor:
        b, n = codes.shape
        check_text_inputs(text_ids, text_lengths, b, "this GPT")
        width = text_width(text_lengths.tolist(), self.sequence_multiple)
        drop = text_drop(b, self.text_dropout, self.training, drop_text, codes.device)
        text, text_attn = self._text_input(text_ids, text_lengths, width, drop)
        x = self.tok_dropout(torch.cat([text.to(self.tok_embeddings.weight.dtype),
                                        self.tok_embeddings(codes[:, :-1])], 1))
        ids = torch.cat([text_attn, text_attn.new_zeros(b, n - 1)], 1)
        mask = AttentionMask(causal=True, q_ids=ids, kv_ids=ids)
        rope = self.text_rope_table(width, n - 1, codes.device)
        for layer in self.layers:
            x = layer(x, mask, rope)
        if self.sequence_multiple == 1:  # the head on the code positions only (under TP x is a sequence shard)
            return self.output(self.norm(x[:, width - 1:])).float()
        return self.output(self.norm(x)).float()[:, width - 1:]

    def text_rope_table(self, width: int, n_codes: int, device) -> torch.Tensor:
        """[width + n_codes, head_dim/2, 2]: right-aligned caption slots, then the first codes' 2-D RoPE."""
        grid = rope_2d(*self.grid, self.head_dim, self.rope_base, device=device)
        return torch.cat([text_rope(width, self.head_dim, self.rope_base, device), grid[:n_codes]], dim=0)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, layout=None,
                drop_class: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_lengths: torch.Tensor | None = None, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, N] -> logits [B, N, vocab] (fp32); `layout` is accepted and ignored; `drop_class` [B] bool:
        which labels class dropout replaces (see `drop_labels`). Text models: ragged captions `text_ids` [Σ L],
        `text_lengths` [B] and `drop_text` [B] bool (which captions caption dropout empties, training only)."""
        b, n = codes.shape
        if n > self.grid[0] * self.grid[1]:
            raise ValueError(f"{n} codes do not fit the {self.grid} grid")
        if self.text_conditioned:
            return self._forward_text(codes, text_ids, text_lengths, drop_text)
        cond = self.condition(labels, b, codes.device, drop_class)
        x = torch.cat([cond[:, None].to(self.tok_embeddings.weight.dtype), self.tok_embeddings(codes[:, :-1])], 1)
        x = self.tok_dropout(x)
        rope = self.rope_table(n, codes.device)
        mask = AttentionMask(causal=True)
        for layer in self.layers:
            x = layer(x, mask, rope)
        return self.output(self.norm(x)).float()

    # ------------------------------------------------------------------------------- incremental decoding
    def new_cache(self, batch: int, text_width: int = 0) -> KVCache:
        """An empty KV cache for `batch` rows: room for the condition and codes 0..N-2 (N input positions); a
        text model's room for `text_width` caption slots (the longest caption) instead of the condition."""
        n = self.grid[0] * self.grid[1]
        if text_width:
            cache = MaskedKVCache(len(self.layers), batch, text_width + n - 1)
            cache.text_width = text_width
            return cache
        return KVCache(len(self.layers), batch, n)

    def step(self, cache: KVCache, codes: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
             text_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` one step at a time: logits [B, L, vocab] of the L input positions this call adds.

        Input position p holds the condition (p = 0) or code p-1 and predicts code p. On an empty cache the
        condition (from `labels`; null class when None; the start vector for the entropy model) is prepended, so
        `step(cache, None, labels)` gives the logits of code 0 and each later `step(cache, codes[:, [k]])` those
        of code k+1. Equals `forward(codes)` at the same positions (up to float rounding). A text model's first call
        prefills the captions (`text_ids` / `text_lengths`, ragged; cache from `new_cache(batch, text_width)`) and
        returns the logits of its `text_width` slots (then of `codes`), the last slot (the eos) predicting code 0.
        """
        if self.text_conditioned:
            return self._step_text(cache, codes, text_ids, text_lengths)
        start = cache.length
        parts = []
        if start == 0:
            device = self.tok_embeddings.weight.device if codes is None else codes.device
            parts.append(self.condition(labels, cache.batch, device)[:, None].to(self.tok_embeddings.weight.dtype))
        if codes is not None and codes.shape[1] > 0:
            parts.append(self.tok_embeddings(codes))
        if not parts:
            raise ValueError("GPT.step: nothing to add (the cache already holds the condition and codes is empty)")
        x = self.tok_dropout(torch.cat(parts, dim=1))
        new = x.shape[1]
        if start + new > cache.max_len:
            raise ValueError(f"GPT.step: {start + new} input positions exceed the {self.grid} grid's "
                             f"{cache.max_len}")
        key = ("rope", str(x.device))
        if key not in cache.tables:
            cache.tables[key] = self.rope_table(cache.max_len, x.device)
        rope = cache.tables[key][start:start + new]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i, rope)
        cache.advance(new)
        return self.output(self.norm(x)).float()

    def _step_text(self, cache, codes, text_ids, text_lengths) -> torch.Tensor:
        width = getattr(cache, "text_width", 0)
        if not width:
            raise ValueError("GPT.step: a text model needs new_cache(batch, text_width=longest caption)")
        start = cache.length
        if start == 0:
            check_text_inputs(text_ids, text_lengths, cache.batch, "this GPT")
            x, attn_ids = self._text_input(text_ids, text_lengths, width)
            cache.key_valid[:, :width] = attn_ids.cpu() >= 0
            x = x.to(self.tok_embeddings.weight.dtype)
            if codes is not None and codes.shape[1] > 0:
                x = torch.cat([x, self.tok_embeddings(codes)], 1)
        elif codes is None or codes.shape[1] == 0:
            raise ValueError("GPT.step: nothing to add (the cache already holds the captions and codes is empty)")
        else:
            x = self.tok_embeddings(codes)
        x = self.tok_dropout(x)
        new = x.shape[1]
        if start + new > cache.max_len:
            raise ValueError(f"GPT.step: {start + new} input positions exceed the cache's {cache.max_len}")
        key = ("text-rope", str(x.device))
        if key not in cache.tables:
            cache.tables[key] = self.text_rope_table(width, cache.max_len - width, x.device)
        rope = cache.tables[key][start:start + new]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i, rope)
        cache.advance(new)
        return self.output(self.norm(x)).float()
