"""One attention entry point with a backend switch; the mask is described, not materialised, by the caller.

`AttentionMask` says *which* keys a query may see (same id, optionally causal); each backend turns that description
into what it needs (a boolean tensor for SDPA, a BlockMask for flex_attention). The description is built once per
forward and shared by all layers, so both materialisations are cached on it.

Rule: query i (in row b) sees key j iff
    (q_ids is None or (q_ids[b, i] >= 0 and q_ids[b, i] == kv_ids[b, j]))
    and (not causal or j <= i + q_offset).
`q_ids` / `kv_ids` are document ids for packed self-attention (image id per position, -1 for padding) or group ids
for cross-attention (patch id of each query and of each code). `q_offset` places the queries after `q_offset`
cached keys, which is what an incremental-decoding KV cache needs; nothing else changes for it.

Query rows that see no key at all (padding) produce zeros, never NaN, on every backend.

Backends (`model.attention_backend`): "auto" (varlen on a CUDA device in fp16/bf16, else sdpa), "sdpa", "flex",
"varlen" (CUDA only). Packed self-attention and the patch cross-attention run from plans
(dpar_scale.models.packed_attention: documents grouped by length for SDPA, cu_seqlens for varlen, a BlockMask for
flex, [M, P_max] gathered keys for the patches) that `AttentionMask.prepare` builds once per batch, outside compiled
code; other masks (KV-cache steps, tests) fall back to `attend_reference`, a materialised [B, 1, Lq, Lk] mask. In
torch 2.13 flex runs eagerly on CPU for the forward only (its CPU backward raises), so CPU training uses sdpa.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .packed_attention import (
    PackedPlan, attend_dense, attend_gathered, attend_grouped, attend_varlen, build_packed_plan, group_documents,
    varlen_available,
)

BACKENDS = ("auto", "sdpa", "flex", "varlen")


@dataclass(eq=False)
class AttentionMask:
    causal: bool = False
    q_ids: torch.Tensor | None = None  # [B or 1, Lq] long; -1 = padding query (sees nothing)
    kv_ids: torch.Tensor | None = None  # [B or 1, Lk] long; must be given together with q_ids
    q_offset: int = 0  # absolute position of query 0 among the keys (KV cache)
    doc_lengths: tuple[int, ...] | None = None  # packed self-attention: document lengths, contiguous from 0
    kv_index: torch.Tensor | None = None  # [B, Lq, P] gathered cross-attention: the keys each query may see
    kv_valid: torch.Tensor | None = None  # [B, Lq, P] bool: which of those are real
    plan: PackedPlan | None = None  # set by `prepare` (outside compiled code)
    backend: str | None = None  # the backend `auto` resolved to, set by `prepare`
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if (self.q_ids is None) != (self.kv_ids is None):
            raise ValueError("AttentionMask: q_ids and kv_ids must be given together")

    @classmethod
    def packed(cls, ids: torch.Tensor, doc_lengths) -> "AttentionMask":
        """Block-causal self-attention over contiguous documents in one row (ids [1, T], -1 = padding) whose
        lengths the host already knows (a layout's), so no plan needs a device sync."""
        return cls(causal=True, q_ids=ids, kv_ids=ids, doc_lengths=tuple(int(x) for x in doc_lengths))

    @classmethod
    def gathered(cls, q_ids, kv_ids, index: torch.Tensor, valid: torch.Tensor) -> "AttentionMask":
        """Cross-attention in which query m of row b sees keys index[b, m, valid] (its group's, q_ids/kv_ids
        describing the same rule for the reference and the pair counts)."""
        return cls(q_ids=q_ids, kv_ids=kv_ids, kv_index=index, kv_valid=valid)

    @property
    def is_packed(self) -> bool:
        return (self.causal and self.q_ids is not None and self.q_ids is self.kv_ids and self.q_offset == 0
                and self.q_ids.shape[0] == 1)

    def prepare(self, backend: str, device, dtype, compiled: bool = False) -> "AttentionMask":
        """Builds what the backend will read (eagerly, once per batch), so the attention inside a compiled
        block only reads tensors and ints: `auto` resolved, and for packed self-attention its plan (under
        compile, sdpa uses one dense mask over the bucketed length so the graph's shapes depend on T only)."""
        self.backend = resolve_backend(backend, device, dtype)
        if self.is_packed:
            length = self.q_ids.shape[1]
            lengths = self.doc_lengths if self.doc_lengths is not None else _doc_lengths(self, length)
            if lengths is not None:
                kind = {"sdpa": "dense" if compiled else "groups"}.get(self.backend, self.backend)
                self.plan = build_packed_plan(kind, lengths, length, device, self)
        return self

    @property
    def is_plain_causal(self) -> bool:
        return self.causal and self.q_ids is None and self.q_offset == 0

    def dense(self, lq: int, lk: int, device) -> torch.Tensor:
        """Boolean [B or 1, 1, Lq, Lk] mask, True = may attend."""
        key = ("dense", lq, lk, str(device))
        if key not in self._cache:
            allowed = torch.ones(1, lq, lk, dtype=torch.bool, device=device)
            if self.causal:
                qpos = torch.arange(lq, device=device)[:, None] + self.q_offset
                allowed = allowed & (torch.arange(lk, device=device)[None, :] <= qpos)
            if self.q_ids is not None:
                qi, ki = self.q_ids.to(device), self.kv_ids.to(device)
                allowed = allowed & (qi[:, :, None] == ki[:, None, :]) & (qi[:, :, None] >= 0)
            self._cache[key] = allowed[:, None]
        return self._cache[key]

    def query_valid(self, lq: int, lk: int, device) -> torch.Tensor:
        """Bool [B or 1, 1, Lq, 1]: the query sees at least one key."""
        key = ("valid", lq, lk, str(device))
        if key not in self._cache:
            self._cache[key] = self.dense(lq, lk, device).any(-1, keepdim=True)
        return self._cache[key]

    def block_mask(self, batch: int, lq: int, lk: int, device):
        key = ("block", batch, lq, lk, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            causal, offset = self.causal, self.q_offset
            q_ids = self.q_ids.to(device) if self.q_ids is not None else None
            kv_ids = self.kv_ids.to(device) if self.kv_ids is not None else None
            ids_batch = q_ids.shape[0] if q_ids is not None else 1

            def mask_mod(b, h, q_idx, kv_idx):
                ok = kv_idx >= 0  # a tensor True, so the terms below can be and-ed uniformly
                if causal:
                    ok = ok & (kv_idx <= q_idx + offset)
                if q_ids is not None:
                    bi = b if ids_batch > 1 else 0
                    qi = q_ids[bi, q_idx]
                    ok = ok & (qi >= 0) & (qi == kv_ids[bi, kv_idx])
                return ok

            mask_batch = ids_batch if ids_batch > 1 else None
            self._cache[key] = create_block_mask(mask_mod, mask_batch, None, lq, lk, device=device)
        return self._cache[key]


def _doc_lengths(mask: AttentionMask, length: int):
    """Document lengths of a packed mask: given by its builder (host ints, no device sync), or read from the ids
    (eager callers only); None when a document is split in two (not contiguous: the dense path then)."""
    if mask.doc_lengths is not None:
        return mask.doc_lengths
    key = ("doc_lengths", length)
    if key not in mask._cache:
        ids = mask.q_ids[0].to("cpu")
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        keep = values >= 0
        contiguous = len(set(values[keep].tolist())) == int(keep.sum()) and bool((ids[int(counts[keep].sum()):] < 0).all())
        mask._cache[key] = tuple(counts[keep].tolist()) if contiguous else None
    return mask._cache[key]


def _packed_plan(q, mask: AttentionMask, kinds=("groups", "dense")):
    """The prepared plan (if its kind suits the backend) or a grouped one built now (eager), for packed causal
    self-attention; None for every other call."""
    if not (mask.is_packed and q.shape[0] == 1):
        return None
    if mask.plan is not None and mask.plan.kind in kinds:
        return mask.plan
    lengths = _doc_lengths(mask, q.shape[-2])
    if lengths is None:
        return None
    key = ("plan", kinds[0], str(q.device))
    if key not in mask._cache:
        mask._cache[key] = build_packed_plan(kinds[0], lengths, q.shape[-2], q.device, mask)
    return mask._cache[key]


def sdpa_ops(q, k, mask: AttentionMask) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]]:
    """(q shape, k shape, document lengths or None = the whole call's mask) of every
    `F.scaled_dot_product_attention` op the SDPA backend runs for this call (FLOP counters match ops to calls by
    these shapes; a grouped packed call runs one op per document group)."""
    h, dh = q.shape[1], q.shape[3]
    if mask.kv_index is not None:
        bm, p = q.shape[0] * q.shape[2], mask.kv_index.shape[-1]
        return [((bm, h, 1, dh), (bm, k.shape[1], p, k.shape[3]), None)]
    plan = _packed_plan(q, mask)
    if plan is None or plan.kind == "dense":
        return [(tuple(q.shape), tuple(k.shape), None)]
    out, lengths = [], plan.doc_lengths
    for docs in group_documents(lengths):
        n, w = len(docs), max(lengths[i] for i in docs)
        out.append(((n, h, w, dh), (n, k.shape[1], w, k.shape[3]), tuple(lengths[i] for i in docs)))
    return out


def attend_reference(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """The rule of this module's docstring with a materialised [B, 1, Lq, Lk] mask: what every backend must
    equal (tests), and the path for masks no plan covers."""
    lq, lk = q.shape[-2], k.shape[-2]
    allowed = mask.dense(lq, lk, q.device)
    valid = mask.query_valid(lq, lk, q.device)
    # A row with no allowed key would be softmax over all -inf (NaN on some kernels): let it see everything,
    # then zero its output, so padding rows are finite and carry no gradient.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~valid)
    return out * valid.to(out.dtype)


def _attend_sdpa(q, k, v, mask: AttentionMask) -> torch.Tensor:
    return _sdpa(q, k, v, mask)


def _sdpa(q, k, v, mask: AttentionMask) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    if mask.is_plain_causal and lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not mask.causal and mask.q_ids is None:
        return F.scaled_dot_product_attention(q, k, v)
    if mask.kv_index is not None:
        return attend_gathered(q, k, v, mask.kv_index, mask.kv_valid)
    plan = _packed_plan(q, mask)
    if plan is not None:
        return attend_dense(q, k, v, plan) if plan.kind == "dense" else attend_grouped(q, k, v, plan)
    return attend_reference(q, k, v, mask)


def _attend_varlen(q, k, v, mask: AttentionMask) -> torch.Tensor:
    plan = _packed_plan(q, mask, kinds=("varlen",))
    if plan is None:  # not packed self-attention: SDPA's own kernels (flash for the plain causal stacks)
        return _sdpa(q, k, v, mask)
    return attend_varlen(q, k, v, plan)


def _attend_flex(q, k, v, mask: AttentionMask) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    if not mask.causal and mask.q_ids is None:
        return _flex_fn(q, k, v)
    if mask.kv_index is not None:  # a patch sees <= P_max keys: a mask over B·M·N would only add work
        return attend_gathered(q, k, v, mask.kv_index, mask.kv_valid)
    plan = _packed_plan(q, mask, kinds=("flex",))
    if plan is not None:
        return _flex_fn(q, k, v, block_mask=plan.block_mask) * plan.valid.to(q.dtype)
    block = mask.block_mask(q.shape[0], lq, lk, q.device)
    out = _flex_fn(q, k, v, block_mask=block)  # fully masked rows come out as zeros
    if mask.q_ids is not None:
        ids = mask.q_ids.to(q.device)
        out = out * (ids >= 0)[:, None, :, None].to(out.dtype)
    return out


def _flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


# Eager flex_attention materialises the score matrix (correct everywhere, fast nowhere); `compile_flex()` swaps in
# the fused kernel. Training code calls it when it compiles the model; tests use the eager path.
_flex_fn = _flex_attention


def compile_flex(**compile_kwargs) -> None:
    global _flex_fn
    from torch.nn.attention.flex_attention import flex_attention

    _flex_fn = torch.compile(flex_attention, **compile_kwargs)


def flex_available() -> tuple[bool, str]:
    """(True, "") if flex_attention runs here (eagerly), else (False, reason)."""
    try:
        q = torch.randn(1, 1, 4, 8)
        m = AttentionMask(causal=True, q_ids=torch.zeros(1, 4, dtype=torch.long),
                          kv_ids=torch.zeros(1, 4, dtype=torch.long))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _attend_flex(q, q, q, m)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means "not available here", with the reason
        return False, f"{type(e).__name__}: {e}"


def resolve_backend(backend: str, device, dtype) -> str:
    """The backend that runs: `auto` is varlen on a CUDA device in fp16/bf16 where torch has it (flash attention
    over cu_seqlens: no padding, no mask), else sdpa (grouped documents; flash kernels on every device)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        return "varlen" if torch.device(device).type == "cuda" and half and varlen_available()[0] else "sdpa"
    if backend == "varlen" and not (torch.device(device).type == "cuda" and half):
        raise ValueError(f"attention backend varlen needs a CUDA device and fp16/bf16 (got {device}, {dtype}): "
                         "use model.attention_backend=auto or sdpa")
    return backend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "sdpa"):
    """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh] -> [B, H, Lq, Dh] under `mask`, with the chosen backend."""
    if backend == "auto":
        # Only packed self-attention has a choice to make (elsewhere auto is SDPA's own kernels), and a prepared
        # mask made it already: nothing device-dependent is asked inside a compiled block.
        if mask.backend is not None:
            backend = mask.backend
        else:
            backend = resolve_backend(backend, q.device, q.dtype) if mask.is_packed else "sdpa"
    if backend == "sdpa":
        return _attend_sdpa(q, k, v, mask)
    if backend == "flex":
        return _attend_flex(q, k, v, mask)
    if backend == "varlen":
        return _attend_varlen(q, k, v, mask)
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")


# --------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of one stack of attention layers, kept between incremental-decoding steps.

    Per layer, k/v [B, H, max_len, Dh] are allocated once (on the first write, taking the dtype and device of the
    projected keys, so a model under autocast or on a GPU needs no extra arguments) and written in place; nothing
    is concatenated per step. `lengths[b]` counts the positions row b holds.

    Two ways to advance:
    * lockstep (`rows=None`): every row takes the same L new positions (token models, DPAR's encoder and
      decoder, the class position of DPAR's global model). The queries see all cached keys plus the new ones
      causally (`q_offset` = positions already cached).
    * ragged (`rows` = a LongTensor of row indices, one new position each): only those rows advance, each at its
      own position (DPAR's global model, where every image completes its patches at its own pace). The query of
      row r sees its keys 0..lengths[r].

    `positions` counts the (row, position) pairs pushed through the stack: the work done, for cost checks.
    Steps always use the SDPA backend: one query per row leaves no blocks to skip and the mask changes each step.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int):
        if n_layers < 0 or batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs n_layers >= 0, batch >= 1, max_len >= 1 (got {n_layers}, {batch}, "
                             f"{max_len})")
        self.n_layers, self.batch, self.max_len = n_layers, batch, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = torch.zeros(batch, dtype=torch.long)  # CPU: read by the host to build masks
        self._uniform: int | None = 0  # the common length while all rows are equal, else None
        self.positions = 0
        self.tables: dict = {}  # memoised RoPE tables of the model that owns the cache

    @property
    def length(self) -> int:
        """The common length of all rows (lockstep caches)."""
        if self._uniform is None:
            raise RuntimeError("KVCache rows have different lengths; use `lengths`")
        return self._uniform

    def _alloc(self, layer: int, like: torch.Tensor) -> None:
        if self.k[layer] is None:
            shape = (self.batch, like.shape[1], self.max_len, like.shape[3])
            self.k[layer] = like.new_zeros(shape)
            self.v[layer] = like.new_zeros(shape)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Writes the new k/v [R, H, L, Dh] of `layer`; returns (keys, values, mask) for the new queries."""
        self._alloc(layer, k)
        if rows is None:
            start, new = self.length, k.shape[2]
            if k.shape[0] != self.batch:
                raise ValueError(f"lockstep update of {k.shape[0]} rows into a cache of {self.batch}")
            if start + new > self.max_len:
                raise ValueError(f"KVCache overflow: {start} + {new} positions > max_len {self.max_len}")
            self.k[layer][:, :, start:start + new] = k
            self.v[layer][:, :, start:start + new] = v
            keys, values = self.k[layer][:, :, :start + new], self.v[layer][:, :, :start + new]
            # One new query sees every key: no mask at all (SDPA's fastest path).
            mask = AttentionMask() if new == 1 else AttentionMask(causal=True, q_offset=start)
            return keys, values, mask
        if k.shape[2] != 1:
            raise ValueError("ragged KVCache updates take exactly one new position per row")
        rows_cpu = rows.cpu()
        starts = self.lengths[rows_cpu]
        if int(starts.max()) >= self.max_len:
            raise ValueError(f"KVCache overflow: a row already holds max_len={self.max_len} positions")
        rows_dev, starts_dev = rows_cpu.to(k.device), starts.to(k.device)
        self.k[layer][rows_dev, :, starts_dev] = k[:, :, 0]
        self.v[layer][rows_dev, :, starts_dev] = v[:, :, 0]
        span = int(starts.max()) + 1
        if len(rows_cpu) == self.batch and bool((rows_cpu == torch.arange(self.batch)).all()):
            keys, values = self.k[layer][:, :, :span], self.v[layer][:, :, :span]  # every row: views, no gather
        else:
            keys, values = self.k[layer][rows_dev, :, :span], self.v[layer][rows_dev, :, :span]
        if bool((starts == starts[0]).all()):
            return keys, values, AttentionMask()
        visible = (torch.arange(span)[None, :] <= starts[:, None]).long()  # 1 = key j is row r's
        mask = AttentionMask(q_ids=torch.ones(len(rows_cpu), 1, dtype=torch.long), kv_ids=visible)
        return keys, values, mask

    def advance(self, new: int, rows: torch.Tensor | None = None) -> None:
        """Marks `new` positions written (after every layer took its update)."""
        if rows is None:
            self.lengths += new
            self.positions += new * self.batch
            if self._uniform is not None:
                self._uniform += new
            return
        rows_cpu = rows.cpu()
        self.lengths[rows_cpu] += new
        self.positions += new * len(rows_cpu)
        self._uniform = int(self.lengths[0]) if bool((self.lengths == self.lengths[0]).all()) else None
