"""Next-code cross-entropy, as a mean (benchmarks) or per-image sums (the trainer: sums combine exactly over
micro-batches and ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def code_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean next-code cross-entropy over every code of the batch (`logits[:, t]` predicts `codes[:, t]`)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))


def code_loss_per_image(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[B] summed next-code cross-entropy of each image (sums, so ranks and micro-batches combine exactly)."""
    per_code = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="none")
    return per_code.view(codes.shape).sum(1)
