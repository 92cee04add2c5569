#!/usr/bin/env python
"""Turn a LlamaGen class-conditional GPT checkpoint into an export our samplers and evaluators load.

    python tools/import_llamagen.py c2i_B_256.pt --out exports/llamagen-b-256 --image-size 256 \
        [model.preset=gpt-b | model.n_heads=12 ...] [--trust-pickle]

Writes DIR/model.safetensors + DIR/config.json (the layout tools/export.py writes), a GPT with
model.class_rope=zero so that it gives LlamaGen's own logits (see dpar_scale/checkpoint/llamagen.py for every
detail that was matched). Then, e.g.:

    torchrun --nproc_per_node 8 tools/sample_ddp.py --checkpoint exports/llamagen-b-256 \
        --tokenizer-path vq_ds16_c2i.pt --num-samples 50000 --cfg-scale 2.0 --random-labels --out samples/b256
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.cli import entry_point, existing_file, parser, positive_int  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("checkpoint", type=existing_file, help="LlamaGen GPT checkpoint (.pt): {'model': ...}, {'module': ...}, "
                                      "{'state_dict': ...} or a bare state dict")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--image-size", type=positive_int, required=True, help="the size the model was trained at (256, 384)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (only for files you trust)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.preset=gpt-b")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    from dpar_scale.checkpoint.llamagen import import_llamagen

    summary = import_llamagen(args.checkpoint, args.out, args.image_size, args.overrides, args.trust_pickle)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
