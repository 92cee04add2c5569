"""DPAR: BLT-style local encoder -> global transformer over patches -> local decoder over codes.

Alignment (what makes it causal; each line is checked by tests/test_models_leak.py):

* encoder: e_t = causal self-attention over codes 0..t (2-D RoPE) -> e_t depends on codes <= t.
* patch m = codes s_m..f_m. Query = max-pool(e_{s_m..f_m}); one cross-attention (+ FFN) in which it sees only
  e_{s_m..f_m}  ->  P_m depends on codes <= f_m.
* global: packed [class, P_0, ..., P_{M-1}], block-causal per image. Output g_m at image position m summarises
  class + P_0..P_{m-1}, i.e. codes <= f_{m-1} = s_m - 1 (the last patch's output, g_M, is never used).
* decoder position t (predicts code t, which lies in patch m): input = e_{t-1} (a learned start vector for t = 0)
  + Linear(RMSNorm(g_m)); then causal self-attention over the codes with the 2-D RoPE of code t.
  Every input at positions <= t depends on codes < t only, so logits[:, t] does too.

A static-patch DPAR is the same model with a fixed-length layout; P_max = 1 gives one patch per code.
"""
from __future__ import annotations

import torch
from torch import nn

from dpar_scale.layout import PatchLayout

from .attention import AttentionMask
from .layers import CrossAttentionBlock, RMSNorm, TransformerBlock, drop_labels, init_llamagen_
from .rope import rope_1d, rope_2d, rope_dynamic


class DPAR(nn.Module):
    PARAM_GROUPS = {"tok_embeddings": "embeddings", "class_embedding": "embeddings",
                    "encoder_layers": "encoder", "patch_cross_attn": "encoder", "global_layers": "global",
                    "dec_start": "decoder", "global_to_local_norm": "decoder", "global_to_local": "decoder",
                    "decoder_layers": "decoder", "norm": "head", "output": "head"}

    def __init__(self, *, dim: int, n_heads: int, n_encoder_layers: int, n_global_layers: int,
                 n_decoder_layers: int, vocab_size: int, num_classes: int, grid: tuple[int, int],
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, dropout: float = 0.0,
                 class_dropout: float = 0.0, rope_base: float = 10000.0, global_rope: str = "dynamic",
                 norm_eps: float = 1e-5, attention_backend: str = "sdpa"):
        super().__init__()
        if num_classes < 1:
            raise ValueError("DPAR is class-conditional: num_classes must be >= 1")
        if global_rope not in ("dynamic", "1d"):
            raise ValueError(f"global_rope {global_rope!r} is not one of dynamic, 1d")
        self.dim, self.vocab_size, self.num_classes = dim, vocab_size, num_classes
        self.grid, self.head_dim, self.rope_base = tuple(grid), dim // n_heads, rope_base
        self.class_dropout, self.global_rope = class_dropout, global_rope

        def blocks(n):
            return nn.ModuleList(
                TransformerBlock(dim, n_heads, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
                                 dropout=dropout, norm_eps=norm_eps, backend=attention_backend)
                for _ in range(n))

        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # + the null class for CFG
        self.tok_dropout = nn.Dropout(dropout)
        self.encoder_layers = blocks(n_encoder_layers)
        self.patch_cross_attn = CrossAttentionBlock(dim, n_heads, multiple_of=multiple_of,
                                                    ffn_dim_multiplier=ffn_dim_multiplier, dropout=dropout,
                                                    norm_eps=norm_eps, backend=attention_backend)
        self.global_dropout = nn.Dropout(dropout)
        self.global_layers = blocks(n_global_layers)
        self.dec_start = nn.Parameter(torch.zeros(dim))
        self.global_to_local_norm = RMSNorm(dim, norm_eps)
        self.global_to_local = nn.Linear(dim, dim, bias=False)
        self.decoder_layers = blocks(n_decoder_layers)
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """LlamaGen init (N(0, 0.02), zero output head). Call again after materialising from the meta device."""
        init_llamagen_(self)
        nn.init.normal_(self.dec_start, std=0.02)
        nn.init.zeros_(self.output.weight)

    # ------------------------------------------------------------------------------------------------ stages
    def code_rope(self, n: int, device) -> torch.Tensor:
        return rope_2d(*self.grid, self.head_dim, self.rope_base, device=device)[:n]

    def global_rope_table(self, layout: PatchLayout) -> torch.Tensor:
        """[T, head_dim/2, 2]; class and padding positions have all-zero positions -> identity rotation."""
        if self.global_rope == "1d":
            return rope_1d(layout.packed_pos, self.head_dim, self.rope_base)
        return rope_dynamic(layout.packed_row, layout.packed_col_start, layout.packed_col_end, self.head_dim,
                            self.rope_base)

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code states e [B, N, D] after the causal local encoder."""
        h = self.tok_dropout(self.tok_embeddings(codes))
        rope, mask = self.code_rope(codes.shape[1], codes.device), AttentionMask(causal=True)
        for layer in self.encoder_layers:
            h = layer(h, mask, rope)
        return h

    def patch_embeddings(self, enc: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """[B, M, D]: each patch's max-pooled query cross-attends to its own codes (padding patches stay 0)."""
        b, n, d = enc.shape
        m = layout.max_patches
        index = layout.patch_id[..., None].expand(b, n, d)
        pooled = enc.new_zeros(b, m, d).scatter_reduce(1, index, enc, reduce="amax", include_self=False)
        query_ids = torch.where(layout.patch_valid, torch.arange(m, device=enc.device)[None], -1)
        mask = AttentionMask(q_ids=query_ids, kv_ids=layout.patch_id)
        patches = self.patch_cross_attn(pooled, enc, mask)
        return patches * layout.patch_valid[..., None].to(patches.dtype)

    def run_global(self, patches: torch.Tensor, labels: torch.Tensor | None, layout: PatchLayout) -> torch.Tensor:
        """Global outputs [T, D] over the packed [class, patches...] sequence of every image (block-causal)."""
        b = patches.shape[0]
        if labels is None:  # unconditional (the CFG branch): every image gets the null class
            labels = torch.full((b,), self.num_classes, dtype=torch.long, device=patches.device)
        labels = drop_labels(labels, self.num_classes, self.class_dropout, self.training)
        x = self.global_dropout(layout.pack(self.class_embedding(labels), patches))[None]  # [1, T, D]
        ids = layout.packed_image_id[None]
        mask = AttentionMask(causal=True, q_ids=ids, kv_ids=ids)
        rope = self.global_rope_table(layout)
        for layer in self.global_layers:
            x = layer(x, mask, rope)
        return x[0]

    def decode(self, enc: torch.Tensor, global_out: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """Logits [B, N, vocab]: position t sees e_{t-1} (start vector at t = 0) + the global state of its patch."""
        b, n, d = enc.shape
        start = self.dec_start.to(enc.dtype)[None, None].expand(b, 1, d)
        h = torch.cat([start, enc[:, :-1]], dim=1)
        h = h + self.global_to_local(self.global_to_local_norm(layout.gather_codes(global_out)))
        rope, mask = self.code_rope(n, enc.device), AttentionMask(causal=True)
        for layer in self.decoder_layers:
            h = layer(h, mask, rope)
        return self.output(self.norm(h)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                layout: PatchLayout | None = None) -> torch.Tensor:
        """codes [B, N] (full H·W grid) + layout -> logits [B, N, vocab], `logits[:, t]` predicts `codes[:, t]`."""
        if layout is None:
            raise ValueError("DPAR needs a PatchLayout (PatchLayout.from_lengths(patch_lengths, grid)); "
                             "use PatchLayout.static(B, grid, 1) for one patch per code")
        if tuple(layout.patch_id.shape) != tuple(codes.shape):
            raise ValueError(f"layout covers {tuple(layout.patch_id.shape)} codes, batch has {tuple(codes.shape)}")
        enc = self.encode(codes)
        patches = self.patch_embeddings(enc, layout)
        global_out = self.run_global(patches, labels, layout)
        return self.decode(enc, global_out, layout)
