"""`parallelize(model, dims, cfg)`: the one place where a plain model becomes a distributed one.

Fixed order (each step assumes the previous ones):
  1. tensor + sequence parallelism  (DTensor plans, dpar_scale.parallel.tensor_parallel)
  2. activation checkpointing       (none | full: whole blocks | selective: keep matmul/attention outputs)
  3. torch.compile                  (per block, so FSDP's per-block hooks stay outside the graphs)
  4. FSDP2 `fully_shard` per block, then the root; HSDP when dp_replicate > 1; MixedPrecisionPolicy with bf16
     parameters (train.precision=bf16) and fp32 gradient reduction.

`build_parallel_model` wraps it: build on the meta device (no memory), record the init, parallelize, `to_empty`
on the real device (each rank allocates only its shards) and initialise shard by shard.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dpar_scale.parallel.dims import ParallelDims
from dpar_scale.parallel.init import init_weights_sharded, record_init


def transformer_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, child name) of every transformer block: the units of checkpointing, compilation and FSDP. DPAR's
    decoder blocks (`DecoderBlock`, a TransformerBlock) hold their own global-state injection, so it is
    checkpointed, compiled and sharded with its layer."""
    from dpar_scale.models.layers import CrossAttentionBlock, TransformerBlock

    found, seen = [], set()
    for parent in model.modules():
        if _unwrap(parent) is not parent:
            continue  # a checkpoint / compile wrapper: its block is reported under the wrapper's parent
        for name, child in parent.named_children():
            inner = _unwrap(child)
            if isinstance(inner, (TransformerBlock, CrossAttentionBlock)) and id(inner) not in seen:
                seen.add(id(inner))
                found.append((parent, name))
    return found


def _unwrap(module: nn.Module) -> nn.Module:
    for attr in ("_checkpoint_wrapped_module", "_orig_mod"):
        while hasattr(module, attr):
            module = getattr(module, attr)
    return module


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


# ---------------------------------------------------------------------------------------- checkpointing
def _selective_policy():
    """Save the outputs of matmuls, attention and collectives; recompute the cheap pointwise ops and norms."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is not None:
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
            if hasattr(functional, name):
                save.add(getattr(functional, name).default)

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "full":
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True)
    elif mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = _selective_policy()
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True,
                       context_fn=partial(create_selective_checkpoint_contexts, policy))
    else:
        raise ValueError(f"parallel.activation_checkpoint={mode!r} is not one of none, full, selective")
    for parent, name in transformer_blocks(model):
        _replace(parent, name, wrap(getattr(parent, name)))


def apply_compile(model: nn.Module, **compile_kwargs) -> None:
    """torch.compile per block (FSDP's hooks stay on the eager wrapper). The wrapper adds `_orig_mod.` to
    parameter names; checkpoints do not see it (DCP's state-dict helpers and `clean_name` drop it).

    Everything that depends on the layout (document ids, attention plans, gather indices, RoPE tables) is built by
    the model outside the blocks, once per batch; `blocks_compiled` tells it to keep those shapes bucketed (the
    packed length itself is padded to `parallel.compile_bucket` by the trainer, `packed_length_multiple`)."""
    for parent, name in transformer_blocks(model):
        _replace(parent, name, torch.compile(getattr(parent, name), **compile_kwargs))
    if hasattr(model, "blocks_compiled"):
        model.blocks_compiled = True


def packed_length_multiple(parallel_cfg) -> int:
    """What the packed global length is padded to: the TP degree (sequence parallelism shards it evenly), and with
    compile also the bucket, so compiled blocks see a handful of lengths rather than one per batch."""
    import math

    tp = parallel_cfg.tp
    return math.lcm(tp, parallel_cfg.compile_bucket) if parallel_cfg.compile else tp


# ------------------------------------------------------------------------------------------------ FSDP2
def apply_fsdp(model: nn.Module, fsdp_mesh, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Blocks whose output is gathered by a TP hook, and the model's final `.float()` logits, are views; FSDP2 warns
    # that an in-place op on them would be unsafe. Nothing modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(model)
    for i, (parent, name) in enumerate(blocks):
        # The last block's parameters are needed again right away by the backward: keep them gathered.
        fully_shard(getattr(parent, name), mesh=fsdp_mesh, mp_policy=mp,
                    reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp)


# ----------------------------------------------------------------------------------------------- public
def parallelize(model: nn.Module, dims: ParallelDims, parallel_cfg, precision: str = "fp32") -> nn.Module:
    """TP/SP -> activation checkpointing -> compile -> FSDP2/HSDP, in place; returns the model."""
    from dpar_scale.parallel.tensor_parallel import apply_tensor_parallel

    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.submesh("tp"))
    apply_activation_checkpointing(model, parallel_cfg.activation_checkpoint)
    if parallel_cfg.compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims.submesh("fsdp"), torch.bfloat16 if precision == "bf16" else None)
    return model


def build_parallel_model(model_cfg, dims: ParallelDims, parallel_cfg, precision: str, device: torch.device,
                         seed: int, apply_parallelism: bool = True) -> nn.Module:
    """Meta build -> parallelize -> materialise on `device` (this rank's shards only) -> seeded init."""
    from dpar_scale.models import build_model
    from dpar_scale.parallel.tensor_parallel import check_tp_compatible

    check_tp_compatible(model_cfg, dims.tp)
    with torch.device("meta"):
        model = build_model(model_cfg)
    calls = record_init(model)
    if apply_parallelism:
        parallelize(model, dims, parallel_cfg, precision)
    model.to_empty(device=device)
    init_weights_sharded(model, calls, seed)
    return model
