#!/usr/bin/env python
"""Fit the embedded evaluator: a small conv classifier of the dataset's real images, whose penultimate features
give FID-domain / precision / recall and whose heads give class (and shape / colour) accuracy of samples.

    python tools/fit_evaluator.py --images DIR --out evaluator.pt [--epochs 16] [--heads shape,colour] [--seed 0]
    python tools/evaluate.py --samples S.npz --reference DIR --features domain:evaluator.pt

DIR: the ImageFolder tools/make_dataset.py writes (class folders; attributes.jsonl beside them gives the shape and
colour heads). A balanced tenth of the images is held out; the held-out accuracy of every head is printed and
stored in the file. Below 95% held-out class accuracy the evaluator's verdict on samples means little: the file
is not written (exit 2) unless --allow-low-accuracy is given, and then with a warning.
The file is a plain torch.save (torch.load(..., weights_only=True)): see dpar_scale/evaluation/domain_classifier.py.
"""
from __future__ import annotations

import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dpar_scale.cli import UsageError, entry_point, existing_dir, fraction, parser, positive_int  # noqa: E402


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--images", type=existing_dir, required=True, help="ImageFolder of real images")
    p.add_argument("--out", required=True, help="where to write the evaluator (.pt)")
    p.add_argument("--epochs", type=positive_int, default=16)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs decides)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--width", type=positive_int, default=32, help="channels of the first stage")
    p.add_argument("--heads", default="shape,colour",
                   help="attribute heads besides the class head, from DIR/attributes.jsonl ('' for none)")
    p.add_argument("--held-out", type=fraction, default=0.1, help="fraction of each class held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="size the images are centre-cropped to (default: their own)")
    p.add_argument("--work-size", type=positive_int, default=32,
                   help="the classifier's input size: images (and later samples) are resized to it (default 32)")
    p.add_argument("--min-accuracy", type=fraction, default=0.95,
                   help="held-out class accuracy below which the file is not written (default 0.95)")
    p.add_argument("--allow-low-accuracy", action="store_true", help="write it anyway, with a warning")
    p.add_argument("--json", default=None, help="also write the report (meta) as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 < args.held_out < 1.0:
        raise UsageError("--held-out must be in (0, 1)")
    from dpar_scale.evaluation.domain_classifier import save_domain_classifier
    from dpar_scale.evaluation.domain_fit import fit_domain_classifier
    from dpar_scale.evaluation.sources import EvaluationError

    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    model, meta = fit_domain_classifier(args.images, heads=heads, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, width=args.width, held_out=args.held_out, seed=args.seed,
                                        image_size=args.image_size, work_size=args.work_size, max_steps=args.max_steps,
                                        progress=not args.no_progress)
    for note in meta["notes"]:
        print(f"note: {note}")
    acc = meta["held_out_accuracy"]
    print(f"held-out accuracy on {meta['num_held_out']} real images (fitted on {meta['num_train']} in "
          f"{meta['seconds']:.1f}s, {meta['fit']['steps']} steps, {meta['fit']['threads']} threads): "
          + ", ".join(f"{h} {a:.2%}" for h, a in acc.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    if acc["class"] < args.min_accuracy:
        message = (f"held-out class accuracy {acc['class']:.2%} is below {args.min_accuracy:.0%}: its verdict on "
                   f"samples would mean little; fit longer (--epochs), wider (--width) or on more images")
        if not args.allow_low_accuracy:
            raise EvaluationError(f"{message}; {args.out} not written (--allow-low-accuracy writes it anyway)")
        print(f"WARNING: {message}; writing {args.out} anyway (--allow-low-accuracy)", file=sys.stderr, flush=True)
    save_domain_classifier(args.out, model, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
