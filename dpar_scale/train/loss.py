"""Next-code cross-entropy, as a mean (benchmarks) or per-image sums (the trainer: sums combine exactly over
micro-batches and ranks).

The trainer's per-image loss is chunked over rows (`ChunkedCrossEntropy`): with a 16,384-way head the fp32 logits
of a batch (B·N·V·4 bytes: 4 GiB for 256 images of 256 codes) would otherwise be materialised — and the
log-softmax kept for the backward — all at once. Here only one chunk's fp32 copy exists at a time, forward and
backward; the backward recomputes each chunk's softmax from the logits (which the model's graph holds anyway) and
the per-row log-sum-exp saved by the forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 elements of one chunk (rows x vocabulary): 64 MiB, so 1,024 rows of a 16,384-way head
CHUNK_ELEMENTS = 1 << 24


def code_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean next-code cross-entropy over every code of the batch (`logits[:, t]` predicts `codes[:, t]`)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))


def code_loss_per_image(logits: torch.Tensor, codes: torch.Tensor,
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """[B] summed next-code cross-entropy of each image (sums, so ranks and micro-batches combine exactly),
    computed in fp32 a chunk of rows at a time."""
    v = logits.shape[-1]
    rows = max(1, chunk_elements // v)
    per_code = ChunkedCrossEntropy.apply(logits.reshape(-1, v), codes.reshape(-1), rows)
    return per_code.view(codes.shape).sum(1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy [R] of logits [R, V] (any float dtype, computed in fp32) against targets [R]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        for a in range(0, logits.shape[0], rows):
            x = logits[a:a + rows].float()
            lse[a:a + rows] = torch.logsumexp(x, dim=-1)
            loss[a:a + rows] = lse[a:a + rows] - x.gather(1, targets[a:a + rows, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for a in range(0, logits.shape[0], ctx.rows):
            p = torch.exp(logits[a:a + ctx.rows].float() - lse[a:a + ctx.rows, None])  # softmax
            p.scatter_add_(1, targets[a:a + ctx.rows, None], p.new_full((p.shape[0], 1), -1.0))
            out[a:a + ctx.rows] = p * grad[a:a + ctx.rows, None]
        return out, None, None
