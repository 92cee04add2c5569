"""Text conditioning shared by DPAR and the GPT: the caption's tokens as a prefix of each image's sequence.

A text batch arrives ragged (dpar_scale.data.loader.Batch): `text_ids` long [Σ L_i] (each caption's sentencepiece
ids, eos last; the empty caption is [eos]) and `text_lengths` long [B]. The model embeds them with its own learned
table (`text_embeddings`, model.text.vocab_size rows) and puts them where the class embedding was:

* DPAR: each image's packed global document is [text_i, patch_0 ... patch_{M-1}] (PatchLayout `cond_lengths`), so
  the first patch's codes read the output at the caption's last token (its eos), packed images keep their own
  caption lengths (no padding), and the block-causal mask keeps every image on its own caption.
* GPT: each row is [text_i, code_0 ... code_{N-2}], the captions left-padded to the batch's longest (padding is
  masked: it sees nothing and nothing sees it), so that logits[:, t] still predicts code t.

Positions (module docstring of dpar_scale.patching.layout): the eos takes the class position's place (1-D position
0 / row 0, column 0: the identity rotation) and caption token j of L at position / row j - (L - 1), column 0 - the
caption is laid out as lines above the picture. Why: the image keeps exactly the positions (and the dynamic 2-D RoPE)
of the class-conditional model, so nothing about patches or codes changes with the caption's length; text-to-text
offsets are ordinary 1-D RoPE distances on the row frequencies; and right-aligning the caption at the image makes the
k-th last token sit at the same offset from every patch whatever the caption's length, which also lets left-padded
rows (the GPT, KV-cache prefill) share one RoPE table.

Caption dropout (classifier-free guidance, model.text.dropout): a dropped image trains on the empty caption [eos].
Because every caption already ends with eos, dropping is done by *hiding* its other tokens (DPAR: split off into
a document of their own; GPT: attention id -1, like padding), which is exactly the empty caption's computation
without rebuilding any layout;
the decision is the trainer's, per (seed, step, sample) (`class_drop_mask`), so it does not depend on the layout.
"""
from __future__ import annotations

import torch

from .attention import AttentionMask, KVCache
from .rope import rope_grid


def text_drop(batch: int, prob: float, training: bool, drop: torch.Tensor | None,
              device="cpu") -> torch.Tensor | None:
    """[B] bool on `device` (default the host, where attention plans are built): which captions become the empty
    caption (training only); `drop` is the caller's decision (else drawn from the global RNG)."""
    if not training or prob <= 0:
        return None
    if drop is None:
        drop = torch.rand(batch) < prob
    return drop.to(device)


def hide_dropped_captions(layout, drop: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(packed attention ids, document lengths) with every dropped caption's tokens but its eos split off into a
    document of their own (id B + image): the image's document is then [eos, patches...], exactly the empty
    caption's, and every packed-attention plan (grouped SDPA, varlen, flex) sees contiguous documents."""
    drop = drop.cpu()
    ids = layout.packed_image_id
    hide = (layout.packed_pos < 0) & (ids >= 0) & drop.to(ids.device)[ids.clamp(min=0)]
    ids = torch.where(hide, ids + layout.batch_size, ids)
    docs = []
    for i, (c, n) in enumerate(zip(layout.cond_lengths, layout.doc_lengths)):
        docs += [c - 1, n - c + 1] if bool(drop[i]) and c > 1 else [n]
    return ids, tuple(docs)


def check_text_inputs(text_ids, text_lengths, batch: int, who: str) -> None:
    if text_ids is None or text_lengths is None:
        raise ValueError(f"{who} is text-conditioned: pass text_ids [Σ L] and text_lengths [B] (a text Batch's, or "
                         f"dpar_scale.data.loader.ragged_text of the prompts; the empty caption is [eos])")
    if text_lengths.shape[0] != batch:
        raise ValueError(f"{who}: text_lengths has {text_lengths.shape[0]} captions for {batch} images")
    if text_ids.dim() != 1:
        raise ValueError(f"{who}: text_ids must be flat [Σ L] (ragged, batch order), got {tuple(text_ids.shape)}")


def left_padded(text_ids: torch.Tensor, lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged captions -> ids [B, width] right-aligned (pad id 0 on the left) and valid [B, width] bool."""
    if max(lengths) > width:
        raise ValueError(f"a caption of {max(lengths)} tokens does not fit {width} text positions")
    lens = torch.tensor(lengths, dtype=torch.long)
    slot = torch.arange(width)[None, :]
    valid = slot >= (width - lens)[:, None]
    first = torch.cumsum(lens, 0) - lens
    index = torch.where(valid, first[:, None] + slot - (width - lens)[:, None], torch.zeros_like(slot))
    ids = text_ids[index.to(text_ids.device)] * valid.to(text_ids.device)
    return ids, valid


def text_width(lengths: list[int], multiple: int = 1) -> int:
    """Text positions of a left-padded batch: its longest caption, grown so that width - 1 is a multiple of
    `multiple` (a GPT's sequence, width - 1 + N, then still splits evenly over a tensor-parallel group)."""
    longest = max(lengths)
    return 1 + -(-(longest - 1) // multiple) * multiple


def text_rope(width: int, head_dim: int, base: float, device=None) -> torch.Tensor:
    """[width, head_dim/2, 2] for right-aligned text slots: row k - (width - 1), column 0 (the last is identity)."""
    rows = torch.arange(width, device=device) - (width - 1)
    return rope_grid(rows, torch.zeros_like(rows), head_dim, base)


class MaskedKVCache(KVCache):
    """A KVCache whose rows may hold positions no query may see (`key_valid` False): the left padding of captions
    prefilled together. Every update's mask also hides those keys; otherwise it behaves as KVCache."""

    def __init__(self, n_layers: int, batch: int, max_len: int):
        super().__init__(n_layers, batch, max_len)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool)  # CPU, like `lengths`

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        start = self.length if rows is None else None
        keys, values, mask = super().update(layer, k, v, rows)
        span = keys.shape[2]
        if rows is None:
            valid = self.key_valid[:, :span]
            if bool(valid.all()):
                return keys, values, mask
            new = k.shape[2]
            return keys, values, AttentionMask(causal=True, q_offset=start, q_ids=torch.ones(self.batch, new,
                                                                                         dtype=torch.long),
                                               kv_ids=valid.long())
        rows_cpu = rows.cpu()
        visible = (torch.arange(span)[None, :] <= self.lengths[rows_cpu][:, None]) & self.key_valid[rows_cpu, :span]
        return keys, values, AttentionMask(q_ids=torch.ones(len(rows_cpu), 1, dtype=torch.long),
                                           kv_ids=visible.long())
