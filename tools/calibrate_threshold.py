#!/usr/bin/env python
"""Find the entropy threshold θ that gives a target mean patch length on a set of precomputed entropies.

  python tools/calibrate_threshold.py --entropy runs/demo/data/codes/entropy --target-mean-length 1.81 \
      --max-patch-length 4 [--mode global] [--alignment reference] [--json theta.json]
  python tools/calibrate_threshold.py ... --mode global+monotonic --relative-threshold 1.5   # θ for a fixed θ_rel

Prints θ, the achieved mean patch length (codes / patches over the whole set: the reduction in global
positions) and the histogram of patch lengths.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpar_scale.cli import UsageError, entry_point, existing_dir, parser, positive_float, positive_int  # noqa: E402


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--entropy", required=True, type=existing_dir,
                   help="entropy folder written by tools/compute_entropy.py")
    p.add_argument("--target-mean-length", type=positive_float, required=True)
    p.add_argument("--max-patch-length", type=positive_int, default=4)
    p.add_argument("--mode", default="global", choices=["global", "monotonic", "global+monotonic"])
    p.add_argument("--relative-threshold", type=float, default=0.0,
                   help="θ_rel of --mode global+monotonic (kept fixed; θ is calibrated)")
    p.add_argument("--alignment", default="reference", choices=["reference", "blt"])
    p.add_argument("--max-images", type=positive_int, default=20000, help="calibrate on at most this many rows")
    p.add_argument("--verify", default="full", choices=("full", "size"),
                   help="check the entropy shards' sha256 (full) or only their sizes (values always)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if (args.mode == "global+monotonic") != (args.relative_threshold != 0):
        raise UsageError("--relative-threshold (> 0) goes with --mode global+monotonic, and only with it")
    from dpar_scale.config import PatchConfig

    rule = PatchConfig(mode=args.mode, alignment=args.alignment, max_patch_length=args.max_patch_length,
                       relative_threshold=args.relative_threshold)

    import numpy as np
    import torch

    from dpar_scale.data.checks import open_checked_side_array
    from dpar_scale.patching.rule import calibrate_threshold

    entropy = open_checked_side_array(args.entropy, args.verify)
    meta = entropy.manifest
    width = int(meta["grid"][1])
    rows = np.linspace(0, len(entropy) - 1, num=min(len(entropy), args.max_images)).astype(np.int64)
    e = torch.from_numpy(np.asarray(entropy[np.unique(rows)]).astype(np.float32))
    try:
        cal = calibrate_threshold(e, rule, width=width, target_mean_length=args.target_mean_length)
    except ValueError as err:  # an unreachable target: say which and why
        raise UsageError(str(err)) from None
    total = sum(cal.histogram.values())
    print(f"θ = {cal.threshold:.4f} nats  ->  mean patch length {cal.mean_patch_length:.4f} "
          f"(target {cal.target}) over {cal.num_images} images, grid width {width}, P_max {args.max_patch_length}")
    print("patch length histogram:")
    for length, count in cal.histogram.items():
        print(f"  {length:>3}: {count:>9}  {100 * count / total:5.1f}%  {'#' * int(50 * count / total)}")
    print(f"entropy: mean {e.mean():.3f}, median {e.median():.3f}, max {e.max():.3f} nats")
    if args.json:
        result = {"threshold": cal.threshold, "mean_patch_length": cal.mean_patch_length, "target": cal.target,
                  "max_patch_length": args.max_patch_length, "mode": args.mode, "alignment": args.alignment,
                  "relative_threshold": args.relative_threshold,
                  "num_images": cal.num_images, "histogram": {str(k): v for k, v in cal.histogram.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
