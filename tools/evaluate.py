#!/usr/bin/env python
"""FID, Inception Score, precision and recall of a samples file against a reference, as ADM's evaluator defines them.

    python tools/evaluate.py --reference REF --samples DIR/samples.npz --inception inception-2015-12-05.pt \
        [--json OUT] [--batch-size 64] [--device cuda]
    python tools/evaluate.py --reference IMAGES_DIR --samples DIR/samples.npz --features domain:evaluator.pt
    python tools/evaluate.py --reference IMAGES_DIR --image-size 64 --features domain:evaluator.pt
        (no --samples: only the reference statistics, cached for the evaluations to come, e.g. before runs that
        evaluate during training side by side and would otherwise each extract them)
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
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from dpar_scale.cli import entry_point, parser  # noqa: E402
from dpar_scale.evaluation.cli import (  # noqa: E402
    add_evaluation_arguments, cache_reference_from_args, evaluate_from_args,
)
from dpar_scale.parallel import process_group as pg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--samples", default=None, help="samples npz: arr_0 uint8 [N, H, W, 3] (+ labels); without it "
                                                   "only the reference statistics are computed and cached")
    p.add_argument("--image-size", type=int, default=None,
                   help="without --samples: the size an ImageFolder reference is cropped to (the samples' size)")
    add_evaluation_arguments(p, required=True)
    p.add_argument("--device", default=None, help="default: this rank's GPU when there is one, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{pg.get_local_rank()}"  # each rank its own GPU
    pg.init_process_group(device=torch.device(device or "cpu"), timeout_s=2 * 3600)  # nccl on GPU, gloo on CPU
    try:
        if args.samples is None:
            return cache_reference_from_args(args, device, progress=not args.no_progress)
        return evaluate_from_args(args, args.samples, device, progress=not args.no_progress)
    finally:
        pg.destroy_process_group()


@entry_point
def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
