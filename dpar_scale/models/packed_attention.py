"""Plans for the two attentions whose masks come from a patch layout, built once per batch outside any compiled
region, so that the attention itself only reads tensors and a few ints.

* Packed causal self-attention (DPAR's global model): contiguous documents of lengths L_i in one row of T
  positions (the rest padding). `PackedPlan` lays them out for the chosen backend:
  - "sdpa" (CPU / any device, eager): documents sorted by length and cut into groups; a group of n documents is
    padded to its longest one, w, and runs as one causal SDPA call of batch n (no boolean mask: right padding
    behind a causal mask is never seen by a real query, so the flash kernels apply). `group_documents` keeps the
    computed pairs Σ_g n_g·w_g² ≤ slack · Σ L_i² (slack 1.1), instead of n·L_max² for one padded batch.
  - "dense" (sdpa under torch.compile): one [1, 1, T, T] block-causal mask over the bucketed T, so the graph's
    shapes depend on T only (T² pairs: the compiled CPU path is a correctness vehicle; GPUs compile varlen/flex).
  - "varlen" (CUDA, fp16/bf16): `torch.nn.attention.varlen.varlen_attn` over cu_seqlens (the padding runs as one
    extra document, then is zeroed), Σ L_i² pairs (flash's causal blocks skip about half).
  - "flex": a BlockMask of the document mask (empty blocks skipped).
* Patch cross-attention (DPAR's encoder): patch query m of image b sees only its own ≤ P codes. `gather_keys`
  runs it as a batch of B·M queries against [B·M, P] gathered keys with a key-padding mask, i.e. Σ over patches
  of P pairs, never a dense [B, M, N] mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GROUP_SLACK = 1.1  # computed pairs / Σ L_i² the grouped SDPA path may spend


def group_documents(lengths, slack: float = GROUP_SLACK) -> list[list[int]]:
    """Document indices in groups, longest first; each group is padded to its first (longest) member.

    A document joins the open group when the pairs its padding wastes, w² − L², are at most
    (slack − 1)/2 · (L² + mean L²): summed over documents the waste is ≤ (slack − 1) · Σ L², so the padded total
    is ≤ slack · Σ L², while short documents (whose own L² is small) still share a group instead of each making a
    call of its own (the mean-L² term)."""
    order, sizes = _document_groups(np.asarray([int(x) for x in lengths], dtype=np.int64), slack)
    cut = np.cumsum(sizes).tolist()
    order = order.tolist()
    return [order[a:z] for a, z in zip([0] + cut[:-1], cut)]


def _document_groups(lengths: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """(the non-empty documents longest first, ties by index; the size of each group along that order).

    Vectorised over documents, one pass per group: along the order w² − L² grows and the allowance
    (slack − 1)/2 · (L² + mean L²) shrinks, so a group's members are a prefix of the documents after its first,
    found with one comparison over them (the same float64 expression as a document-by-document test)."""
    if slack < 1:
        raise ValueError(f"slack must be >= 1, got {slack}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    order = order[lengths[order] > 0]
    if not len(order):
        return order, np.zeros(0, dtype=np.int64)
    sq = lengths[order] ** 2
    share = int(sq.sum()) / len(order)
    allowance = (slack - 1) / 2 * (sq + share)
    sizes, first = [], 0
    while first < len(order):
        # the documents after the group's first: True while they join, then False from the next group's first on
        joins = sq[first] - sq[first + 1:] <= allowance[first + 1:]
        size = 1 + (len(joins) if joins.all() else int(np.argmin(joins)))
        sizes.append(size)
        first += size
    return order, np.asarray(sizes, dtype=np.int64)


@dataclass(eq=False)
class PackedPlan:
    kind: str  # groups | dense | varlen | flex
    length: int  # T
    doc_lengths: tuple[int, ...]
    groups: tuple[tuple[int, int], ...] = ()  # (documents n, width w) per SDPA call (kind groups)
    index: torch.Tensor | None = None  # [Σ n·w] packed position of each slot of the grouped layout
    inverse: torch.Tensor | None = None  # [T] slot of each packed position (Σ n·w = a zero row, for padding)
    allowed: torch.Tensor | None = None  # [1, 1, T, T] bool (kind dense)
    valid: torch.Tensor | None = None  # [1, 1, T, 1] (dense), [T, 1, 1] (varlen) or [T, 1] (flex): query is a real position
    cu_seqlens: torch.Tensor | None = None  # [docs + 1 (+ 1)] int32 (kind varlen)
    max_len: int = 0
    block_mask: object = None  # kind flex

    @property
    def computed_pairs(self) -> int:
        """Query-key pairs the attention kernels are handed (the padding of each grouped call included)."""
        if self.kind == "groups":
            return sum(n * w * w for n, w in self.groups)
        if self.kind == "dense":
            return self.length ** 2
        return sum(x * x for x in self.doc_lengths)  # varlen / flex skip what lies outside the documents

    @property
    def needed_pairs(self) -> int:
        return sum(x * x for x in self.doc_lengths)


def build_packed_plan(kind: str, doc_lengths, length: int, device, mask=None,
                      slack: float = GROUP_SLACK) -> PackedPlan:
    """The plan of one packed causal self-attention (documents contiguous from position 0, padding after)."""
    doc_lengths = tuple(int(x) for x in doc_lengths)
    total = sum(doc_lengths)
    if total > length:
        raise ValueError(f"documents of {total} positions do not fit a packed length of {length}")
    plan = PackedPlan(kind=kind, length=length, doc_lengths=doc_lengths)
    real = torch.zeros(length, dtype=torch.bool)
    real[:total] = True
    if kind == "groups":
        # vectorised over documents: each document (longest first) gets w slots, w its group's width; slot a of
        # document d reads position start_d + min(a, L_d − 1) (pad slots repeat its last position: finite values,
        # and no real query ever sees them), and its real positions map back to their slots
        lens = np.asarray(doc_lengths, dtype=np.int64)
        order, sizes = _document_groups(lens, slack)
        starts = np.cumsum(lens) - lens
        group_first = np.cumsum(sizes) - sizes
        widths = lens[order[group_first]]
        slot_width = np.repeat(widths, sizes)  # per document along the order
        first_slot = np.cumsum(slot_width) - slot_width
        doc = np.repeat(order, slot_width)  # document of each slot
        a = np.arange(int(slot_width.sum())) - np.repeat(first_slot, slot_width)
        inside = a < lens[doc]
        index = starts[doc] + np.minimum(a, lens[doc] - 1)
        inverse = np.full(length, len(a), dtype=np.int64)  # padding positions read the zero row after the slots
        inverse[index[inside]] = np.flatnonzero(inside)
        plan.groups = tuple(zip(sizes.tolist(), widths.tolist()))
        plan.index = torch.from_numpy(index).to(device)
        plan.inverse = torch.from_numpy(inverse).to(device)
    elif kind == "dense":
        ids = mask.q_ids.to(device)
        plan.allowed = mask.dense(length, length, device) | ~real.to(device)[None, None, :, None]
        plan.valid = (ids[0] >= 0)[None, None, :, None]
    elif kind == "varlen":
        bounds = [0] + np.cumsum(doc_lengths, dtype=np.int64).tolist()
        if length > total:
            bounds.append(length)  # the padding as one more document: finite rows, zeroed afterwards
        plan.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        # an upper bound (it sizes the kernel's grid), rounded up so that compiled code, which specialises on
        # it, sees a handful of values
        plan.max_len = -(-max(max(doc_lengths, default=1), length - total) // 128) * 128
        plan.valid = real.to(device)[:, None, None]
    elif kind == "flex":
        plan.block_mask = mask.block_mask(1, length, length, device)
        plan.valid = real.to(device)[:, None]  # broadcasts over [1, H, T, Dh]
    else:
        raise ValueError(f"packed plan kind {kind!r} is not one of groups, dense, varlen, flex")
    return plan


def attend_grouped(q, k, v, plan: PackedPlan) -> torch.Tensor:
    """q/k/v [1, H, T, Dh] -> [1, H, T, Dh]: one causal SDPA call per document group (zeros at padding)."""
    h, dh = q.shape[1], q.shape[3]
    qs, ks, vs = (x[0].index_select(1, plan.index) for x in (q, k, v))  # [H, Σ n·w, Dh]
    outs, offset = [], 0
    for n, w in plan.groups:
        def part(x):
            return x[:, offset:offset + n * w].reshape(h, n, w, dh).transpose(0, 1)

        out = F.scaled_dot_product_attention(part(qs), part(ks), part(vs), is_causal=True)
        outs.append(out.transpose(0, 1).reshape(h, n * w, dh))
        offset += n * w
    outs.append(q.new_zeros(h, 1, dh))
    return torch.cat(outs, 1).index_select(1, plan.inverse)[None]


def attend_dense(q, k, v, plan: PackedPlan) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.allowed)
    return out * plan.valid.to(out.dtype)


@functools.lru_cache(maxsize=None)
def varlen_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    import importlib.util

    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if torch.cuda.get_device_capability()[0] < 8:
        return False, "varlen_attn (flash attention) needs compute capability >= 8.0"
    return True, ""


def attend_varlen(q, k, v, plan: PackedPlan) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    def flat(x):  # [1, H, T, Dh] -> [T, H, Dh] (the projection's own layout: a view, no copy)
        return x[0].transpose(0, 1)

    out = varlen_attn(flat(q), flat(k), flat(v), plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len,
                      window_size=(-1, 0))
    return (out * plan.valid.to(out.dtype)).transpose(0, 1)[None]


# ------------------------------------------------------------------------------- gathered cross-attention
def gather_keys(patch_start: torch.Tensor, patch_len: torch.Tensor, width: int):
    """(index [B, M, P], valid [B, M, P]): the codes patch m of image b covers, padded to P = `width`.
    patch_len is 0 for padding patches (they see nothing, and their output is zero)."""
    ar = torch.arange(width, device=patch_start.device)
    valid = ar < patch_len[..., None]
    index = torch.where(valid, patch_start[..., None] + ar, torch.zeros_like(patch_start)[..., None])
    return index, valid


def attend_gathered(q, k, v, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q [B, H, M, Dh] against k/v [B, H, N, Dh] where query m sees keys index[b, m, :valid] only: one SDPA call of
    batch B·M, one query each, over P gathered keys. Queries without keys give zeros."""
    b, h, m, dh = q.shape
    n, p = k.shape[2], index.shape[-1]
    flat = (index + torch.arange(b, device=index.device)[:, None, None] * n).reshape(-1)  # rows of [B·N]

    def gathered(x):  # [B, H, N, Dh] -> [B·M, H, P, Dh]
        rows = x.transpose(1, 2).reshape(b * n, x.shape[1], x.shape[3])
        return rows.index_select(0, flat).view(b * m, p, x.shape[1], x.shape[3]).transpose(1, 2)

    any_key = valid.any(-1)  # [B, M]
    # a query with no key would be softmax over nothing (NaN): let it see slot 0, then zero its output
    allowed = (valid | ~any_key[..., None]).reshape(b * m, 1, 1, p)
    qq = q.transpose(1, 2).reshape(b * m, h, 1, dh)
    out = F.scaled_dot_product_attention(qq, gathered(k), gathered(v), attn_mask=allowed)
    out = out.view(b, m, h, dh).transpose(1, 2)
    return out * any_key[:, None, :, None].to(out.dtype)
