"""Rotary position tables: 1-D, 2-D (LlamaGen) and the DPAR "dynamic" table for patches.

A table has shape [..., L, head_dim // 2, 2] holding (cos, sin) of one angle per rotary pair; pairs are adjacent
channels (2i, 2i+1) of a head, as in LlamaGen / LLaMA's `view_as_complex` layout. Tables are real tensors (not
complex) so they pass through DTensor, torch.compile and bf16 autocast without special cases, and they are
computed on the fly from positions (cheap: L × head_dim/2 angles) rather than stored as buffers, so a model built
on the meta device needs no re-initialisation of positional state after it is materialised.

Zero angles give the identity rotation; that is what the class / start token gets everywhere.
"""
from __future__ import annotations

import torch


def _check_head_dim(head_dim: int, multiple: int, what: str) -> None:
    if head_dim % multiple:
        raise ValueError(f"{what} needs head_dim divisible by {multiple}, got {head_dim}")


def _table(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def axis_freqs(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Per-axis frequencies of LlamaGen's 2-D RoPE: head_dim/4 of them, base^(-2i / (head_dim/2))."""
    _check_head_dim(head_dim, 4, "2-D RoPE")
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half))


def rope_1d(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Plain LLaMA RoPE over integer positions [..., L] -> table [..., L, head_dim/2, 2]."""
    _check_head_dim(head_dim, 2, "RoPE")
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    return _table(positions.float()[..., None] * freqs)


def rope_grid(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """2-D RoPE for arbitrary (row, col) positions: first half of the pairs encode the row, second half the col."""
    freqs = axis_freqs(head_dim, base, device=rows.device)
    angles = torch.cat([rows.float()[..., None] * freqs, cols.float()[..., None] * freqs], dim=-1)
    return _table(angles)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Table [grid_h * grid_w, head_dim/2, 2] for the codes of a grid in raster order (no class position)."""
    idx = torch.arange(grid_h * grid_w, device=device)
    return rope_grid(idx // grid_w, idx % grid_w, head_dim, base)


def rope_dynamic(row: torch.Tensor, col_start: torch.Tensor, col_end: torch.Tensor, head_dim: int,
                 base: float = 10000.0) -> torch.Tensor:
    """DPAR's patch table: half the pairs encode the row of the patch's first code (as 2-D RoPE does); the column
    half is split in four consecutive groups encoding col_start, col_end, col_end, col_start.

    Every group keeps the frequencies 2-D RoPE gives those pairs, so a one-code patch (col_start == col_end) gets
    exactly the 2-D RoPE of its code, and start and end are each seen at both high and low frequencies.
    Positions all zero (the class token, padding) give the identity rotation.
    """
    freqs = axis_freqs(head_dim, base, device=row.device)
    groups = torch.tensor_split(torch.arange(freqs.numel(), device=row.device), 4)
    col_pos = torch.cat([pos.float()[..., None].expand(*pos.shape, len(g))
                         for pos, g in zip((col_start, col_end, col_end, col_start), groups)], dim=-1)
    angles = torch.cat([row.float()[..., None] * freqs, col_pos * freqs], dim=-1)
    return _table(angles)


def rope_identity(length: int, head_dim: int, device=None) -> torch.Tensor:
    """Identity table [length, head_dim/2, 2] (cos 1, sin 0)."""
    return _table(torch.zeros(length, head_dim // 2, device=device))


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, L, H, head_dim] by table [L, head_dim/2, 2] or [B, L, head_dim/2, 2] (computed in fp32)."""
    if table.dim() == 3:
        table = table[None]
    table = table[:, :, None]  # broadcast over heads
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)
