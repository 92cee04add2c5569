"""Parameter counts of every model preset, split into embeddings / encoder / global / decoder / head.

Models are built on the meta device, so even XXL costs no memory. Vocabulary, classes and grid are LlamaGen's
(16,384 codes, 1,000 classes + null, 16x16) unless overridden. DPAR is built in the structure of the authors' code
(model.dpar defaults); `--dpar first,true` counts the legacy one (global state injected once, FFN after the
patch cross-attention). The "reported" column gives the paper's figure and, for DPAR, the authors' code's.
Text presets (*-text) replace the class embedding by a text embedding of --text-vocab rows (default 32,000, the
size of T5's spiece.model; the embedded data's own tokenizer is far smaller).

    python tools/count_params.py [--json counts.json] [--presets gpt-b dpar-b] [--vocab 16384 --classes 1000]
        [--dpar every,false] [--text-vocab 32000]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import UsageError, entry_point, parser, positive_int  # noqa: E402

if TYPE_CHECKING:
    from dpar_scale.config import DPARConfig

COLUMNS = ("embeddings", "encoder", "global", "decoder", "head", "total")


def count_all(names, vocab_size: int = 16384, num_classes: int = 1000,
              dpar: DPARConfig | None = None, text_vocab: int = 32000) -> dict[str, dict[str, int]]:
    import torch

    from dpar_scale.config import DPARConfig, ModelConfig, TextConfig
    from dpar_scale.models import PRESETS, build_model, param_breakdown

    out = {}
    for name in names:
        text = PRESETS[name].get("conditioning") == "text"
        cfg = ModelConfig(kind=PRESETS[name]["kind"], preset=name, vocab_size=vocab_size, num_classes=num_classes,
                          dpar=dpar or DPARConfig(), conditioning="text" if text else "class",
                          text=TextConfig(vocab_size=text_vocab if text else 0))
        with torch.device("meta"):
            model = build_model(cfg)
        out[name] = param_breakdown(model)
    return out


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--presets", nargs="*", default=None, help="preset names (default: all)")
    ap.add_argument("--vocab", type=positive_int, default=16384)
    ap.add_argument("--classes", type=positive_int, default=1000)
    ap.add_argument("--dpar", default="every,false", metavar="INJECTION,FFN",
                    help="DPAR structure: model.dpar.decoder_injection (every | first) and model.dpar.cross_attn_ffn "
                         "(true | false); default every,false (the authors' code)")
    ap.add_argument("--text-vocab", type=positive_int, default=32000,
                    help="rows of the text embedding of the *-text presets (model.text.vocab_size)")
    ap.add_argument("--json", type=Path, help="also write the counts (exact integers) to this file")
    args = ap.parse_args(argv)
    from dpar_scale.config import ConfigError, parse_dpar_structure
    from dpar_scale.models import PRESETS
    from dpar_scale.models.presets import REPORTED_M

    presets = list(PRESETS) if args.presets is None else args.presets
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UsageError(f"--presets: unknown presets {unknown}; known: {', '.join(sorted(PRESETS))}")
    try:
        structure = parse_dpar_structure(args.dpar)
    except ConfigError as err:
        raise UsageError(f"--dpar: {err}") from None
    counts = count_all(presets, args.vocab, args.classes, structure, args.text_vocab)
    print(f"{'preset':<16}" + "".join(f"{c:>12}" for c in COLUMNS) + f"  {'reported':<26}")
    for name, row in counts.items():
        rep = REPORTED_M.get(name, {})
        rep_s = ", ".join(f"{label} {rep[key]}M" for key, label in (("paper", "paper"), ("authors_code", "code"))
                          if key in rep)
        print(f"{name:<16}" + "".join(f"{row[c] / 1e6:>11.2f}M" for c in COLUMNS) + f"  {rep_s:<26}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(counts, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
