#!/usr/bin/env python
"""FID, Inception Score, precision and recall of a samples file against a reference, as ADM's evaluator defines them.

    python tools/evaluate.py --reference REF --samples DIR/samples.npz --inception inception-2015-12-05.pt \
        [--json OUT] [--batch-size 64] [--device cuda]
    python tools/evaluate.py --reference IMAGES_DIR --samples DIR/samples.npz --features domain:evaluator.pt
    torchrun --nproc_per_node 8 tools/evaluate.py ...      (feature extraction split over the ranks)

REF: an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz: `arr_0`, and `mu` / `sigma`, which FID then
uses as ADM does), another samples npz, or an ImageFolder (DIR/<class>/<image>; centre-cropped to the samples'
size like ADM's reference batches). SAMPLES: `arr_0` uint8 [N, H, W, 3] and optional `labels` int64 [N].
The detector is only read from the path given, never downloaded. The reference statistics are cached beside the
reference (REF.stats-<detector hash>.npz) and recomputed when the reference or the detector changes.
Bad input is reported in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from dpar_scale.config import ConfigError  # noqa: E402
from dpar_scale.evaluation import EvaluationError, evaluate_samples, format_table  # noqa: E402
from dpar_scale.parallel import process_group as pg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="reference npz (ADM batch or samples) or ImageFolder")
    p.add_argument("--samples", required=True, help="samples npz: arr_0 uint8 [N, H, W, 3] (+ labels)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--inception", metavar="PATH", help="the TorchScript Inception detector inception-2015-12-05.pt")
    which.add_argument("--features", metavar="KIND:PATH", help="inception:PATH or domain:PATH (a classifier fitted "
                                                               "on the dataset's real images)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--batch-size", type=int, default=64, help="images per detector batch (default 64)")
    p.add_argument("--device", default=None, help="default: this rank's GPU when there is one, else cpu")
    p.add_argument("--split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    p.add_argument("--cache-dir", default=None, help="where to cache reference statistics (default: beside it)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or args.split_size < 1:
        raise EvaluationError("--batch-size and --split-size must be >= 1")
    detector = f"inception:{args.inception}" if args.inception else args.features
    device = args.device
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{pg.get_local_rank()}"  # each rank its own GPU
    pg.init_process_group(device=torch.device(device or "cpu"), timeout_s=2 * 3600)  # nccl on GPU, gloo on CPU
    try:
        result = evaluate_samples(args.samples, args.reference, detector, batch_size=args.batch_size, device=device,
                                  use_cache=not args.no_cache, cache_dir=args.cache_dir, split_size=args.split_size,
                                  progress=not args.no_progress)
    finally:
        pg.destroy_process_group()
    if pg.is_main_process():
        print(format_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
