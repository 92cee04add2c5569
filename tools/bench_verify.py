#!/usr/bin/env python
"""What checking data at open costs: sha256 of every shard + value ranges (dpar_scale.data.checks), measured on
synthetic code shards in the real format, and extrapolated to ImageNet-sized data by the measured throughput.

    python tools/bench_verify.py [--rows 6000 200000] [--shard-rows 2048] [--grid 16] [--vocab 16384] \
        [--repeats 3] [--json results/bench_verify.json]

For each size it writes codes (uint16 [rows, H*W]), labels, source indices and float16 entropies, then times
`CodeData.open(..., need_entropy=True)` three ways: data.verify=full with an empty cache (every file hashed and
its values checked), the same again (the per-user cache vouches for every unchanged file), and data.verify=size
with an empty cache (values only). The files were just written, so they are read from the page cache: a first
read from disk or a network file system adds its read time (bytes / storage bandwidth) on top. Throughputs are
MB/s of shard bytes in one process; with a process group the files are split over the ranks.
ImageNet estimate: 1,281,167 images x 10 views = 12.8M rows of 256 codes (uint16) + the same count of float16
entropies + labels (int64) + source (2 x int64): ~13.6 GB, at the largest measured size's throughput.
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

IMAGENET_ROWS = 1_281_167 * 10
IMAGENET_FILES = 4 * -(-1_281_167 // 1024)  # codes, labels, source, entropy per shard of 1024 images (the default)


def write_data(folder: Path, rows: int, shard_rows: int, grid: int, vocab: int) -> int:
    """Codes + labels + source + entropies in the real shard format; returns the bytes written."""
    import numpy as np

    from dpar_scale.data import shards as S
    from dpar_scale.data import side_arrays as SA

    rng = np.random.default_rng(0)
    n = grid * grid
    folder.mkdir(parents=True)
    records = []
    for k, lo in enumerate(range(0, rows, shard_rows)):
        count = min(shard_rows, rows - lo)
        codes = rng.integers(0, vocab, size=(count, n), dtype=np.uint16)
        labels = rng.integers(0, 1000, size=count)
        source = np.stack([np.arange(lo, lo + count), np.zeros(count, np.int64)], axis=1)
        records.append(S.write_code_shard(str(folder), k, codes, labels, source))
    S.write_manifest(str(folder), {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": rows, "num_source_images": rows,
        "grid": [grid, grid], "vocab_size": vocab, "tokenizer": {"name": "synthetic", "path": "", "sha256": ""},
        "image_size": grid * 16, "augmentation": {"ten_crop": False, "flip": False, "copies_per_image": 1},
        "num_classes": 1000, "classes": [str(i) for i in range(1000)], "shards": records, "skipped": []})
    shards = S.CodeShards(str(folder))
    for k in range(len(records)):
        lo, hi = shards.shard_range(k)
        entropy = (rng.random((hi - lo, n), dtype=np.float32) * np.log(vocab)).astype(np.float16)
        SA.write_side_shard(str(folder / "entropy"), k, entropy)
    SA.write_side_manifest(str(folder / "entropy"), shards, extra={"grid": [grid, grid], "vocab_size": vocab})
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


def backdate(folder: Path) -> None:
    """Older than integrity.RACY_SECONDS, as data is by the time it is trained on (otherwise it is not cached)."""
    stamp = time.time() - 60
    for p in folder.rglob("*.npy"):
        os.utime(p, (stamp, stamp))


def measure(folder: Path, cache_root: Path, repeats: int) -> dict:
    from dpar_scale.data.loader import CodeData

    def opened(verify: str, cache: Path) -> float:
        os.environ["DPAR_CACHE_DIR"] = str(cache)
        start = time.perf_counter()
        CodeData.open(str(folder), need_entropy=True, verify=verify)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"full": [], "cached": [], "size": []}
    for r in range(repeats):
        times["full"].append(opened("full", cache_root / f"full-{r}"))
        times["cached"].append(opened("full", cache_root / f"full-{r}"))
        times["size"].append(opened("size", cache_root / f"size-{r}"))
    return {k: statistics.median(v) for k, v in times.items()} | {"all": times}


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--rows", type=positive_int, nargs="+", default=[6000, 200_000])
    p.add_argument("--shard-rows", type=positive_int, default=2048, help="rows per shard")
    p.add_argument("--grid", type=positive_int, default=16)
    p.add_argument("--vocab", type=positive_int, default=16384)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        for rows in args.rows:
            folder = Path(tmp) / f"codes-{rows}"
            nbytes = write_data(folder, rows, args.shard_rows, args.grid, args.vocab)
            backdate(folder)
            m = measure(folder, Path(tmp) / f"cache-{rows}", args.repeats)
            results.append({"rows": rows, "bytes": nbytes, "files": len(list(folder.rglob("*.npy"))),
                            "seconds": {k: m[k] for k in ("full", "cached", "size")}, "all_seconds": m["all"],
                            "mb_per_s": {k: nbytes / 1e6 / m[k] for k in ("full", "size")}})
    big = results[-1]
    imagenet_bytes = IMAGENET_ROWS * (256 * 2 + 256 * 2 + 8 + 16)
    estimate = {k: imagenet_bytes / 1e6 / big["mb_per_s"][k] for k in ("full", "size")}
    estimate["cached"] = big["seconds"]["cached"] / big["files"] * IMAGENET_FILES  # a stat + header read per file
    print(f"bench_verify: CodeData.open(need_entropy=True) on {args.grid}x{args.grid} codes, vocab {args.vocab}, "
          f"{args.shard_rows} rows per shard, one process, files in the page cache; median of {args.repeats}")
    print(f"{'rows':>9} {'MB':>9} {'full s':>8} {'cached s':>9} {'size s':>8} {'full MB/s':>10} {'size MB/s':>10}")
    for r in results:
        s = r["seconds"]
        print(f"{r['rows']:>9} {r['bytes'] / 1e6:>9.1f} {s['full']:>8.3f} {s['cached']:>9.4f} {s['size']:>8.3f} "
              f"{r['mb_per_s']['full']:>10.0f} {r['mb_per_s']['size']:>10.0f}")
    print(f"ImageNet (12.8M rows, {imagenet_bytes / 1e9:.1f} GB incl. entropies, {IMAGENET_FILES} files) at the "
          f"{big['rows']}-row throughput, one process: verify=full {estimate['full']:.0f} s, verify=size "
          f"{estimate['size']:.0f} s (both / the ranks sharing the work, + the storage read time of a first read); "
          f"cached {estimate['cached']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results,
            "imagenet": {"rows": IMAGENET_ROWS, "bytes": imagenet_bytes, "files": IMAGENET_FILES,
                         "seconds_one_process": estimate},
            "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
