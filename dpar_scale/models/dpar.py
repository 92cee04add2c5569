"""DPAR: BLT-style local encoder -> global transformer over patches -> local decoder over codes.

Alignment (what makes it causal; each line is checked by tests/test_models_leak.py):

* encoder: e_t = causal self-attention over codes 0..t (2-D RoPE) -> e_t depends on codes <= t.
* patch m = codes s_m..f_m. Query = max-pool(e_{s_m..f_m}); one cross-attention (RMSNorm on the query and on the
  keys/values, wq/wk/wv/wo, residual; no FFN unless cross_attn_ffn) in which it sees only e_{s_m..f_m}
  ->  P_m depends on codes <= f_m.
* global: packed [class, P_0, ..., P_{M-1}], block-causal per image. Output g_m at image position m summarises
  class + P_0..P_{m-1}, i.e. codes <= f_{m-1} = s_m - 1 (the last patch's output, g_M, is never used).
* decoder position t (predicts code t, which lies in patch m): input = e_{t-1} (a learned start vector for t = 0);
  before *every* decoder layer l the position adds W_l·RMSNorm_l(g_m) (decoder_injection=every, the authors'
  model: a one-key cross-attention of which only the output projection remains), then layer l's causal
  self-attention over the codes with the 2-D RoPE of code t. decoder_injection=first adds W·RMSNorm(g_m) once,
  before the first layer. Every input at positions <= t depends on codes < t only (g_m on codes < s_m <= t),
  so logits[:, t] does too.

Text conditioning (text_vocab_size > 0; dpar_scale.models.text_prefix): the caption's tokens replace the class
position, so the global document of an image is [text..., P_0, ..., P_{M-1}] (PatchLayout cond_lengths) and g_0 is
the output at the caption's eos; everything above holds with "class" read as "caption".

A static-patch DPAR is the same model with a fixed-length layout; P_max = 1 gives one patch per code.

Incremental decoding (generation) runs the same three stages one code at a time on a `DPARCache`: `start` (class
position of the global model, then decoder position 0), then per code `step`: `step_encode` (encoder position of
the code just sampled), `step_patches` for the images whose open patch that code completed (max-pool +
cross-attention over the patch's cached encoder states, then one global position), `step_decode` (decoder position
of the next code, injecting the current global state exactly as `decode` does). Which patches close is the
caller's decision (dpar_scale.sampling.generate applies the patch rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dpar_scale.config import DECODER_INJECTIONS
from dpar_scale.patching.layout import PatchLayout

from .attention import AttentionMask, KVCache
from .packed_attention import gather_keys
from .layers import CrossAttentionBlock, DecoderBlock, RMSNorm, TransformerBlock, drop_labels, init_llamagen_
from .rope import rope_1d, rope_2d, rope_dynamic
from .text_prefix import MaskedKVCache, check_text_inputs, hide_dropped_captions, left_padded, text_drop


@dataclass(eq=False)
class DPARCache:
    """Incremental-decoding state of one batch of B rows (images, or the two CFG halves of them).

    The encoder and decoder caches advance in lockstep (one code per step for every row); the global cache is
    ragged: row b holds its class position and the patches it has closed so far (`num_patches[b]`).
    """

    encoder: KVCache
    glob: KVCache
    decoder: KVCache
    patch_start: torch.Tensor  # [B] long (CPU): first code of each row's open (not yet summarised) patch
    num_patches: torch.Tensor  # [B] long (CPU): patches each row has sent through the global model
    enc_states: torch.Tensor | None = None  # [B, N, D] encoder outputs of the codes encoded so far
    global_state: torch.Tensor | None = None  # [B, D] global output feeding the codes of each row's open patch
    n_encoded: int = 0  # codes through the encoder
    n_decoded: int = 0  # decoder positions done (= logits produced per row)
    tables: dict = field(default_factory=dict)  # memoised code RoPE table

    @property
    def batch(self) -> int:
        return self.encoder.batch


PATCH_BUCKET = 32  # compiled blocks: the patch count M is padded to a multiple of this


class GlobalToCodes(nn.Module):
    """Packed global outputs [T, D] -> [B, N, D]: code t gets the output at its patch's position (class + the
    patches before it). A module of its own, without parameters, so that a tensor-parallel plan can keep just
    each rank's sequence shard of the result for the decoder layers."""

    def forward(self, global_out: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        return layout.gather_codes(global_out)


class DPAR(nn.Module):
    PARAM_GROUPS = {"tok_embeddings": "embeddings", "class_embedding": "embeddings", "text_embeddings": "embeddings",
                    "encoder_layers": "encoder", "patch_cross_attn": "encoder", "global_layers": "global",
                    "dec_start": "decoder", "global_to_local_norm": "decoder", "global_to_local": "decoder",
                    "decoder_layers": "decoder", "norm": "head", "output": "head"}

    def __init__(self, *, dim: int, n_heads: int, n_encoder_layers: int, n_global_layers: int,
                 n_decoder_layers: int, vocab_size: int, num_classes: int, grid: tuple[int, int],
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, dropout: float = 0.0,
                 class_dropout: float = 0.0, rope_base: float = 10000.0, global_rope: str = "dynamic",
                 norm_eps: float = 1e-5, attention_backend: str = "auto", decoder_injection: str = "every",
                 cross_attn_ffn: bool = False, text_vocab_size: int = 0, text_dropout: float = 0.0):
        super().__init__()
        if num_classes < 1 and text_vocab_size < 1:
            raise ValueError("DPAR is conditional: num_classes must be >= 1 (or text_vocab_size for text)")
        if global_rope not in ("dynamic", "1d"):
            raise ValueError(f"global_rope {global_rope!r} is not one of dynamic, 1d")
        if decoder_injection not in DECODER_INJECTIONS:
            raise ValueError(f"decoder_injection {decoder_injection!r} is not one of {', '.join(DECODER_INJECTIONS)}")
        self.dim, self.vocab_size, self.num_classes = dim, vocab_size, num_classes
        self.grid, self.head_dim, self.rope_base = tuple(grid), dim // n_heads, rope_base
        self.class_dropout, self.global_rope = class_dropout, global_rope
        self.decoder_injection, self.cross_attn_ffn = decoder_injection, cross_attn_ffn
        self.attention_backend = attention_backend
        self.blocks_compiled = False  # set by parallel.apply_compile: attention plans then keep shapes bucketed
        self.text_vocab_size, self.text_dropout = text_vocab_size, text_dropout

        def blocks(n, block=TransformerBlock):
            return nn.ModuleList(
                block(dim, n_heads, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
                      dropout=dropout, norm_eps=norm_eps, backend=attention_backend)
                for _ in range(n))

        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        if self.text_conditioned:  # the caption is the condition; its empty version ([eos]) the CFG null
            self.text_embeddings = nn.Embedding(text_vocab_size, dim)
        else:
            self.class_embedding = nn.Embedding(num_classes + 1, dim)  # + the null class for CFG
        self.tok_dropout = nn.Dropout(dropout)
        self.encoder_layers = blocks(n_encoder_layers)
        self.patch_cross_attn = CrossAttentionBlock(dim, n_heads, ffn=cross_attn_ffn, multiple_of=multiple_of,
                                                    ffn_dim_multiplier=ffn_dim_multiplier, dropout=dropout,
                                                    norm_eps=norm_eps, backend=attention_backend)
        self.global_dropout = nn.Dropout(dropout)
        self.global_layers = blocks(n_global_layers)
        self.global_to_codes = GlobalToCodes()
        self.dec_start = nn.Parameter(torch.zeros(dim))
        if decoder_injection == "first":  # one injection before the stack (parameter names as before the option)
            self.global_to_local_norm = RMSNorm(dim, norm_eps)
            self.global_to_local = nn.Linear(dim, dim, bias=False)
            self.decoder_layers = blocks(n_decoder_layers)
        else:  # each decoder layer owns its RMSNorm + Linear
            self.decoder_layers = blocks(n_decoder_layers, DecoderBlock)
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.init_weights()

    @property
    def text_conditioned(self) -> bool:
        return self.text_vocab_size > 0

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
        valid_patch = layout.patch_valid
        # each patch query against its own <= P codes, gathered (not a [B, M, N] mask); P from the host's lengths
        width = max(max(x) for x in layout.lengths)
        starts, patch_len = layout.patch_start, torch.where(valid_patch, layout.patch_end - layout.patch_start + 1, 0)
        if self.blocks_compiled:  # bucket M and P so the compiled block sees a handful of shapes, not one per batch
            pad = -(-m // PATCH_BUCKET) * PATCH_BUCKET - m
            width = 1 << (width - 1).bit_length()
            pooled = nn.functional.pad(pooled, (0, 0, 0, pad))
            starts, patch_len, valid_patch = (nn.functional.pad(x, (0, pad)) for x in (starts, patch_len, valid_patch))
        query_ids = torch.where(valid_patch, torch.arange(valid_patch.shape[1], device=enc.device)[None], -1)
        index, valid = gather_keys(starts, patch_len, width)
        mask = AttentionMask.gathered(query_ids, layout.patch_id, index, valid)
        patches = self.patch_cross_attn(pooled, enc, mask)[:, :m]
        return patches * layout.patch_valid[..., None].to(patches.dtype)

    def run_global(self, patches: torch.Tensor, labels: torch.Tensor | None, layout: PatchLayout,
                   drop_class: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                   drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """Global outputs [T, D] over the packed [class | text..., patches...] sequence of every image
        (block-causal)."""
        b = patches.shape[0]
        ids, doc_lengths = layout.packed_image_id, layout.doc_lengths
        if self.text_conditioned:
            cond = self.text_embeddings(text_ids)
            drop = text_drop(b, self.text_dropout, self.training, drop_text)
            if drop is not None and bool(drop.any()):  # the empty caption: all but the eos split off (text_prefix)
                ids, doc_lengths = hide_dropped_captions(layout, drop)
        else:
            if labels is None:  # unconditional (the CFG branch): every image gets the null class
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=patches.device)
            labels = drop_labels(labels, self.num_classes, self.class_dropout, self.training, drop_class)
            cond = self.class_embedding(labels)
        x = self.global_dropout(layout.pack(cond, patches))[None]  # [1, T, D]
        # the plan (document groups, cu_seqlens or block mask) is built here, once per batch, outside the blocks
        mask = AttentionMask.packed(ids[None], doc_lengths)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        mask.prepare(self.attention_backend, x.device, dtype, compiled=self.blocks_compiled)
        rope = self.global_rope_table(layout)
        for layer in self.global_layers:
            x = layer(x, mask, rope)
        return x[0]

    def _inject_global(self, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(decoder input, keywords for every decoder layer): the global state g of each position's patch (h's
        shape) enters once here (decoder_injection=first) or inside every layer (every)."""
        if self.decoder_injection == "first":
            return h + self.global_to_local(self.global_to_local_norm(g)), {}
        return h, {"context": g}

    def decode(self, enc: torch.Tensor, global_out: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """Logits [B, N, vocab]: position t sees e_{t-1} (start vector at t = 0) + the global state of its patch."""
        b, n, d = enc.shape
        start = self.dec_start.to(enc.dtype)[None, None].expand(b, 1, d)
        h, context = self._inject_global(torch.cat([start, enc[:, :-1]], dim=1),
                                         self.global_to_codes(global_out, layout))
        rope, mask = self.code_rope(n, enc.device), AttentionMask(causal=True)
        for layer in self.decoder_layers:
            h = layer(h, mask, rope, **context)
        return self.output(self.norm(h)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                layout: PatchLayout | None = None, drop_class: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, text_lengths: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, N] (full H·W grid) + layout -> logits [B, N, vocab], `logits[:, t]` predicts `codes[:, t]`.
        `drop_class` [B] bool: which labels class dropout replaces (see `drop_labels`). Text models: the ragged
        captions `text_ids` [Σ L] / `text_lengths` [B], the layout built with cond_lengths=text_lengths, and
        `drop_text` [B] bool: which captions caption dropout empties (training only)."""
        if layout is None:
            raise ValueError("DPAR needs a PatchLayout (PatchLayout.from_lengths(patch_lengths, grid)); "
                             "use PatchLayout.static(B, grid, 1) for one patch per code")
        if tuple(layout.patch_id.shape) != tuple(codes.shape):
            raise ValueError(f"layout covers {tuple(layout.patch_id.shape)} codes, batch has {tuple(codes.shape)}")
        if self.text_conditioned:
            check_text_inputs(text_ids, text_lengths, codes.shape[0], "this DPAR")
            if text_ids.shape[0] != layout.num_cond_positions:
                raise ValueError(f"the layout holds {layout.num_cond_positions} condition positions, the captions "
                                 f"{text_ids.shape[0]} tokens: build it with cond_lengths=text_lengths")
        enc = self.encode(codes)
        patches = self.patch_embeddings(enc, layout)
        global_out = self.run_global(patches, labels, layout, drop_class, text_ids, drop_text)
        return self.decode(enc, global_out, layout)

    # ------------------------------------------------------------------------------- incremental decoding
    def new_cache(self, batch: int, text_width: int = 0) -> DPARCache:
        """`text_width`: a text model's prefix room, the longest caption the rows will be started with."""
        n = self.grid[0] * self.grid[1]
        glob = (MaskedKVCache(len(self.global_layers), batch, n + text_width) if text_width
                else KVCache(len(self.global_layers), batch, n + 1))
        return DPARCache(encoder=KVCache(len(self.encoder_layers), batch, n),
                         glob=glob,
                         decoder=KVCache(len(self.decoder_layers), batch, n),
                         patch_start=torch.zeros(batch, dtype=torch.long),
                         num_patches=torch.zeros(batch, dtype=torch.long))

    def _code_rope_at(self, cache: DPARCache, t: int, device) -> torch.Tensor:
        key = ("code", str(device))
        if key not in cache.tables:
            cache.tables[key] = self.code_rope(self.grid[0] * self.grid[1], device)
        return cache.tables[key][t:t + 1]

    def _global_rope_rows(self, row, col_start, col_end, pos, device) -> torch.Tensor:
        """[R, 1, head_dim/2, 2]: the table `global_rope_table` gives these packed positions in training."""
        if self.global_rope == "1d":
            return rope_1d(pos.to(device)[:, None], self.head_dim, self.rope_base)
        return rope_dynamic(row.to(device)[:, None], col_start.to(device)[:, None], col_end.to(device)[:, None],
                            self.head_dim, self.rope_base)

    def step_class(self, cache: DPARCache, labels: torch.Tensor | None = None) -> None:
        """Global position 0 (the class; null class when labels is None) for every row."""
        if cache.global_state is not None:
            raise RuntimeError("DPAR.step_class: the cache already holds the class position")
        b, device = cache.batch, self.class_embedding.weight.device
        if labels is None:
            labels = torch.full((b,), self.num_classes, dtype=torch.long, device=device)
        labels = drop_labels(labels, self.num_classes, self.class_dropout, self.training)
        x = self.global_dropout(self.class_embedding(labels))[:, None]
        zero = torch.zeros(b, dtype=torch.long)
        rope = self._global_rope_rows(zero, zero, zero, zero, x.device)
        for i, layer in enumerate(self.global_layers):
            x = layer.step(x, cache.glob, i, rope)
        cache.glob.advance(1)
        cache.global_state = x[:, 0]

    def step_text(self, cache: DPARCache, text_ids: torch.Tensor, text_lengths: torch.Tensor) -> None:
        """The caption prefix of every row, prefilled in one pass: right-aligned in the cache's text room (left
        padding hidden from every later query), at the positions training gives it; the global state is then the
        output at each caption's eos."""
        if cache.global_state is not None:
            raise RuntimeError("DPAR.step_text: the cache already holds its prefix")
        check_text_inputs(text_ids, text_lengths, cache.batch, "this DPAR")
        if not isinstance(cache.glob, MaskedKVCache):
            raise RuntimeError("DPAR.step_text: make the cache with new_cache(batch, text_width=longest caption)")
        width = cache.glob.max_len - self.grid[0] * self.grid[1]
        ids, valid = left_padded(text_ids, text_lengths.tolist(), width)
        cache.glob.key_valid[:, :width] = valid
        x = self.global_dropout(self.text_embeddings(ids))
        pos = torch.arange(width) - (width - 1)
        zero = torch.zeros_like(pos)
        rope = self._global_rope_rows(pos, zero, zero, pos, x.device)[:, 0]
        for i, layer in enumerate(self.global_layers):
            x = layer.step(x, cache.glob, i, rope)
        cache.glob.advance(width)
        cache.global_state = x[:, -1]

    def step_encode(self, cache: DPARCache, codes: torch.Tensor) -> None:
        """Encoder position of the next code: codes [B] (code number `cache.n_encoded` of every row)."""
        t = cache.n_encoded
        h = self.tok_dropout(self.tok_embeddings(codes.reshape(-1, 1)))
        rope = self._code_rope_at(cache, t, h.device)
        for i, layer in enumerate(self.encoder_layers):
            h = layer.step(h, cache.encoder, i, rope)
        cache.encoder.advance(1)
        if cache.enc_states is None:
            cache.enc_states = h.new_zeros(cache.batch, self.grid[0] * self.grid[1], h.shape[-1])
        cache.enc_states[:, t] = h[:, 0]
        cache.n_encoded = t + 1

    def step_patches(self, cache: DPARCache, rows: torch.Tensor) -> None:
        """Closes the open patch of each row in `rows` (codes patch_start..n_encoded-1, all encoded): max-pool +
        cross-attention over its cached encoder states, then one global position for those rows only."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu().reshape(-1)
        if rows.numel() == 0:
            return
        if cache.global_state is None:
            raise RuntimeError("DPAR.step_patches: call step_class first")
        end = cache.n_encoded  # exclusive
        starts = cache.patch_start[rows]
        if bool((starts >= end).any()):
            raise RuntimeError("DPAR.step_patches: a row's open patch holds no encoded code")
        device = cache.enc_states.device
        lo = int(starts.min())
        rows_dev = rows.to(device)
        window = cache.enc_states[rows_dev, lo:end]  # [R, W, D]
        own = torch.arange(lo, end)[None, :] >= starts[:, None]  # [R, W]: code belongs to the row's patch
        pooled = window.masked_fill(~own.to(device)[..., None], float("-inf")).amax(1, keepdim=True)
        mask = AttentionMask(q_ids=torch.ones(len(rows), 1, dtype=torch.long), kv_ids=own.long())
        x = self.global_dropout(self.patch_cross_attn(pooled, window, mask))
        w = self.grid[1]
        rope = self._global_rope_rows(starts // w, starts % w, torch.full_like(starts, (end - 1) % w),
                                      cache.num_patches[rows] + 1, device)
        for i, layer in enumerate(self.global_layers):
            x = layer.step(x, cache.glob, i, rope, rows=rows)
        cache.glob.advance(1, rows)
        cache.global_state[rows_dev] = x[:, 0]
        cache.num_patches[rows] += 1
        cache.patch_start[rows] = end

    def step_decode(self, cache: DPARCache) -> torch.Tensor:
        """Logits [B, vocab] of the next code t = n_decoded: decoder input e_{t-1} (start vector at t = 0) plus
        the current global state. Patches that end at code t-1 must have been closed first."""
        t = cache.n_decoded
        if cache.global_state is None:
            raise RuntimeError("DPAR.step_decode: call step_class first")
        if t > cache.n_encoded or t >= self.grid[0] * self.grid[1]:
            raise RuntimeError(f"DPAR.step_decode: position {t} needs codes < {t} encoded "
                               f"({cache.n_encoded} are) and must lie in the grid")
        g = cache.global_state
        if t == 0:
            h = self.dec_start.to(g.dtype)[None, None].expand(cache.batch, 1, g.shape[-1])
        else:
            h = cache.enc_states[:, t - 1:t]
        h, context = self._inject_global(h, g[:, None])
        rope = self._code_rope_at(cache, t, h.device)
        for i, layer in enumerate(self.decoder_layers):
            h = layer.step(h, cache.decoder, i, rope, **context)
        cache.decoder.advance(1)
        cache.n_decoded = t + 1
        return self.output(self.norm(h)).float()[:, 0]

    def start(self, cache: DPARCache, labels: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
              text_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class position (or a text model's caption prefix), then the logits [B, vocab] of code 0."""
        if self.text_conditioned:
            self.step_text(cache, text_ids, text_lengths)
        else:
            self.step_class(cache, labels)
        return self.step_decode(cache)

    def step(self, cache: DPARCache, codes: torch.Tensor, close: torch.Tensor) -> torch.Tensor:
        """Feeds code t (codes [B]); `close` [B] bool says for which rows code t ends its patch (i.e. code t+1
        starts one). Returns the logits [B, vocab] of code t+1."""
        self.step_encode(cache, codes)
        self.step_patches(cache, torch.nonzero(torch.as_tensor(close).cpu(), as_tuple=False).flatten())
        return self.step_decode(cache)
