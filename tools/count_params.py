"""Parameter counts of every model preset, split into embeddings / encoder / global / decoder / head.

Models are built on the meta device, so even XXL costs no memory. Vocabulary, classes and grid are LlamaGen's
(16,384 codes, 1,000 classes + null, 16x16) unless overridden.

    python tools/count_params.py [--json counts.json] [--presets gpt-b dpar-b] [--vocab 16384 --classes 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.config import ModelConfig  # noqa: E402
from dpar_scale.models import PRESETS, build_model, param_breakdown  # noqa: E402
from dpar_scale.models.presets import REPORTED_M  # noqa: E402

COLUMNS = ("embeddings", "encoder", "global", "decoder", "head", "total")


def count_all(names, vocab_size: int = 16384, num_classes: int = 1000) -> dict[str, dict[str, int]]:
    out = {}
    for name in names:
        cfg = ModelConfig(kind=PRESETS[name]["kind"], preset=name, vocab_size=vocab_size, num_classes=num_classes)
        with torch.device("meta"):
            model = build_model(cfg)
        out[name] = param_breakdown(model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), help="preset names (default: all)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="also write the counts (exact integers) to this file")
    args = ap.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown presets {unknown}; known: {', '.join(sorted(PRESETS))}")
    counts = count_all(args.presets, args.vocab, args.classes)
    print(f"{'preset':<13}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'reported':>14}")
    for name, row in counts.items():
        rep = REPORTED_M.get(name)
        rep_s = "" if rep is None else (f"{rep[0]}-{rep[1]}M" if isinstance(rep, tuple) else f"~{rep}M")
        print(f"{name:<13}" + "".join(f"{row[c] / 1e6:>11.2f}M" for c in COLUMNS) + f"{rep_s:>14}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(counts, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
