"""Tensor + sequence parallelism (DTensor `parallelize_module` plans) for the GPT/entropy model and DPAR.

Inside every self-attention transformer block (Megatron-style TP with sequence parallelism):

    residual stream   [B, L/tp, D]  sharded on the sequence dim (local tensors)
    attention_norm    SequenceParallel: runs on the shard            -> DTensor Shard(1)
    attention         input all-gathered (Shard(1) -> Replicate): attention sees the *whole* sequence
      wq, wk, wv      ColwiseParallel: each rank holds n_heads/tp heads
      wo              RowwiseParallel -> reduce-scatter back to Shard(1)
    ffn_norm          SequenceParallel
    feed_forward      input all-gathered; w1, w3 ColwiseParallel (hidden/tp); w2 RowwiseParallel -> Shard(1)

Because attention runs on the all-gathered sequence, masks and RoPE tables are built for the full sequence exactly
as in one process: the block-causal mask of DPAR's *packed* global sequence (image ids, cu_seqlens) is unchanged
by the shard. The packed length T is padded to a multiple of tp by `PatchLayout(pad_to_multiple=tp)`; code
sequences (N = H·W) must be a multiple of tp.

Stacks: the first block of each stack takes a replicated input and keeps only its sequence shard (no
communication; the backward all-gathers). Stacks whose output is consumed whole (DPAR's local encoder feeds the
patch pooling and the decoder; the global transformer feeds `gather_codes`) all-gather the last block's output.
The last stack (GPT layers, DPAR decoder) stays sharded into the final norm (SequenceParallel) and the head
(ColwiseParallel over the vocabulary, all-gathering the input sequence and the output logits).

DPAR's decoder (model.dpar.decoder_injection=every): every `DecoderBlock` first adds W_l·RMSNorm_l(g) of its
patch's global state g to each code. That is a per-position map (code t's output reads only row t of g), so it
runs on the rank's sequence shard with replicated weights, exactly like the norms (SequenceParallel): N/tp·D²
multiply-adds per rank, as a column- or row-wise split would cost, but no activation collective at all; the
weight gradients are partial sums reduced once per step like the norms' (D² + D per layer), whereas ColwiseParallel
would all-gather the [B, N, D] input and need an all-to-all back to the sequence shard, and RowwiseParallel would
reduce-scatter a [B, N, D] partial sum, in every layer. The shard of g is cut once, from the replicated global
output gathered to codes (`global_to_codes`: Replicate -> Shard(1), a local slice; the backward all-gathers its
gradient once). With decoder_injection=first the single injection runs before the stack on the replicated input.

Embeddings: `tok_embeddings` RowwiseParallel (vocabulary rows sharded, output all-reduced, replicated), and so is a
text model's `text_embeddings` (the caption tokens, replicated like the class vectors they replace; a text GPT
left-pads its captions so that its sequence stays a multiple of tp, `GPT.sequence_multiple`). The class
embedding, the entropy model's start vector, DPAR's decoder start vector and its single global-to-local
projection (decoder_injection=first) stay replicated (small). DPAR's patch cross-attention block runs TP without
SP: its queries are the patches of each image ([B, M, D], M ragged), so it uses head-sharded attention (and,
with model.dpar.cross_attn_ffn, a column/row-sharded FFN) on replicated activations, with its norms replicated.

Dropout: the ranks of a TP group share one RNG state (same seed, same draws in the same order). Dropout on
replicated activations therefore draws the same mask on every rank, the mask one process draws. The residual
dropouts of sequence-parallel blocks act on sequence shards (local tensors, so DTensor's RNG tracker never sees
them; it is CUDA-only, and it would give shards offset philox streams, not the unsharded tensor's values): each is
replaced by `SequenceShardedDropout`, which draws the whole sequence's mask and keeps its own slice. The draws, and
the RNG state after them, are then what one process draws for the same shapes. (DPAR's packed global sequence is
padded to a multiple of tp, so when padding was added its masks are drawn for the padded length: still distinct
per shard and identical across the group, but not the one-process masks.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel, parallelize_module,
)

from dpar_scale.config import ConfigError


def check_tp_compatible(model_cfg, tp: int) -> None:
    """Clear errors for shapes a TP degree cannot split (call before building anything)."""
    if tp <= 1:
        return
    from dpar_scale.models.layers import ffn_hidden_dim

    problems = []
    if model_cfg.n_heads % tp:
        problems.append(f"model.n_heads={model_cfg.n_heads} is not divisible by parallel.tp={tp} (each rank holds "
                        f"n_heads/tp heads)")
    if model_cfg.dim % tp:
        problems.append(f"model.dim={model_cfg.dim} is not divisible by parallel.tp={tp}")
    hidden = ffn_hidden_dim(model_cfg.dim, model_cfg.ffn_multiple_of, model_cfg.ffn_dim_multiplier or None)
    if hidden % tp:
        problems.append(f"the FFN hidden width {hidden} is not divisible by parallel.tp={tp} (adjust "
                        f"model.ffn_multiple_of)")
    if model_cfg.conditioning == "text" and model_cfg.text.vocab_size % tp:
        problems.append(f"model.text.vocab_size={model_cfg.text.vocab_size} is not divisible by parallel.tp={tp} "
                        f"(the text embedding is split over its rows; extra rows are never produced by the "
                        f"tokenizer, so round it up)")
    if model_cfg.vocab_size % tp:
        problems.append(f"model.vocab_size={model_cfg.vocab_size} is not divisible by parallel.tp={tp} (the "
                        f"embedding and the head are split over the vocabulary)")
    n_codes = model_cfg.grid[0] * model_cfg.grid[1]
    if n_codes % tp:
        problems.append(f"the {model_cfg.grid[0]}x{model_cfg.grid[1]} grid has {n_codes} codes, not a multiple of "
                        f"parallel.tp={tp} (sequence parallelism shards the code sequence)")
    if problems:
        raise ConfigError("; ".join(problems) + ". Pick a parallel.tp that divides them (e.g. parallel.tp=1).")


def block_plan(sequence_parallel: bool = True) -> dict:
    """Plan for one `TransformerBlock` (self-attention + SwiGLU), relative to the block."""
    if not sequence_parallel:
        return {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel()}
    return {
        "attention_norm": SequenceParallel(),
        # Attention(x, mask, rope): gather the sequence of x, leave the mask object and the RoPE table alone.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def decoder_block_plan() -> dict:
    """`DecoderBlock`: a block's plan, plus its global-state injection on the sequence shard (module docstring)."""
    return {**block_plan(), "global_to_local_norm": SequenceParallel(),
            "global_to_local": SequenceParallel(use_local_output=True)}


def cross_attention_plan(ffn: bool) -> dict:
    """`CrossAttentionBlock` (DPAR's patch queries attend to their codes): TP on replicated activations."""
    return {k: v for k, v in block_plan(sequence_parallel=False).items() if ffn or not k.startswith("feed_forward")}


# A block's forward is (x, mask, rope): only x changes layout at the stack boundaries.
def _shard_stack_input() -> PrepareModuleInput:
    return PrepareModuleInput(input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
                              use_local_output=True)


def _gather_stack_output() -> PrepareModuleOutput:
    return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True)


class SequenceShardedDropout(nn.Module):
    """Dropout of an activation sharded on dim 1 (the sequence) over a TP group of `size` ranks, this rank holding
    shard `rank` ([B, L/size, ...] of [B, L, ...]). Every rank draws the mask of the whole [B, L, ...] tensor,
    exactly as `nn.Dropout` on the unsharded tensor would (same op, shape and dtype; the group shares its RNG
    state), and multiplies its shard by its own slice. The extra cost is drawing size× the mask; only the slice is
    kept for the backward."""

    def __init__(self, p: float, rank: int, size: int):
        super().__init__()
        self.p, self.rank, self.size = p, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        full = list(x.shape)
        full[1] *= self.size
        with torch.no_grad():
            keep = F.dropout(x.new_ones(full), self.p, training=True)  # 0 or 1 / (1 - p), as nn.Dropout scales
            keep = keep.narrow(1, self.rank * x.shape[1], x.shape[1]).clone()
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, shard {self.rank} of {self.size} on dim 1"


def _shard_block_dropout(block: nn.Module, mesh) -> None:
    for name in ("resid_dropout", "ffn_dropout"):
        dropout = getattr(block, name)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            setattr(block, name, SequenceShardedDropout(dropout.p, mesh.get_local_rank(), mesh.size()))


def _parallelize_stack(stack: nn.ModuleList, mesh, gather_output: bool, plan: dict | None = None) -> None:
    for block in stack:
        parallelize_module(block, mesh, plan or block_plan())
        _shard_block_dropout(block, mesh)
    if len(stack):
        parallelize_module(stack[0], mesh, _shard_stack_input())
        if gather_output:
            parallelize_module(stack[-1], mesh, _gather_stack_output())


def _head_plan() -> dict:
    return {"norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Applies TP+SP in place to a GPT / entropy GPT / DPAR (on the meta device or materialised)."""
    from dpar_scale.models import DPAR, GPT

    embed = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if getattr(model, "text_vocab_size", 0):
        embed["text_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if isinstance(model, GPT):
        model.sequence_multiple = tp_mesh.size()
        parallelize_module(model, tp_mesh, embed)
        _parallelize_stack(model.layers, tp_mesh, gather_output=False)
        parallelize_module(model, tp_mesh, _head_plan())
    elif isinstance(model, DPAR):
        parallelize_module(model, tp_mesh, embed)
        _parallelize_stack(model.encoder_layers, tp_mesh, gather_output=True)
        parallelize_module(model.patch_cross_attn, tp_mesh, cross_attention_plan(model.cross_attn_ffn))
        _parallelize_stack(model.global_layers, tp_mesh, gather_output=True)
        if model.decoder_injection == "every":
            # each decoder block reads the global state of its own sequence shard (see the module docstring)
            parallelize_module(model.global_to_codes, tp_mesh, PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True))
            _parallelize_stack(model.decoder_layers, tp_mesh, gather_output=False, plan=decoder_block_plan())
        else:
            _parallelize_stack(model.decoder_layers, tp_mesh, gather_output=False)
        parallelize_module(model, tp_mesh, _head_plan())
    else:
        raise TypeError(f"no tensor-parallel plan for {type(model).__name__}; known: GPT, DPAR")
    return model
