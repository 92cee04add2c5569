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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpar_scale.cli import UsageError, entry_point, existing_dir, existing_path, parser, positive_int  # noqa: E402
from dpar_scale.errors import DparError  # noqa: E402


class EntropyError(DparError):
    """The entropy model's output cannot be stored (non-finite or out-of-range entropies)."""

    shared = False  # found by the rank that computed the shard


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--checkpoint", required=True, type=existing_path,
                   help="entropy-model checkpoint folder (train.py, kind=entropy)")
    p.add_argument("--codes", required=True, type=existing_dir, help="folder written by tools/extract_codes.py")
    p.add_argument("--out", default="", help="output folder (default: <codes>/entropy)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available), cpu, cuda (= cuda:LOCAL_RANK with several ranks), cuda:N")
    p.add_argument("--verify", default="full", choices=("full", "size"),
                   help="check the code shards' sha256 (full) or only their sizes before reading (values always)")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from tqdm import tqdm

    from dpar_scale.checkpoint.export import load_model_for_inference
    from dpar_scale.data.checks import check_code_shards, check_entropy_values
    from dpar_scale.data.shards import CodeShards
    from dpar_scale.data.side_arrays import side_shard_complete, write_side_manifest, write_side_shard
    from dpar_scale.parallel import process_group as dist
    from dpar_scale.patching.entropy import code_entropies

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    env = dist.init_process_group(backend="gloo", timeout_s=2 * 3600)
    rank, world = env.rank, env.world_size
    if device == "cuda" and world > 1:  # one GPU per rank, as tools/extract_codes.py does
        device = f"cuda:{dist.get_local_rank()}"
    try:
        model, cfg = load_model_for_inference(args.checkpoint, device=device)
        if cfg.model.kind != "entropy":
            raise UsageError(f"{args.checkpoint} holds a {cfg.model.kind!r} model; entropies come from an "
                             f"unconditional model trained with model.kind=entropy")
        codes = CodeShards(args.codes)
        if codes.vocab_size != cfg.model.vocab_size or tuple(codes.grid) != tuple(cfg.model.grid):
            raise UsageError(f"the entropy model expects vocab {cfg.model.vocab_size} on a "
                             f"{list(cfg.model.grid)} grid, the codes have vocab {codes.vocab_size} on "
                             f"{list(codes.grid)}: train the entropy model on these codes")
        check_code_shards(codes, args.verify, dist.work_share(), allow_null_label=True)  # labels are not read
        out = Path(args.out or Path(args.codes) / "entropy")
        mine = [s for i, s in enumerate(codes.shards) if i % world == rank]
        todo = [s for s in mine if not side_shard_complete(str(out), s["index"], s["count"],
                                                           codes_sha256=s["sha256"]["codes"])]
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
                batch = torch.from_numpy(codes.codes(slice(lo, hi)).astype(np.int64)).to(device)
                chunks.append(code_entropies(model, batch).cpu().numpy())
                bar.update(hi - lo)
            values = np.concatenate(chunks).astype(np.float16)
            bad = check_entropy_values(values, codes.vocab_size)
            if bad is not None:
                raise EntropyError(f"the entropy model {args.checkpoint} gave entropy {values[bad]} for code "
                                   f"{bad[1]} of row {start + bad[0]}: not finite or outside [0, ln "
                                   f"{codes.vocab_size}]; its weights are broken (retrain it or use an earlier "
                                   f"checkpoint); nothing was written for shard {shard['index']}")
            write_side_shard(str(out), shard["index"], values, name="entropy",
                             meta={"checkpoint": str(Path(args.checkpoint).resolve()),
                                   "codes_sha256": shard["sha256"]["codes"]})
        bar.close()
        dist.barrier()
        if rank == 0:
            manifest = write_side_manifest(str(out), codes, name="entropy", extra={
                "entropy_checkpoint": str(Path(args.checkpoint).resolve()), "grid": list(codes.grid),
                "vocab_size": codes.vocab_size, "units": "nats",
                "alignment": "entry k = entropy of the prediction of code k from codes < k"})
            values = np.concatenate([np.asarray(codes_row) for codes_row in _sample_rows(out, codes)])
            print(f"wrote {manifest['num_rows']} rows to {out}; entropy mean {values.mean():.3f} nats, "
                  f"max {values.max():.3f} (max possible ln {codes.vocab_size} = {np.log(codes.vocab_size):.3f})")
    finally:
        dist.destroy_process_group()
    return 0


def _sample_rows(out: Path, codes, count: int = 512):
    import numpy as np

    from dpar_scale.data.side_arrays import open_side_array

    arr = open_side_array(str(out), codes)
    idx = np.linspace(0, len(arr) - 1, num=min(count, len(arr))).astype(np.int64)
    return [arr[np.unique(idx)].astype(np.float32)]


if __name__ == "__main__":
    sys.exit(main())
