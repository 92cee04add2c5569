"""Next-code entropies from the unconditional entropy model.

Entry k of the result is H_k = -Σ_v p(v | x_<k) ln p(v | x_<k) in nats: the entropy of the model's prediction of
code k from the start token and codes < k. The patcher reads these; training never runs this model.
"""
from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis, computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def code_entropies(model: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """[B, N] float32 entropies for int codes [B, N] (the model's `logits[:, k]` predicts `codes[:, k]`)."""
    was_training = model.training
    model.eval()
    try:
        return entropy_from_logits(model(codes))
    finally:
        model.train(was_training)
