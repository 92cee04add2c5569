#!/usr/bin/env python
"""Per-step time and communication volume of the parallel layouts (CPU, gloo), measured beside the theory.

    python tools/bench_parallel.py [--kind dpar] [--layouts 1,dp2,tp2,dp2tp2] [--steps 5] [--out bench.json]

For each layout the real trainer runs on a random code dataset (launched with torchrun, one process per rank);
after warm-up steps, every collective issued during a training step is intercepted (a TorchDispatchMode sees the
c10d ops FSDP2 calls and the functional collectives DTensor uses) and its payload counted on rank 0:
  all-gather      bytes of the gathered output
  reduce-scatter  bytes of the unreduced input
  all-reduce      bytes of the reduced tensor
The theoretical volume is derived independently from the model shape, the layout and the step's real batch shapes
(packed length T and patch count M for DPAR):
  FSDP2 (dp_shard = d): per FSDP unit (each transformer block, and the root's remaining parameters) one all-gather
    of its TP-local parameters padded to a multiple of d on dim 0, again in the backward for units resharded after
    forward (all blocks but the last), and one reduce-scatter of the same size for the gradients; HSDP adds an
    all-reduce of the reduce-scattered shard across dp_replicate.
  TP + SP (tp = t), per micro-batch, activation A = B·L·D elements for a stack of sequence length L:
    per self-attention block: 2 all-gathers (attention and FFN inputs) + 2 reduce-scatters (wo, w2 outputs) in the
    forward, the same 4 mirrored in the backward, and 2 tiny all-reduces (the norm weights' gradients);
    a stack's first block all-gathers its input gradient; a stack consumed whole all-gathers its output;
    head: all-gather of the normed input and of the logits (B·N·V), reduce-scatter of the input gradient;
    token embedding (vocabulary-sharded): all-reduce of its output; DPAR's patch cross-attention (TP without
    SP): all-reduce after wo (and w2, with model.dpar.cross_attn_ffn) in the forward, after wq, wk, wv (w1, w3)
    in the backward; DPAR's per-layer global-state injection (model.dpar.decoder_injection=every, on the
    sequence shard with replicated weights): the all-gather of the gradient of its [B, N, D] input once, and two
    all-reduces per decoder block for the weight gradients (norm D, Linear D²).
  Scalars: the step's code count and loss sum, and the gradient norm (the per-tensor partial norms of each device
  mesh, reduced once per mesh dimension that shards them).
The theory assumes fp32 activations (the default); with --precision bf16 its TP part is approximate.
Not a test: times depend on the machine. Prints a table and writes JSON. BENCH_TRACE=1 prints rank 0's
collectives one by one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpar_scale.cli import entry_point, non_negative_int, parser as cli_parser, positive_int  # noqa: E402

LAYOUTS = {"1": (1, []), "dp2": (2, ["parallel.dp_shard=2"]), "tp2": (2, ["parallel.dp_shard=1", "parallel.tp=2"]),
           "dp2tp2": (4, ["parallel.dp_shard=2", "parallel.tp=2"]), "hsdp2x2": (4, ["parallel.dp_replicate=2",
                                                                                   "parallel.dp_shard=2"])}
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "other")


# ------------------------------------------------------------------------------------------ measurement
def _payload(func, args) -> tuple[str, int]:
    """(kind, bytes) of one collective call."""
    import torch

    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    name = func.__name__ if hasattr(func, "__name__") else str(func)
    functional = func.namespace == "_c10d_functional"
    if "all_gather" in name or "allgather" in name:
        if functional:  # (input(s), group_size, group_name)
            return "all_gather", nbytes(args[0]) * int(args[1])
        return "all_gather", nbytes(args[0])  # c10d: (output(s), input(s), ...)
    if "reduce_scatter" in name:
        return "reduce_scatter", nbytes(args[0] if functional else args[1])
    if "allreduce" in name or "all_reduce" in name:
        return "all_reduce", nbytes(args[0])
    if name.startswith(("wait_tensor", "_wrap_tensor_autograd")):
        return "", 0
    return "other", nbytes(args[0]) if args else 0


def comm_counter():
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.calls = defaultdict(int), defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                # Let DTensor handle its op with this mode still active, so the collectives of implicit
                # redistributions (e.g. a Partial gradient made Replicate) are seen too.
                return NotImplemented
            if "c10d" in func.namespace:
                kind, size = _payload(func, args)
                if kind:
                    self.bytes[kind] += size
                    self.calls[kind] += 1
                    if os.environ.get("BENCH_TRACE") and os.environ.get("RANK", "0") == "0":
                        print("TRACE", kind, size, func, flush=True)
            return func(*args, **(kwargs or {}))

    return CommCounter()


# ------------------------------------------------------------------------------------------------- theory
def _tp_local_shape(p, tp: int) -> list[int]:
    from torch.distributed.tensor import DTensor, Shard

    shape = list(p.shape)
    if isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ()):
        placement = p.placements[p.device_mesh.mesh_dim_names.index("tp")]
        if isinstance(placement, Shard):
            shape[placement.dim] //= tp
    return shape


def fsdp_theory(model, dims, micro_batches: int, param_bytes: int) -> dict:
    from dpar_scale.parallel.parallelize import transformer_blocks

    if not dims.fsdp_enabled:
        return {}
    blocks = [getattr(parent, name) for parent, name in transformer_blocks(model)]
    in_block = {id(p) for b in blocks for p in b.parameters()}
    units = [list(b.parameters()) for b in blocks] + [[p for p in model.parameters() if id(p) not in in_block]]
    d = dims.dp_shard
    out = defaultdict(int)
    for i, params in enumerate(units):
        padded = 0
        for p in params:
            shape = _tp_local_shape(p, dims.tp)
            padded += math.ceil(shape[0] / d) * d * math.prod(shape[1:])
        regather = i < len(blocks) - 1  # blocks resharded after forward; the last block and the root are not
        out["all_gather"] += padded * param_bytes * (2 if regather else 1) * micro_batches
        out["reduce_scatter"] += padded * 4 * micro_batches
        if dims.hsdp:
            out["all_reduce"] += padded // d * 4 * micro_batches
    return out


def tp_theory(cfg, dims, micro: list, act_bytes: int) -> dict:
    """`micro`: per micro-batch (B, N, M, T) on this rank (M, T = 0 for token models)."""
    if not dims.tp_enabled:
        return {}
    m = cfg.model
    dim, vocab = m.dim, m.vocab_size
    out = defaultdict(int)

    def stack(n_blocks, elements, gather_input_grad=True, gather_output=False):
        if n_blocks == 0:
            return
        out["all_gather"] += (4 * n_blocks + int(gather_input_grad) + int(gather_output)) * elements * act_bytes
        out["reduce_scatter"] += 4 * n_blocks * elements * act_bytes
        out["all_reduce"] += 2 * n_blocks * dim * 4  # SP norm weights' gradients (fp32 params)

    for b, n, mp, t in micro:
        if m.kind == "dpar":
            out["all_reduce"] += b * n * dim * act_bytes  # token embedding
            stack(m.n_encoder_layers, b * n * dim, gather_output=True)
            ffn = m.dpar.cross_attn_ffn  # forward: wo (+ w2); backward: wq (+ w1, w3) on patches, wk, wv on codes
            out["all_reduce"] += ((2 + 3 * ffn) * b * mp * dim + 2 * b * n * dim) * act_bytes
            stack(m.n_global_layers, t * dim, gather_output=True)
            stack(m.n_decoder_layers, b * n * dim)
            if m.dpar.decoder_injection == "every":
                out["all_gather"] += b * n * dim * act_bytes  # gradient of the injected global state
                out["all_reduce"] += m.n_decoder_layers * (dim * dim + dim) * 4  # injection weights' gradients
        else:
            out["all_reduce"] += b * (n - 1) * dim * act_bytes  # token embedding of codes[:, :-1]
            stack(m.n_layers, b * n * dim)
        out["all_gather"] += (b * n * dim + b * n * vocab) * act_bytes  # head input + logits
        out["reduce_scatter"] += b * n * dim * act_bytes  # head input gradient
        out["all_reduce"] += dim * 4  # final norm weight gradient
    return out


def scalar_theory(model, dims) -> dict:
    from torch.distributed.tensor import DTensor

    if dims.world_size == 1:
        return {}
    from torch.distributed.tensor import Replicate

    per_mesh, sharded_dims = defaultdict(int), defaultdict(set)
    for p in model.parameters():
        if isinstance(p, DTensor):
            per_mesh[p.device_mesh] += 1
            sharded_dims[p.device_mesh] |= {i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)}
    # the gradient norm: the partial norms of a mesh's gradients, stacked, reduced once per mesh dimension that
    # shards any of them (HSDP's replicate dimension holds full copies). The code count needs no communication
    # and the loss sums are reduced once per log interval, outside train_step (Trainer._flush_into).
    return {"all_reduce": sum(n * 4 * len(sharded_dims[mesh]) for mesh, n in per_mesh.items())}


# ------------------------------------------------------------------------------------------------- worker
def write_random_codes(folder: Path, n_images: int, grid: tuple[int, int], vocab: int, num_classes: int) -> Path:
    import numpy as np

    from dpar_scale.data import shards as S

    from dpar_scale.data import side_arrays as SA

    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    labels = rng.integers(0, num_classes, size=n_images)
    codes = rng.integers(0, vocab, size=(n_images, n))
    folder.mkdir(parents=True, exist_ok=True)
    record = S.write_code_shard(str(folder), 0, codes, labels)
    S.write_manifest(str(folder), {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": n_images,
        "num_source_images": n_images, "grid": list(grid), "vocab_size": vocab,
        "tokenizer": {"name": "random", "path": "", "sha256": ""}, "image_size": grid[0] * 16,
        "augmentation": {"ten_crop": False, "flip": False, "copies_per_image": 1}, "num_classes": num_classes,
        "classes": [f"c{i}" for i in range(num_classes)], "shards": [record], "skipped": []})
    entropy = (rng.random((n_images, n)) * math.log(vocab)).astype(np.float16)
    SA.write_side_shard(str(folder / "entropy"), 0, entropy)
    SA.write_side_manifest(str(folder / "entropy"), S.CodeShards(str(folder)), extra={"grid": list(grid)})
    return folder


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from dpar_scale.config import load_config
    from dpar_scale.patching.layout import PatchLayout
    from dpar_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, json.loads(args.overrides))
    trainer = Trainer(cfg)
    dims, rank = trainer.dims, trainer.env.rank
    for _ in range(args.warmup):
        trainer.train_step()
    counter = comm_counter()
    times, theory = [], defaultdict(int)
    bf16 = cfg.train.precision == "bf16"
    for _ in range(args.steps):
        micro = []
        for batch in trainer.step_batches()[0]:  # the batches train_step is about to use (a pure function of state)
            b, n = batch.codes.shape
            mp = t = 0
            if batch.patch_lengths is not None:
                lay = PatchLayout.from_lengths(batch.patch_lengths, grid=cfg.model.grid, pad_to_multiple=dims.tp)
                mp, t = lay.max_patches, lay.packed_length
            micro.append((b, n, mp, t))
        for part in (fsdp_theory(trainer.engine.model, dims, len(micro), 2 if bf16 else 4),
                     tp_theory(cfg, dims, micro, 2 if bf16 else 4), scalar_theory(trainer.engine.model, dims)):
            for k, v in part.items():
                theory[k] += v
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        with counter:
            trainer.train_step()
        times.append(time.perf_counter() - start)
    step_time = torch.tensor([sum(times) / len(times)])
    if dist.is_initialized():
        dist.all_reduce(step_time, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {"step_time_s": float(step_time), "world_size": dims.world_size,
                  "dims": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp},
                  "measured_bytes_per_step": {k: counter.bytes[k] / args.steps for k in KINDS},
                  "calls_per_step": {k: counter.calls[k] / args.steps for k in KINDS},
                  "theory_bytes_per_step": {k: theory[k] / args.steps for k in KINDS}}
        Path(args.result).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- driver

def model_overrides(args, codes: Path, out: Path) -> list[str]:
    preset = {"dpar": "dpar-tiny", "gpt": "gpt-tiny", "entropy": "entropy-tiny"}[args.kind]
    return [f"run.output_dir={out}", f"data.codes_dir={codes}", f"model.kind={args.kind}", f"model.preset={preset}",
            f"model.dim={args.dim}", f"model.n_heads={args.heads}", f"model.vocab_size={args.vocab}",
            "model.num_classes=10", f"model.grid=[{args.grid},{args.grid}]", "model.dropout=0.0",
            "model.class_dropout=0.0", "model.patch.threshold=4.0", f"data.batch_size={args.batch}",
            "data.val_fraction=0.0", f"train.steps={args.warmup + args.steps}", "train.progress_bar=false",
            "wandb.enabled=false", f"train.precision={args.precision}"]


def run_layout(args, layout: str, codes: Path, tmp: Path) -> dict:
    from dpar_scale.launch import free_port

    nproc, parallel = LAYOUTS[layout]
    result = tmp / f"{layout}.json"
    overrides = model_overrides(args, codes, tmp / f"run-{layout}") + parallel + args.override
    script = [str(Path(__file__).resolve()), "--worker", "--overrides", json.dumps(overrides), "--result",
              str(result), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if os.environ.get("BENCH_TRACE"):
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("TRACE")))
    if done.returncode != 0:
        raise SystemExit(f"layout {layout} failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def table(results: dict, args) -> str:
    mb = 1 / 2**20
    lines = [f"bench_parallel: kind={args.kind} dim={args.dim} heads={args.heads} grid={args.grid}x{args.grid} "
             f"vocab={args.vocab} batch={args.batch} precision={args.precision}; per optimizer step, rank 0, "
             f"MiB measured / theory",
             f"{'layout':<8} {'procs':>5} {'step ms':>8}  {'all-gather':>17}  {'reduce-scatter':>17}  "
             f"{'all-reduce':>17}  {'calls AG/RS/AR':>15}  {'max |meas-theory|':>17}"]
    for layout, r in results.items():
        m, t, c = r["measured_bytes_per_step"], r["theory_bytes_per_step"], r["calls_per_step"]
        cells = [f"{m[k] * mb:8.3f} /{t[k] * mb:8.3f}" for k in ("all_gather", "reduce_scatter", "all_reduce")]
        calls = "/".join(f"{c[k]:g}" for k in ("all_gather", "reduce_scatter", "all_reduce"))
        off = max(abs(m[k] - t[k]) for k in KINDS)
        lines.append(f"{layout:<8} {r['world_size']:>5} {r['step_time_s'] * 1e3:8.1f}  {cells[0]:>17}  "
                     f"{cells[1]:>17}  {cells[2]:>17}  {calls:>15}  {off:>15.0f} B")
    return "\n".join(lines)


@entry_point
def main(argv=None) -> int:
    parser = cli_parser(__doc__)
    parser.add_argument("--kind", default="dpar", choices=("dpar", "gpt", "entropy"))
    parser.add_argument("--layouts", default="1,dp2,tp2,dp2tp2", help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--grid", type=positive_int, default=8)
    parser.add_argument("--vocab", type=positive_int, default=1024)
    parser.add_argument("--batch", type=positive_int, default=8, help="global batch (images per step)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--override", action="append", default=[], help="extra dotted override (repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codes = write_random_codes(tmp / "codes", n_images=max(64, args.batch * 8), grid=(args.grid, args.grid),
                                   vocab=args.vocab, num_classes=10)
        results = {layout: run_layout(args, layout, codes, tmp) for layout in layouts}
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                         if k not in ("worker", "overrides", "result")},
                                              "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
