#!/usr/bin/env python
"""Generation speed with and without KV caches, for a tiny random-init GPT and DPAR (+ its entropy model).

    python tools/bench_sample.py [--grid 16 16] [--dim 256] [--n-heads 4] [--gpt-layers 12] \
        [--dpar-layers 1,8,3] [--entropy-layers 4] [--vocab 1024] [--batch 4] [--cfg-scale 2.0] \
        [--target-mean-length 1.81] [--max-patch-length 4] [--device cpu] [--threads 1] [--json PATH]

Per model and path it prints seconds per image, the cached/uncached speed-up, the (row, position) pairs each
stack processed per image (rows count both CFG halves), and whether both paths drew the same codes from the
same seed. θ is calibrated on samples of the entropy model so that DPAR's patches are a realistic mix (the
achieved mean patch length of the DPAR samples is reported).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.config import PatchConfig  # noqa: E402
from dpar_scale.patching.entropy import code_entropies  # noqa: E402
from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt  # noqa: E402
from dpar_scale.sampling.streams import sample_uniforms  # noqa: E402
from dpar_scale.models import DPAR, GPT  # noqa: E402
from dpar_scale.patching.rule import calibrate_threshold  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=2, default=(16, 16))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--gpt-layers", type=int, default=12)
    p.add_argument("--dpar-layers", default="1,8,3", help="encoder,global,decoder (total = --gpt-layers)")
    p.add_argument("--entropy-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="images per generation call")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--target-mean-length", type=float, default=1.81)
    p.add_argument("--max-patch-length", type=int, default=4)
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's default); 1 by default: one code per step is too little "
                        "work to split, and on a 2-vCPU VM OpenMP barriers made 2 threads 2-7x slower than 1")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


def randomize(model, seed: int, gain: float = 1.0):
    """Weights N(0, gain²/fan_in), norms 1: every path contributes, predictions are neither flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # start vectors
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    enc, glob, dec = (int(x) for x in args.dpar_layers.split(","))
    common = dict(dim=args.dim, n_heads=args.n_heads, vocab_size=args.vocab, grid=tuple(args.grid),
                  dropout=0.0, class_dropout=0.0)
    device = args.device
    gpt = randomize(GPT(n_layers=args.gpt_layers, num_classes=args.classes, **common), 1).to(device)
    entropy = randomize(GPT(n_layers=args.entropy_layers, num_classes=0, **common), 2, gain=2.0).to(device)
    dpar = randomize(DPAR(n_encoder_layers=enc, n_global_layers=glob, n_decoder_layers=dec,
                          num_classes=args.classes, **common), 3).to(device)
    n = args.grid[0] * args.grid[1]
    labels = torch.arange(args.batch) % args.classes

    # θ from the entropy model's own samples, so that DPAR's boundaries are a realistic mix.
    calib_codes = generate_gpt(entropy, torch.zeros(16, dtype=torch.long),
                               uniforms=sample_uniforms(args.seed + 1, range(16), n))
    calib = calibrate_threshold(code_entropies(entropy, calib_codes).cpu(), width=args.grid[1],
                                target_mean_length=args.target_mean_length, max_patch_length=args.max_patch_length)
    patch_cfg = PatchConfig(threshold=calib.threshold, max_patch_length=args.max_patch_length)

    def run(kind: str, use_cache: bool):
        stats = GenerationStats()
        uniforms = sample_uniforms(args.seed, range(args.batch), n)
        if kind == "gpt":
            fn = lambda: (generate_gpt(gpt, labels, cfg_scale=args.cfg_scale, uniforms=uniforms,  # noqa: E731
                                       use_cache=use_cache, stats=stats), None)
        else:
            fn = lambda: generate_dpar(dpar, entropy, labels, patch_cfg=patch_cfg,  # noqa: E731
                                       cfg_scale=args.cfg_scale, uniforms=uniforms, use_cache=use_cache,
                                       stats=stats)
        (codes, lengths), seconds = timed(fn, device)
        return codes, lengths, seconds, stats

    # Warm-up (allocator, kernels) on a short cached run.
    run("gpt", True)
    results = []
    for kind in ("gpt", "dpar"):
        cached = run(kind, True)
        rows = [("cached", cached)]
        if not args.skip_uncached:
            rows.append(("uncached", run(kind, False)))
        for path, (codes, lengths, seconds, stats) in rows:
            entry = {"model": kind, "path": path, "seconds_per_image": seconds / args.batch,
                     "speedup_vs_uncached": None, "same_codes_as_cached": bool(torch.equal(codes, cached[0])),
                     "positions_per_image": {k: v / args.batch for k, v in stats.as_dict().items()
                                             if k.endswith("positions") and v}}
            if lengths is not None:
                entry["mean_patch_length"] = n * len(lengths) / sum(len(x) for x in lengths)
            results.append(entry)
        if not args.skip_uncached:
            results[-2]["speedup_vs_uncached"] = results[-1]["seconds_per_image"] / results[-2]["seconds_per_image"]

    setup = {"grid": list(args.grid), "dim": args.dim, "n_heads": args.n_heads, "gpt_layers": args.gpt_layers,
             "dpar_layers": [enc, glob, dec], "entropy_layers": args.entropy_layers, "vocab": args.vocab,
             "batch": args.batch, "cfg_scale": args.cfg_scale, "threshold": calib.threshold,
             "max_patch_length": args.max_patch_length, "device": device, "threads": torch.get_num_threads(),
             "torch": torch.__version__}
    print(f"grid {args.grid[0]}x{args.grid[1]}, dim {args.dim}, GPT {args.gpt_layers} layers, DPAR {enc}+{glob}+"
          f"{dec}, entropy {args.entropy_layers}, vocab {args.vocab}, batch {args.batch}, cfg {args.cfg_scale:g} "
          f"({'2x' if args.cfg_scale != 1 else '1x'} rows), θ={calib.threshold:.4f}, {device}, "
          f"{torch.get_num_threads()} threads")
    head = f"{'model':<5} {'path':<9} {'s/image':>9} {'speed-up':>9} {'same':>5} {'patch len':>9}  positions/image"
    print(head)
    print("-" * len(head))
    for r in results:
        speed = f"{r['speedup_vs_uncached']:.1f}x" if r["speedup_vs_uncached"] else ""
        plen = f"{r['mean_patch_length']:.2f}" if "mean_patch_length" in r else ""
        pos = ", ".join(f"{k.replace('_positions', '')} {v:g}" for k, v in r["positions_per_image"].items())
        print(f"{r['model']:<5} {r['path']:<9} {r['seconds_per_image']:>9.4f} {speed:>9} "
              f"{'yes' if r['same_codes_as_cached'] else 'NO':>5} {plen:>9}  {pos}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
