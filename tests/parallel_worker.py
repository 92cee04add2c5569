"""Runs inside every process of a multi-process test (started by torchrun from tests/test_parallel.py).

    python -m torch.distributed.run --nproc_per_node K tests/parallel_worker.py JOBS.json

JOBS.json is a list of jobs run in order in the same process group:
  {"job": "train", "overrides": [...]}          Trainer(load_config(None, overrides)).fit()  (like train.py)
  {"job": "train", "overrides": [...], "deepspeed_config": "configs/deepspeed/zero3.json"}
                                                 the same with the DeepSpeed engine (train.py --deepspeed_config)
  {"job": "die_in_save", "overrides": [...], "step": 4, "rank": 1}
                                                 trains like "train", but rank `rank` kills itself (SIGKILL) in
                                                 the save of step `step`, after its model shards were written
                                                 and before its optimizer shards (a crash between shard writes)
  {"job": "config_error", "overrides": [...], "out": "error.txt"}
                                                 the trainer must refuse this config in every process with a
                                                 ConfigError; rank 0 writes its message
  {"job": "nonfinite", "overrides": [...], "step": 3, "rank": 1, "out": "error"}
                                                 rank `rank`'s forward returns NaN at step `step`: every rank
                                                 must stop with NonFiniteLossError; each writes its message to
                                                 error.<rank>
  {"job": "packed_sp", "out": "result.json"}     DPAR forward/backward over packed batches with different patch
                                                 counts under TP=world (sequence parallel), against a one-process
                                                 copy of the same model, in the authors' structure and the legacy
                                                 one (model.dpar); rank 0 writes the comparison.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def train(job: dict) -> None:
    from dpar_scale.config import load_config
    from dpar_scale.train.trainer import Trainer

    Trainer(load_config(None, job["overrides"]), deepspeed_config=job.get("deepspeed_config")).fit()


def config_error(job: dict) -> None:
    from dpar_scale.config import ConfigError, load_config
    from dpar_scale.train.trainer import Trainer

    try:
        Trainer(load_config(None, job["overrides"]))
    except ConfigError as e:
        if dist.get_rank() == 0:
            Path(job["out"]).write_text(str(e))
        return
    raise AssertionError(f"rank {dist.get_rank()}: no ConfigError for {job['overrides']}")


def die_in_save(job: dict) -> None:
    import os
    import signal

    from dpar_scale.train import native_engine as native

    real_save = native.dcp_save

    def dcp_save(state, folder):
        if (folder.name == "optimizer" and folder.parent.name == f"step-{job['step']:06d}.tmp"
                and dist.get_rank() == job["rank"]):
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, folder)

    native.dcp_save = dcp_save
    train(job)


def nonfinite(job: dict) -> None:
    from dpar_scale.config import load_config
    from dpar_scale.train.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(load_config(None, job["overrides"]))
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        bad = trainer.state.step == job["step"] - 1 and dist.get_rank() == job["rank"]
        return out * float("nan") if bad else out

    trainer.model.forward = poisoned
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        Path(f"{job['out']}.{dist.get_rank()}").write_text(str(e))
        return
    raise AssertionError(f"rank {dist.get_rank()}: no NonFiniteLossError")


def packed_sp(job: dict) -> None:
    """Different patch counts per image; one packed length (Σ M_i + 1) that is odd, so the layout pads it."""
    from dpar_scale.config import load_config
    from dpar_scale.parallel import LaunchEnv, ParallelDims

    world = dist.get_world_size()
    dims = ParallelDims.from_config(load_config(None, [f"parallel.tp={world}"]).parallel,
                                    LaunchEnv.detect().world_size)
    dims.build_mesh("cpu")
    results = []
    for structure in (["model.dpar.decoder_injection=every", "model.dpar.cross_attn_ffn=false"],
                      ["model.dpar.decoder_injection=first", "model.dpar.cross_attn_ffn=true"]):
        cfg = load_config(None, ["model.preset=dpar-tiny", "model.dim=32", "model.n_heads=4", "model.vocab_size=32",
                                 "model.num_classes=3", "model.grid=[4,4]", "model.dropout=0",
                                 "model.class_dropout=0", "model.n_global_layers=2", "model.n_decoder_layers=2",
                                 f"parallel.tp={world}", *structure])
        results += _packed_sp_compare(cfg, dims, world)
    if dist.get_rank() == 0:
        Path(job["out"]).write_text(json.dumps(results))


def _packed_sp_compare(cfg, dims, world: int) -> list[dict]:
    """The comparisons of one model config (see `packed_sp`), one record per batch."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from dpar_scale.patching.layout import PatchLayout
    from dpar_scale.models import resolve_model_config
    from dpar_scale.parallel import ParallelDims, build_parallel_model

    mcfg = resolve_model_config(cfg.model)
    device = torch.device("cpu")
    model = build_parallel_model(mcfg, dims, cfg.parallel, "fp32", device, seed=1)
    ref = build_parallel_model(mcfg, ParallelDims(1, 1, 1, 1), cfg.parallel, "fp32", device, seed=1,
                               apply_parallelism=False)
    with torch.no_grad():  # a non-zero head, so every parameter gets a gradient
        for m in (model, ref):
            w = m.output.weight
            local = w.to_local() if isinstance(w, DTensor) else w
            local.copy_(torch.full_like(local, 0.01))
    batches = [
        [[1, 2, 3, 4, 1, 1, 4], [4, 4, 4, 4], [2] * 8, [8, 8]],  # 8+5+9+3 = 25 -> padded to a multiple of tp
        [[1] * 16, [4] * 4],                                      # 17+5 = 22
        [[3, 1, 4, 4, 4]],                                        # 6
    ]
    g = torch.Generator().manual_seed(0)
    results = []
    for lengths in batches:
        layout = PatchLayout.from_lengths(lengths, (4, 4), pad_to_multiple=world)
        codes = torch.randint(0, 32, (len(lengths), 16), generator=g)
        labels = torch.randint(0, 3, (len(lengths),), generator=g)
        outs = []
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            logits = m(codes, labels, layout)
            F.cross_entropy(logits.reshape(-1, 32), codes.reshape(-1)).backward()
            outs.append(logits.detach())
        grads, grad_scale = {}, 0.0
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            gp = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = (gp - q.grad).abs().max().item()
            grad_scale = max(grad_scale, q.grad.abs().max().item())
        results.append({"structure": mcfg.dpar.decoder_injection, "positions": layout.num_global_positions,
                        "packed_length": layout.packed_length, "cu_seqlens": layout.cu_seqlens.tolist(),
                        "logits_diff": (outs[0] - outs[1]).abs().max().item(),
                        "logits_scale": outs[1].abs().max().item(), "grad_scale": grad_scale,
                        "max_grad_diff": max(grads.values()), "grads_checked": len(grads),
                        "params": len(list(ref.parameters())),
                        "sharded_params": sum(isinstance(p, DTensor) for p in model.parameters())})
    return results


def main() -> None:
    from dpar_scale.parallel import LaunchEnv, init_process_group

    init_process_group(LaunchEnv.detect(), torch.device("cpu"))
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        {"train": train, "packed_sp": packed_sp, "die_in_save": die_in_save,
         "config_error": config_error, "nonfinite": nonfinite}[job["job"]](job)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
