#!/usr/bin/env python
"""What text batches cost at load time: captions are stored as text and tokenized per batch (the price of one
extraction serving any text tokenizer), measured against reading the same batch's codes.

    python tools/bench_captions.py [--rows 20000] [--batch 64 256] [--vocab 128] [--repeats 20] \
        [--json results/bench_captions.json]

Writes `--rows` code rows (16x16 uint16 codes) in the real shard format with caption shards beside them (three
captions per image, the embedded dataset's wording), trains a unigram text tokenizer on the captions, then times
`BatchSource.make` on random batches without text (codes and labels) and with text (caption choice, reading the
caption bytes, sentencepiece encoding, the ragged tensors). Median of `--repeats` batches, one process, files in
the page cache.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import entry_point, parser, positive_int  # noqa: E402


def write_data(folder: Path, rows: int, captions: list[list[str]]) -> None:
    import numpy as np

    from dpar_scale.data import shards as S
    from dpar_scale.data.caption_shards import write_caption_manifest, write_caption_shard
    from dpar_scale.data.captions import MatchedCaptions

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    records, shard_rows = [], 1024
    for k, lo in enumerate(range(0, rows, shard_rows)):
        count = min(shard_rows, rows - lo)
        source = np.stack([np.arange(lo, lo + count), np.zeros(count, np.int64)], axis=1)
        records.append(S.write_code_shard(str(folder), k, rng.integers(0, 16384, (count, 256), dtype=np.uint16),
                                          rng.integers(0, 10, count), source))
    S.write_manifest(str(folder), {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": rows, "num_source_images": rows,
        "grid": [16, 16], "vocab_size": 16384, "tokenizer": {"name": "synthetic", "path": "", "sha256": ""},
        "image_size": 256, "augmentation": {"ten_crop": False, "flip": False, "copies_per_image": 1},
        "num_classes": 10, "classes": [str(i) for i in range(10)], "shards": records, "skipped": []})
    by_image = {i: captions[i % len(captions)] for i in range(rows)}
    for k, lo in enumerate(range(0, rows, shard_rows)):
        write_caption_shard(str(folder / "captions"), k, np.arange(lo, min(rows, lo + shard_rows)), by_image)
    write_caption_manifest(str(folder / "captions"), S.CodeShards(str(folder)),
                           MatchedCaptions(by_image=by_image, num_lines=3 * rows), {}, [str(i) for i in range(rows)])


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--rows", type=positive_int, default=20000)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[64, 256])
    p.add_argument("--vocab", type=positive_int, default=128)
    p.add_argument("--max-length", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import numpy as np

    from dpar_scale.data.loader import BatchSource, CodeData, TextSource
    from dpar_scale.data.synthetic import generate_dataset
    from dpar_scale.text import train_text_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(os.path.join(tmp, "images"), 40, 12, 32, progress=False)
        per_image: dict[str, list[str]] = {}
        for line in open(os.path.join(tmp, "images", "captions.jsonl")):
            item = json.loads(line)
            per_image.setdefault(item["path"], []).append(item["caption"])
        captions = list(per_image.values())
        tok = train_text_tokenizer([c for cs in captions for c in cs], args.vocab)
        write_data(Path(tmp) / "codes", args.rows, captions)
        data = CodeData.open(str(Path(tmp) / "codes"), need_captions=True)
        plain = BatchSource(data)
        text = BatchSource(data, text=TextSource(tok, args.max_length, seed=0))
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batch:
            times = {"codes": [], "codes+text": []}
            pieces = 0
            for r in range(args.repeats + 2):
                ids = rng.integers(0, args.rows, batch)
                t0 = time.perf_counter()
                plain.make(ids)
                t1 = time.perf_counter()
                b = text.make(ids, epochs=r)
                t2 = time.perf_counter()
                if r >= 2:  # the first two warm the memory maps
                    times["codes"].append(t1 - t0)
                    times["codes+text"].append(t2 - t1)
                    pieces += int(b.text_lengths.sum())
            codes_ms = 1e3 * statistics.median(times["codes"])
            text_ms = 1e3 * statistics.median(times["codes+text"])
            rows.append({"batch": batch, "codes_ms": codes_ms, "codes_and_text_ms": text_ms,
                         "text_ms": text_ms - codes_ms, "text_us_per_caption": 1e3 * (text_ms - codes_ms) / batch,
                         "tokens_per_caption": pieces / (args.repeats * batch)})
    print(f"{'batch':>6} {'codes ms':>9} {'codes+text ms':>14} {'text ms':>8} {'text us/caption':>16} {'tokens':>7}")
    for r in rows:
        print(f"{r['batch']:>6} {r['codes_ms']:>9.2f} {r['codes_and_text_ms']:>14.2f} {r['text_ms']:>8.2f} "
              f"{r['text_us_per_caption']:>16.1f} {r['tokens_per_caption']:>7.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "vocab": args.vocab, "max_length": args.max_length, "results": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
