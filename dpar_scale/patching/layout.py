"""Patch layouts: where each image's patches are, and how they sit in the packed global sequence.

A batch of B images, each N = H·W codes in raster order, is cut into patches (contiguous runs of codes). Image i
has M_i patches. The DPAR global transformer runs over one *packed* sequence holding, for every image in turn,
M_i + C_i positions:

    [class_i, patch_i,0, ..., patch_i,M_i-1]          (class conditioning: C_i = 1)
    [text_i,0, ..., text_i,C_i-1, patch_i,0, ...]      (text conditioning: the caption's C_i tokens, eos last)

concatenated over images (no per-image padding), with `cu_seqlens` marking the image boundaries and the total
padded only up to a multiple of `pad_to_multiple` (the tensor-parallel degree, so sequence parallelism can shard
it evenly). Packed position cu_seqlens[i] + C_i - 1 + m holds the last condition position (m = 0) or patch m-1;
because the global transformer is causal, its *output* there summarises the condition and patches < m, which is
exactly what the codes of patch m may see. Hence `code_to_packed[i, t] = cu_seqlens[i] + C_i - 1 + patch_id[i, t]`.
Variable caption lengths cost no padding: each image's run is exactly C_i + M_i long.

Positions of the condition (`cond_lengths`): its last position (the class, or the caption's eos) sits at position
0 / row 0, column 0 (the identity rotation), and caption token j of C_i at 1-D position / row j - (C_i - 1) < 0
(columns 0): the caption reads like lines *above* the picture, ending right above row 0. So the image keeps
exactly the positions a class-conditional image has (patch m at 1-D position m + 1; dynamic RoPE rows/columns of
its codes), text-to-text offsets are plain 1-D distances, and a patch sees the k-th last caption token at the same
relative position whatever the caption's length.

All index tensors are built vectorised on the CPU (no per-code Python loop) and moved with `.to(device)`.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def static_lengths(grid: tuple[int, int], length: int, row_reset: bool = True) -> list[int]:
    """Fixed-length patches over one image; with row_reset a patch never crosses a row (the last of a row may
    be shorter)."""
    h, w = grid
    if length < 1:
        raise ValueError(f"patch length must be >= 1, got {length}")
    span, reps = (w, h) if row_reset else (h * w, 1)
    row = [length] * (span // length) + ([span % length] if span % length else [])
    return row * reps


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


def prefix_lengths(lengths: Sequence[int], n_codes: int) -> list[int]:
    """Patch lengths covering only the first `n_codes` codes (the patch holding the cut is shortened)."""
    out, used = [], 0
    for v in lengths:
        if used >= n_codes:
            break
        out.append(min(v, n_codes - used))
        used += out[-1]
    return out


@dataclass(eq=False)
class PatchLayout:
    grid: tuple[int, int]
    lengths: tuple[tuple[int, ...], ...]  # per image, the patch lengths (each sums to N)
    pad_to_multiple: int
    patch_id: torch.Tensor  # [B, N] long: patch index (within its image) of each code; N = H·W or a prefix
    num_patches: torch.Tensor  # [B] long: M_i
    patch_start: torch.Tensor  # [B, M] long: first code of each patch (0 for padding patches)
    patch_end: torch.Tensor  # [B, M] long: last code (inclusive) of each patch (0 for padding patches)
    patch_valid: torch.Tensor  # [B, M] bool: m < M_i
    cu_seqlens: torch.Tensor  # [B + 1] int32: image boundaries in the packed sequence (unpadded total last)
    packed_image_id: torch.Tensor  # [T] long: image of each packed position, -1 for padding
    packed_pos: torch.Tensor  # [T] long: position in its image's run, last condition position = 0 (patch m: m+1)
    packed_row: torch.Tensor  # [T] long: row of the patch's first code (class / eos / padding 0, caption < 0)
    packed_col_start: torch.Tensor  # [T] long: column of the patch's first code
    packed_col_end: torch.Tensor  # [T] long: column of the patch's last code
    packed_source: torch.Tensor  # [T] long: row of cat([cond [ΣC], patches [B*M], zero]) for `pack`
    code_to_packed: torch.Tensor  # [B, N] long: packed position whose output feeds code t
    patch_to_packed: torch.Tensor  # [B, M] long: packed position of patch m, -1 for padding patches
    cond_lengths: tuple[int, ...] = ()  # per image, condition positions C_i (1 = class; a caption's tokens)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.patch_id.shape[0]

    @property
    def n_codes(self) -> int:
        return self.patch_id.shape[1]

    @property
    def max_patches(self) -> int:
        return self.patch_valid.shape[1]

    @property
    def packed_length(self) -> int:
        """T: the packed sequence length including the padding to `pad_to_multiple`."""
        return self.packed_image_id.shape[0]

    @property
    def num_global_positions(self) -> int:
        """Σ_i (M_i + C_i), the positions that are not padding."""
        return sum(len(x) + c for x, c in zip(self.lengths, self.cond_lengths))

    @property
    def num_cond_positions(self) -> int:
        """Σ_i C_i: the class positions (B) or the caption tokens of the batch."""
        return sum(self.cond_lengths)

    @property
    def doc_lengths(self) -> tuple[int, ...]:
        """Packed positions of each image's document (host ints: attention plans need no device sync)."""
        return tuple(len(x) + c for x, c in zip(self.lengths, self.cond_lengths))

    @property
    def max_seqlen(self) -> int:
        return max(len(x) + c for x, c in zip(self.lengths, self.cond_lengths))

    # ---------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_lengths(cls, lengths: Sequence[Sequence[int]], grid: tuple[int, int] | Sequence[int],
                     pad_to_multiple: int = 1, n_codes: int | None = None,
                     cond_lengths: Sequence[int] | None = None) -> "PatchLayout":
        """Layout from per-image patch lengths (the output of `dpar_scale.patching.rule.patch_lengths`).

        Each image's lengths sum to `n_codes` (default H·W); a smaller `n_codes` describes the first codes of the
        images in raster order (a generation prefix, whose last patch may still be growing). `cond_lengths`: per
        image, the condition positions before its patches (default 1, the class; a text model's caption lengths).
        """
        h, w = int(grid[0]), int(grid[1])
        n = h * w if n_codes is None else int(n_codes)
        if not 1 <= n <= h * w:
            raise ValueError(f"n_codes must be in [1, {h * w}] for grid {h}x{w}, got {n}")
        # vectorised over the batch: one flat array of every patch length, checked per image with segment sums
        counts_np = np.fromiter(map(len, lengths), dtype=np.int64)
        flat_np = np.fromiter(itertools.chain.from_iterable(lengths), dtype=np.int64, count=int(counts_np.sum()))
        if len(counts_np) == 0:
            raise ValueError("PatchLayout needs at least one image")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        image_of = np.repeat(np.arange(len(counts_np)), counts_np)
        sums = np.bincount(image_of, weights=flat_np, minlength=len(counts_np))
        non_positive = np.bincount(image_of[flat_np < 1], minlength=len(counts_np))
        bad = np.flatnonzero((sums != n) | (non_positive > 0) | (counts_np == 0))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"image {i}: patch lengths must be positive and sum to {n} codes (grid "
                             f"{h}x{w}); got {int(counts_np[i])} lengths summing to {int(sums[i])}")
        flat_list, cut = flat_np.tolist(), np.cumsum(counts_np).tolist()
        lengths = tuple(tuple(flat_list[a:z]) for a, z in zip([0] + cut[:-1], cut))
        b = len(lengths)
        cond = tuple(int(c) for c in cond_lengths) if cond_lengths is not None else (1,) * b
        if len(cond) != b or min(cond) < 1:
            raise ValueError(f"cond_lengths must give every one of the {b} images >= 1 condition positions, got "
                             f"{list(cond)}")
        # numpy segment ops (repeat, cumsum, fancy indexing): on these small integer arrays they cost a fraction of
        # the same torch ops' dispatch; the tensors are wrapped at the end (torch.from_numpy, no copy)
        cond_t = np.asarray(cond, dtype=np.int64)
        counts, flat_len = counts_np, flat_np
        m_max = int(counts.max())
        patch_image = np.repeat(np.arange(b), counts)  # image of each flat patch
        first_patch = np.cumsum(counts) - counts  # flat index of each image's patch 0
        local = np.arange(len(flat_len)) - first_patch[patch_image]  # m of each flat patch
        start = np.cumsum(flat_len) - flat_len - patch_image * n  # first code, within its image
        end = start + flat_len - 1

        patch_id = np.repeat(local, flat_len).reshape(b, n)
        valid = np.arange(m_max)[None, :] < counts[:, None]
        grid_index = patch_image * m_max + local  # flat [B, M] slot of each patch (row-major, like the flat order)
        patch_start = np.zeros(b * m_max, dtype=np.int64)
        patch_end = np.zeros(b * m_max, dtype=np.int64)
        patch_start[grid_index], patch_end[grid_index] = start, end

        run = counts + cond_t  # condition + patches
        cu = np.zeros(b + 1, dtype=np.int64)
        cu[1:] = np.cumsum(run)
        total = int(cu[-1])
        t_len = -(-total // pad_to_multiple) * pad_to_multiple
        image_id = np.full(t_len, -1, dtype=np.int64)
        image_id[:total] = np.repeat(np.arange(b), run)
        # position inside the run, shifted so that the last condition position is 0 (module docstring)
        pos = np.zeros(t_len, dtype=np.int64)
        pos[:total] = np.arange(total) - np.repeat(cu[:-1] + cond_t - 1, run)

        patch_packed = cu[patch_image] + cond_t[patch_image] + local
        patch_to_packed = np.full(b * m_max, -1, dtype=np.int64)
        patch_to_packed[grid_index] = patch_packed
        row, col_start, col_end = (np.zeros(t_len, dtype=np.int64) for _ in range(3))
        n_cond = int(cond_t.sum())
        cond_image = np.repeat(np.arange(b), cond_t)
        cond_first = np.cumsum(cond_t) - cond_t  # flat index of each image's first condition row
        cond_packed = cu[cond_image] + np.arange(n_cond) - cond_first[cond_image]
        row[cond_packed] = pos[cond_packed]  # <= 0: the caption's lines above the picture
        (row[patch_packed], col_start[patch_packed]), col_end[patch_packed] = np.divmod(start, w), end % w
        # Source rows for `pack`: condition vectors first (flat, image by image), then the [B, M] patch grid
        # flattened, then one zero row.
        source = np.full(t_len, n_cond + b * m_max, dtype=np.int64)
        source[cond_packed] = np.arange(n_cond)
        source[patch_packed] = n_cond + grid_index
        code_to_packed = (cu[:-1] + cond_t - 1)[:, None] + patch_id

        t = torch.from_numpy
        return cls(grid=(h, w), lengths=lengths, pad_to_multiple=pad_to_multiple, patch_id=t(patch_id),
                   num_patches=t(counts), patch_start=t(patch_start).view(b, m_max),
                   patch_end=t(patch_end).view(b, m_max), patch_valid=t(valid),
                   cu_seqlens=t(cu.astype(np.int32)), packed_image_id=t(image_id), packed_pos=t(pos),
                   packed_row=t(row), packed_col_start=t(col_start), packed_col_end=t(col_end),
                   packed_source=t(source), code_to_packed=t(code_to_packed),
                   patch_to_packed=t(patch_to_packed).view(b, m_max), cond_lengths=cond)

    @classmethod
    def from_patch_ids(cls, patch_id: torch.Tensor, grid, pad_to_multiple: int = 1,
                       cond_lengths: Sequence[int] | None = None) -> "PatchLayout":
        """Layout from a [B, N] tensor of per-code patch indices (0, 0, 1, 2, 2, ...: starting at 0, +0 or +1)."""
        patch_id = patch_id.detach().cpu().long()
        if patch_id.dim() != 2:
            raise ValueError(f"patch_id must be [B, N], got shape {tuple(patch_id.shape)}")
        steps = patch_id.diff(dim=1)
        if (patch_id[:, 0] != 0).any() or ((steps != 0) & (steps != 1)).any():
            raise ValueError("patch_id rows must start at 0 and grow by 0 or 1 from code to code")
        # every row's patch sizes in one bincount: row r's patches are numbered after the rows before it
        counts = patch_id[:, -1] + 1
        first = torch.cumsum(counts, 0) - counts
        flat = torch.bincount((patch_id + first[:, None]).reshape(-1), minlength=int(counts.sum())).tolist()
        cut = torch.cumsum(counts, 0).tolist()
        lengths = [flat[a:z] for a, z in zip([0] + cut[:-1], cut)]
        return cls.from_lengths(lengths, grid, pad_to_multiple, n_codes=patch_id.shape[1], cond_lengths=cond_lengths)

    @classmethod
    def from_starts(cls, starts: torch.Tensor, grid, pad_to_multiple: int = 1,
                    cond_lengths: Sequence[int] | None = None) -> "PatchLayout":
        """Layout from a [B, N] bool tensor, True where a code starts a patch (code 0 must start one)."""
        return cls.from_patch_ids(torch.cumsum(starts.long(), dim=1) - 1, grid, pad_to_multiple, cond_lengths)

    @classmethod
    def static(cls, batch: int, grid, length: int, row_reset: bool = True, pad_to_multiple: int = 1,
               cond_lengths: Sequence[int] | None = None):
        """Every image cut into fixed-length patches (the static-patch ablation; length 1 = the token model)."""
        return cls.from_lengths([static_lengths(tuple(grid), length, row_reset)] * batch, grid, pad_to_multiple,
                                cond_lengths=cond_lengths)

    def with_cond_lengths(self, cond_lengths: Sequence[int]) -> "PatchLayout":
        """The same patches after other condition runs (a text model's caption lengths)."""
        return PatchLayout.from_lengths(self.lengths, self.grid, self.pad_to_multiple, n_codes=self.n_codes,
                                        cond_lengths=cond_lengths)

    def prefix(self, n_codes: int) -> "PatchLayout":
        """The layout of the first `n_codes` codes of every image (the patch holding the cut is shortened)."""
        return PatchLayout.from_lengths([prefix_lengths(x, n_codes) for x in self.lengths], self.grid,
                                        self.pad_to_multiple, n_codes=n_codes, cond_lengths=self.cond_lengths)

    # ------------------------------------------------------------------------------------------------- use
    def to(self, device, non_blocking: bool = False) -> "PatchLayout":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def pack(self, class_emb: torch.Tensor, patch_emb: torch.Tensor) -> torch.Tensor:
        """class_emb [Σ C_i, D] (the class vectors [B, D], or a text batch's flat caption embeddings) and
        patch_emb [B, M, D] -> packed sequence [T, D] (zeros at padding).

        One gather from a concatenated source, so the backward is one scatter-add and nothing is written in place.
        """
        b, m, d = patch_emb.shape
        zero = patch_emb.new_zeros(1, d)
        source = torch.cat([class_emb.to(patch_emb.dtype), patch_emb.reshape(b * m, d), zero], dim=0)
        return source[self.packed_source]

    def gather_codes(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed outputs [T, D] -> per-code [B, N, D]: code t of patch m gets packed position
        cu_seqlens + C - 1 + m."""
        return packed[self.code_to_packed]

    def __repr__(self) -> str:
        return (f"PatchLayout(B={self.batch_size}, grid={self.grid}, patches={self.num_patches.tolist()}, "
                f"packed={self.num_global_positions}->{self.packed_length})")
