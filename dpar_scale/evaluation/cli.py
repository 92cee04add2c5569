"""Command-line options shared by the tools that evaluate (tools/evaluate.py, tools/sample_ddp.py --evaluate),
and the one function both call after parsing them."""
from __future__ import annotations

import argparse
import json
import os

from dpar_scale.evaluation.evaluate import evaluate_samples, format_table
from dpar_scale.evaluation.reference import reference_statistics
from dpar_scale.evaluation.sources import EvaluationError, open_images
from dpar_scale.parallel import process_group as pg


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, required: bool, prefix: str = "") -> None:
    """--reference, --inception | --features, --json and the detector batch options (`prefix` names them e.g.
    --eval-batch-size where another --batch-size exists)."""
    parser.add_argument("--reference", required=required,
                        help="reference npz (ADM batch or samples) or ImageFolder")
    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--inception", metavar="PATH",
                       help="the TorchScript Inception detector inception-2015-12-05.pt")
    which.add_argument("--features", metavar="KIND:PATH",
                       help="inception:PATH or domain:PATH (a classifier fitted on the dataset's real images)")
    parser.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
    parser.add_argument(f"--{prefix}batch-size", dest="eval_batch_size", type=int, default=64,
                        help="images per detector batch (default 64)")
    parser.add_argument("--split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    parser.add_argument("--cache-dir", default=None, help="where to cache reference statistics (default: beside it)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")


def detector_spec(args: argparse.Namespace) -> str:
    if not (args.inception or args.features) or not args.reference:
        raise EvaluationError("evaluation needs --reference and one of --inception PATH / --features KIND:PATH")
    return f"inception:{args.inception}" if args.inception else args.features


def evaluate_from_args(args: argparse.Namespace, samples, device, progress: bool = True) -> dict:
    """Collective (every rank of the current group, or one process): the metrics of `samples`; rank 0 prints
    the table and writes --json."""
    if args.eval_batch_size < 1 or args.split_size < 1:
        raise EvaluationError("the detector batch size and --split-size must be >= 1")
    result = evaluate_samples(samples, args.reference, detector_spec(args), batch_size=args.eval_batch_size,
                              device=device, use_cache=not args.no_cache, cache_dir=args.cache_dir,
                              split_size=args.split_size, progress=progress)
    if pg.is_main_process():
        print(format_table(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
    return result


def cache_reference_from_args(args: argparse.Namespace, device, progress: bool = True) -> dict:
    """Collective: the reference statistics of --reference under the detector, extracted and cached (or found in
    the cache) without samples; rank 0 prints where they are."""
    from dpar_scale.evaluation.detectors import load_detector

    if args.no_cache:
        raise EvaluationError("without --samples only the reference statistics are computed, to be cached: "
                              "--no-cache leaves nothing to do")
    if args.image_size is None and os.path.isdir(args.reference):
        raise EvaluationError(f"{args.reference} is an ImageFolder: give --image-size, the size of the samples it "
                              f"will be compared with (its images are centre-cropped to it)")
    reference = open_images(args.reference, image_size=args.image_size, what="reference")
    device = device or "cpu"  # tools/evaluate.py has already picked this rank's GPU when there is one
    stats = reference_statistics(reference, load_detector(detector_spec(args), device), args.eval_batch_size,
                                 device, True, args.cache_dir, progress)
    if stats is None:  # not rank 0
        return {}
    if stats.cache is None:
        raise EvaluationError(f"{args.reference}: this reference or detector cannot be cached (no fingerprint or "
                              f"detector hash); evaluate samples directly instead")
    where = "found in the cache" if stats.from_cache else "cached"
    print(f"reference statistics of {args.reference} ({stats.features.shape[0]} images): {where} at {stats.cache}",
          flush=True)
    return {"reference_cache": stats.cache, "num_reference": int(stats.features.shape[0]),
            "from_cache": bool(stats.from_cache)}
