#!/usr/bin/env python
"""Write the embedded synthetic dataset as an ImageFolder tree (DIR/<NN_class>/<index>.png + classes.json), with
captions.jsonl (captions of what each picture shows) and attributes.jsonl (shape, colour, size, position, ...).

    python tools/make_dataset.py --out DIR --num-per-class 200 --classes 10 --image-size 64 --seed 0 \
        [--captions-per-image 3] [--detail fine|coarse|coarse-palette]

Class folders are named NN_<name> (e.g. 03_stripes) so that ImageFolder labels equal the class index. Caption
and attribute paths are relative to DIR (e.g. "00_disc/00000.png"); see dpar_scale/data/synthetic_captions.py.

Deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dpar_scale.cli import UsageError, entry_point, non_negative_int, parser, positive_int  # noqa: E402
from dpar_scale.data.synthetic import CLASS_NAMES, DETAILS, generate_dataset  # noqa: E402


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--num-per-class", type=positive_int, default=200)
    p.add_argument("--classes", type=positive_int, default=10, help=f"number of classes (max {len(CLASS_NAMES)})")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions-per-image", type=non_negative_int, default=3,
                   help="captions written per picture to DIR/captions.jsonl (0: an empty captions.jsonl)")
    p.add_argument("--detail", choices=sorted(DETAILS), default="fine",
                   help="fine: generator v1's pictures (textures of 1-5 px at 64 px); coarse: objects 1.35x larger, "
                        "textures 2.5x coarser and without per-pixel noise (what 8x8-pixel codes can represent); "
                        "coarse-palette (the embedded demo's): textures 3.2x coarser, colours from 8 hues")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        info = generate_dataset(args.out, args.num_per_class, args.classes, args.image_size, args.seed,
                                progress=not args.quiet, captions_per_image=args.captions_per_image,
                                detail=args.detail)
    except ValueError as e:  # --classes / --image-size out of the generator's range
        raise UsageError(str(e)) from None
    n = len(info["classes"]) * args.num_per_class
    print(f"wrote {n} images ({len(info['classes'])} classes: {', '.join(info['classes'])}) of "
          f"{args.image_size}x{args.image_size} to {args.out} with {info['captions_per_image']} captions each "
          f"(captions.jsonl, attributes.jsonl) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
