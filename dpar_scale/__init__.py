"""dpar-scale: training and evaluating DPAR image generators (arXiv 2512.21867) at cluster scale.

One folder per concept. A room may import the rooms below it in this list, never those above:

    launch/      Slurm (submitit) and local jobs, preemption -> checkpoint -> requeue
    train/       the one trainer, its engines (FSDP2/TP native, DeepSpeed ZeRO), metrics logging
    checkpoint/  save / load / resume checks / export / LlamaGen import
    sampling/    KV-cached generation, per-sample random streams, chunked world-size-independent evaluation sets
    evaluation/  FID / IS / precision / recall (ADM's definitions), detectors, cached reference statistics
    flops/       analytic FLOP count and op-level counters
    parallel/    process groups, ParallelDims, TP/SP plans, FSDP2, clipping across meshes
    models/      the GPT baseline, the entropy model, DPAR (plain nn.Modules that know nothing of ranks)
    data/        embedded dataset, images, code shards, batches      tokenizer/  k-means and LlamaGen VQ-16
    patching/    the entropy patch rule, packed patch layouts, next-code entropies
    config/      typed configuration (dataclasses, YAML, dotted overrides)
    errors.py    DparError, the base of every error a user can fix      integrity.py  sha256 checks, verified cache

Rooms on the same line do not import each other; errors.py and integrity.py import nothing of ours, so every room
may use them. cli.py (one-line user errors, argument types) is for the entry points: train.py, tools/, launchers/.

`dpar_scale.load_pretrained(path)` is the one-line entry point to a trained (or imported) model.
"""


def load_pretrained(path, device="cpu", use_ema: bool = True):
    """The model of a checkpoint folder or an export (tools/export.py, tools/import_llamagen.py), in eval mode on
    `device`. A GPT is called `model(codes [B, N], labels [B])` -> logits [B, N, vocab], where logits[:, k]
    predicts codes[:, k] from the class and codes < k; DPAR takes a PatchLayout as well (see
    dpar_scale.models.dpar). Imports torch and the model code on first call only."""
    from dpar_scale.checkpoint.export import load_model_for_inference

    return load_model_for_inference(path, use_ema=use_ema, device=device)[0]
