#!/usr/bin/env python
"""Per-code entropies of a trained entropy model over an extracted code dataset (what the patcher reads).

  python tools/compute_entropy.py --checkpoint runs/demo/entropy/checkpoints/step-000200 --codes CODES \
      [--out CODES/entropy] [--batch-size 64] [--device cpu]
  torchrun --nproc_per_node 8 tools/compute_entropy.py ...   # shards are split over the ranks

Writes float16 [rows, H·W] in nats beside the codes, with the codes' sharding: entry k is the entropy of the
model's prediction of code k from codes < k. Resumable: shards already completed (and intact) are skipped; each
shard is written under a temporary name and renamed; the manifest is written last, by rank 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpar_scale.parallel import process_group as dist  # noqa: E402
from dpar_scale.checkpoint.export import load_model_for_inference  # noqa: E402
from dpar_scale.data.shards import CodeShards  # noqa: E402
from dpar_scale.data.side_arrays import side_shard_complete, write_side_manifest, write_side_shard  # noqa: E402
from dpar_scale.patching.entropy import code_entropies  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="entropy-model checkpoint folder (train.py, kind=entropy)")
    p.add_argument("--codes", required=True, help="folder written by tools/extract_codes.py")
    p.add_argument("--out", default="", help="output folder (default: <codes>/entropy)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    env = dist.init_process_group(backend="gloo", timeout_s=2 * 3600)
    rank, world = env.rank, env.world_size
    try:
        model, cfg = load_model_for_inference(args.checkpoint, device=args.device)
        if cfg.model.kind != "entropy":
            raise SystemExit(f"error: {args.checkpoint} holds a {cfg.model.kind!r} model; entropies come from an "
                             f"unconditional model trained with model.kind=entropy")
        codes = CodeShards(args.codes)
        if codes.vocab_size != cfg.model.vocab_size or tuple(codes.grid) != tuple(cfg.model.grid):
            raise SystemExit(f"error: the entropy model expects vocab {cfg.model.vocab_size} on a "
                             f"{list(cfg.model.grid)} grid, the codes have vocab {codes.vocab_size} on "
                             f"{list(codes.grid)}: train the entropy model on these codes")
        out = Path(args.out or Path(args.codes) / "entropy")
        mine = [s for i, s in enumerate(codes.shards) if i % world == rank]
        todo = [s for s in mine if not side_shard_complete(str(out), s["index"], s["count"])]
        if rank == 0:
            print(f"entropy: {len(codes)} rows in {len(codes.shards)} shards, {world} rank(s); "
                  f"{len(mine) - len(todo)} of rank 0's {len(mine)} shards already done")
        offsets = np.cumsum([0] + [s["count"] for s in codes.shards])
        position = {s["index"]: offsets[i] for i, s in enumerate(codes.shards)}
        bar = tqdm(total=sum(s["count"] for s in todo), desc=f"entropy[rank {rank}]", unit="img",
                   disable=rank != 0 and world > 1)
        for shard in todo:
            start = int(position[shard["index"]])
            chunks = []
            for lo in range(start, start + shard["count"], args.batch_size):
                hi = min(lo + args.batch_size, start + shard["count"])
                batch = torch.from_numpy(codes.codes(slice(lo, hi)).astype(np.int64)).to(args.device)
                chunks.append(code_entropies(model, batch).cpu().numpy())
                bar.update(hi - lo)
            write_side_shard(str(out), shard["index"], np.concatenate(chunks), name="entropy",
                             meta={"checkpoint": str(Path(args.checkpoint).resolve())})
        bar.close()
        dist.barrier()
        if rank == 0:
            manifest = write_side_manifest(str(out), codes, name="entropy", extra={
                "entropy_checkpoint": str(Path(args.checkpoint).resolve()), "grid": list(codes.grid),
                "units": "nats", "alignment": "entry k = entropy of the prediction of code k from codes < k"})
            values = np.concatenate([np.asarray(codes_row) for codes_row in _sample_rows(out, codes)])
            print(f"wrote {manifest['num_rows']} rows to {out}; entropy mean {values.mean():.3f} nats, "
                  f"max {values.max():.3f} (max possible ln {codes.vocab_size} = {np.log(codes.vocab_size):.3f})")
    finally:
        dist.destroy_process_group()
    return 0


def _sample_rows(out: Path, codes: CodeShards, count: int = 512):
    from dpar_scale.data.side_arrays import open_side_array

    arr = open_side_array(str(out), codes)
    idx = np.linspace(0, len(arr) - 1, num=min(count, len(arr))).astype(np.int64)
    return [arr[np.unique(idx)].astype(np.float32)]


if __name__ == "__main__":
    sys.exit(main())
