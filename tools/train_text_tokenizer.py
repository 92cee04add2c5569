#!/usr/bin/env python
"""Train a sentencepiece text tokenizer on caption files (or report how an existing model tokenizes them).

    python tools/train_text_tokenizer.py --captions captions.jsonl [more.jsonl ...] --vocab-size 512 \
        --out text.model [--model-type unigram|bpe] [--byte-fallback] [--num-threads 1] [--seed 0]
    python tools/train_text_tokenizer.py --captions captions.jsonl --model spiece.model   # T5's, LLaMA's, ...

Caption files are JSON lines {"path": ..., "caption": ...} (the files tools/extract_codes.py --captions reads);
every non-empty caption is used, in file and line order. Deterministic: the same captions and options write the
same file, byte for byte (see dpar_scale/text/training.py). Ids: pad 0, eos 1, unk 2, no bos; every caption is
encoded with eos appended, and the empty caption is [eos]. Unknown characters become unk, or UTF-8 byte pieces
with --byte-fallback (which needs 256 ids of the vocabulary).

Prints the vocabulary size (model.text.vocab_size must be at least that), the sha256, and the caption lengths in
tokens (eos included), so model.text.max_length can be chosen: the share of captions it would truncate.
"""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dpar_scale.cli import UsageError, entry_point, existing_file, parser, positive_int  # noqa: E402

LENGTHS = (16, 32, 64, 128)


def report(tok, captions: list[str]) -> None:
    import numpy as np

    ids = tok.encode_batch(captions)
    lengths = np.array([len(x) for x in ids])
    print(f"text tokenizer {tok.source}: vocab_size {tok.vocab_size} (eos {tok.eos_id}, pad {tok.pad_id}, unk "
          f"{tok.unk_id}, byte fallback {'on' if tok.byte_fallback else 'off'}), sha256 {tok.sha256}")
    print(f"  {len(captions)} captions: tokens per caption (eos included) mean {lengths.mean():.1f}, median "
          f"{int(np.median(lengths))}, p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())}; "
          f"unk tokens {tok.count_unknown(ids)}")
    print("  truncated at model.text.max_length = " +
          ", ".join(f"{n}: {100 * float((lengths > n).mean()):.2f}%" for n in LENGTHS))


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--captions", nargs="+", required=True, type=existing_file, help="caption files (JSON lines)")
    p.add_argument("--out", help="where to write the trained model (e.g. text.model)")
    p.add_argument("--vocab-size", type=positive_int, help="pieces in the model (exactly)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters as UTF-8 byte pieces, not unk")
    p.add_argument("--num-threads", type=positive_int, default=1,
                   help="sentencepiece trainer threads (part of what determines the model: keep it fixed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=existing_file, help="an existing sentencepiece model to report on instead")
    args = p.parse_args(argv)
    if args.model and (args.out or args.vocab_size):
        raise UsageError("--model reports on an existing model; --out / --vocab-size train a new one: give one or "
                         "the other")
    if not args.model and not (args.out and args.vocab_size):
        raise UsageError("give --out and --vocab-size to train a model (or --model PATH to report on one)")

    from dpar_scale.data.captions import read_caption_texts
    from dpar_scale.text import TextTokenizer, TextTokenizerError, train_text_tokenizer

    captions = read_caption_texts(args.captions)
    if not captions:
        raise TextTokenizerError(f"no non-empty captions in {', '.join(args.captions)}")
    if args.model:
        report(TextTokenizer.load(args.model), captions)
        return 0
    tok = train_text_tokenizer(captions, args.vocab_size, args.model_type, args.byte_fallback, args.num_threads,
                               args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    report(TextTokenizer.load(args.out), captions)
    print(f"wrote {args.out} ({args.model_type}, {args.num_threads} thread(s), seed {args.seed}); use it with "
          f"model.conditioning=text model.text.tokenizer={args.out} model.text.vocab_size={tok.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
