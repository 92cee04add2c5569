#!/usr/bin/env python
"""Fit the embedded k-means block tokenizer on an ImageFolder and report held-out reconstruction PSNR.

    python tools/fit_tokenizer.py --images DIR --out PATH [--codebook-size 512] [--image-size 64] [--seed 0]

Images are preprocessed exactly as extraction does (LlamaGen centre crop to --image-size, no augmentation).
A deterministic --holdout fraction of the images (by seed) is kept out of the fit and used for the PSNR.
With `--evaluator PATH` (an embedded evaluator, tools/fit_evaluator.py) it also reports the share of held-out
reconstructions the evaluator recognises as their class, beside its share of the originals: no generator over these
codes can be recognised more often than the codes' own reconstructions, so this is the ceiling on its samples'
class accuracy. `--json PATH` writes the report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dpar_scale.cli import (  # noqa: E402
    UsageError, entry_point, existing_dir, existing_file, fraction, parser, positive_int, write_json_report,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--images", required=True, type=existing_dir, help="ImageFolder root")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--codebook-size", type=positive_int, default=512)
    p.add_argument("--block-size", type=positive_int, default=4, help="pixels per block side (= downsampling factor)")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=positive_int, default=10, help="Lloyd iterations")
    p.add_argument("--max-blocks", type=positive_int, default=200_000, help="blocks sampled for the fit")
    p.add_argument("--max-images", type=positive_int, default=20_000, help="cap on images read for the fit")
    p.add_argument("--holdout", type=fraction, default=0.1, help="fraction of images held out for the PSNR")
    p.add_argument("--evaluator", type=existing_file, default=None,
                   help="embedded evaluator: report its class accuracy on held-out reconstructions vs originals")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def load_images(samples, image_size: int, progress: bool):
    """(images [n, 3, S, S] as pil_to_tensor gives them, their labels, number of unreadable files skipped)."""
    import torch
    from tqdm import tqdm

    from dpar_scale.data.images import center_crop_arr, load_rgb, pil_to_tensor

    out, labels, bad = [], [], 0
    for path, label in tqdm(samples, desc="loading", unit="img", disable=not progress):
        try:
            out.append(pil_to_tensor(center_crop_arr(load_rgb(path), image_size)))
            labels.append(label)
        except Exception as e:  # noqa: BLE001 - a bad file must not stop the fit
            print(f"warning: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            bad += 1
    return (torch.stack(out) if out else torch.empty(0, 3, image_size, image_size)), labels, bad


def recognised_as_class(evaluator: str, originals, reconstructions, labels: list[int]) -> dict:
    """The evaluator's class accuracy on the originals and on their reconstructions (images in [-1, 1])."""
    import numpy as np

    from dpar_scale.evaluation.domain_classifier import load_domain_classifier, predict
    from dpar_scale.sampling.images import to_uint8

    model = load_domain_classifier(evaluator)
    if "class" not in model.heads:
        raise UsageError(f"--evaluator {evaluator} has no class head (heads: {', '.join(model.heads)})")
    target = np.asarray(labels)
    return {f"{name}_class_accuracy": float((predict(model, to_uint8(x))["class"] == target).mean())
            for name, x in (("original", originals), ("reconstruction", reconstructions))}


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    if args.image_size % args.block_size:
        raise UsageError(f"--image-size {args.image_size} is not divisible by --block-size {args.block_size}")
    import torch

    from dpar_scale.data.images import list_image_folder
    from dpar_scale.tokenizer.kmeans import KMeansTokenizer, psnr

    _, samples = list_image_folder(args.images)
    if len(samples) < 2:
        raise UsageError(f"need at least 2 images under {args.images!r}, found {len(samples)}")
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(samples), generator=gen).tolist()[: args.max_images]
    n_hold = min(len(order) - 1, max(1, int(round(len(order) * args.holdout))))
    hold = [samples[i] for i in sorted(order[:n_hold])]
    train = [samples[i] for i in sorted(order[n_hold:])]

    x_train, _, bad_t = load_images(train, args.image_size, not args.quiet)
    x_hold, hold_labels, bad_h = load_images(hold, args.image_size, not args.quiet)
    blocks = x_train.shape[0] * (args.image_size // args.block_size) ** 2
    if blocks < args.codebook_size:
        raise UsageError(f"only {blocks} blocks from {x_train.shape[0]} images; need >= --codebook-size "
                         f"{args.codebook_size}")
    print(f"fitting k-means: {args.codebook_size} codes on {min(blocks, args.max_blocks)} of {blocks} "
          f"{args.block_size}x{args.block_size} blocks from {x_train.shape[0]} images")
    tok = KMeansTokenizer.fit(x_train, codebook_size=args.codebook_size, block_size=args.block_size,
                              iters=args.iters, seed=args.seed, max_blocks=args.max_blocks, verbose=not args.quiet)
    tok.save(args.out, extra_metadata={"image_size": args.image_size,
                                       "fit_images": os.path.abspath(args.images)})

    def reconstruct(x):
        return torch.cat([tok.decode(tok.encode(c)) for c in x.split(256)]) if x.shape[0] else x

    rec_train, rec_hold = reconstruct(x_train), reconstruct(x_hold)
    used = torch.bincount(tok.encode(x_train[:512]).flatten(), minlength=tok.vocab_size).gt(0).sum().item()
    report = {"codebook_size": tok.vocab_size, "block_size": tok.block_size, "image_size": args.image_size,
              "psnr_train_db": psnr(rec_train, x_train) if x_train.shape[0] else float("nan"),
              "psnr_held_out_db": psnr(rec_hold, x_hold) if x_hold.shape[0] else float("nan"),
              "held_out_images": x_hold.shape[0], "codes_used_on_512_train_images": used}
    print(f"saved {args.out}: codebook {tok.vocab_size} x {tok.codebook.shape[1]}, downsample {tok.downsample}; "
          f"PSNR train {report['psnr_train_db']:.2f} dB, held-out {report['psnr_held_out_db']:.2f} dB "
          f"({x_hold.shape[0]} images); codes used on 512 train images: {used}; "
          f"{bad_t + bad_h} unreadable skipped; {time.time() - t0:.1f}s")
    if args.evaluator:
        report.update(recognised_as_class(args.evaluator, x_hold, rec_hold, hold_labels))
        print(f"evaluator {args.evaluator}: recognises {report['reconstruction_class_accuracy']:.1%} of the "
              f"held-out reconstructions as their class (originals: {report['original_class_accuracy']:.1%}) "
              f"-- the ceiling on the class accuracy of samples over these codes")
    write_json_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
