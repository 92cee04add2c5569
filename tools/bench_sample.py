#!/usr/bin/env python
"""Generation speed of random-init GPT and DPAR (+ its entropy model): with and without KV caches, and cached
DPAR vs cached GPT at the depth proportions of the paper's sizes.

    python tools/bench_sample.py [--grid 16 16] [--dim 256] [--n-heads 4] [--gpt-layers 12] \
        [--dpar-layers 1,8,3] [--entropy-layers 4] [--vocab 1024] [--batch 4] [--cfg-scale 2.0] \
        [--target-mean-length 1.81] [--max-patch-length 4] [--device cpu] [--threads 1] [--json PATH]
    python tools/bench_sample.py --proportions b,xl [--width-scale 0.25] [--vocab 16384] [--json PATH]

Without --proportions: per model and path, seconds per image, the cached/uncached speed-up, the (row, position)
pairs each stack processed per image (rows count both CFG halves), and whether both paths drew the same codes
from the same random streams.

With --proportions: for each size (b, l, xl, xxl), cached GPT (gpt-SIZE depth) vs cached DPAR (dpar-SIZE depths)
+ its entropy model (gpt-b's depth and width, as in the paper), every width = the preset's x --width-scale
(head dim 64), images/s of each and DPAR's speed relative to GPT, measured in one run. Expectation from FLOPs: the
global stack sees ~1/1.8 of the positions, so DPAR gains where the global stack dominates (XL), while its
entropy model, encoder and decoder run per code.

θ is calibrated on samples of the entropy model so that DPAR's patches are a realistic mix (the achieved mean
patch length of the DPAR samples is reported).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.cli import (  # noqa: E402
    UsageError, entry_point, non_negative_int, parser, positive_float, positive_int, write_json_report,
)
from dpar_scale.config import ModelConfig, PatchConfig  # noqa: E402
from dpar_scale.flops.analytic import forward_flops  # noqa: E402
from dpar_scale.patching.entropy import code_entropies  # noqa: E402
from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt  # noqa: E402
from dpar_scale.sampling.streams import sample_uniforms  # noqa: E402
from dpar_scale.models import DPAR, GPT, PRESETS  # noqa: E402
from dpar_scale.patching.rule import calibrate_threshold  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--grid", type=positive_int, nargs=2, default=(16, 16))
    p.add_argument("--dim", type=positive_int, default=256)
    p.add_argument("--n-heads", type=positive_int, default=4)
    p.add_argument("--gpt-layers", type=positive_int, default=12)
    p.add_argument("--dpar-layers", default="1,8,3", help="encoder,global,decoder (total = --gpt-layers)")
    p.add_argument("--entropy-layers", type=positive_int, default=4)
    p.add_argument("--proportions", default="", help="e.g. b,xl: cached GPT vs DPAR at these sizes' depths")
    p.add_argument("--width-scale", type=positive_float, default=0.25, help="--proportions: widths = preset's x this")
    p.add_argument("--vocab", type=positive_int, default=1024)
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--batch", type=positive_int, default=4, help="images per generation call")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--target-mean-length", type=positive_float, default=1.81)
    p.add_argument("--max-patch-length", type=positive_int, default=4)
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=non_negative_int, default=1,
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
    """(fn(), wall seconds, this process's CPU seconds). On a CPU shared with other jobs the CPU time of a
    1-thread run is the steadier measure (wall time also counts the time others held the cores)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, time.process_time() - cpu


def build(args, *, dim, n_heads, gpt_layers, dpar_layers, entropy_dim, entropy_heads, entropy_layers):
    """Random-init GPT, entropy model and DPAR of these shapes, and the θ that gives DPAR a realistic patch mix."""
    common = dict(vocab_size=args.vocab, grid=tuple(args.grid), dropout=0.0, class_dropout=0.0)
    enc, glob, dec = dpar_layers
    device = args.device
    gpt = randomize(GPT(dim=dim, n_heads=n_heads, n_layers=gpt_layers, num_classes=args.classes, **common),
                    1).to(device)
    entropy = randomize(GPT(dim=entropy_dim, n_heads=entropy_heads, n_layers=entropy_layers, num_classes=0,
                            **common), 2, gain=2.0).to(device)
    dpar = randomize(DPAR(dim=dim, n_heads=n_heads, n_encoder_layers=enc, n_global_layers=glob,
                          n_decoder_layers=dec, num_classes=args.classes, **common), 3).to(device)
    n = args.grid[0] * args.grid[1]
    # θ from the entropy model's own samples, so that DPAR's boundaries are a realistic mix.
    calib_codes = generate_gpt(entropy, torch.zeros(16, dtype=torch.long),
                               uniforms=sample_uniforms(args.seed + 1, range(16), n))
    patch_cfg = PatchConfig(max_patch_length=args.max_patch_length)
    calib = calibrate_threshold(code_entropies(entropy, calib_codes).cpu(), patch_cfg, width=args.grid[1],
                                target_mean_length=args.target_mean_length)
    patch_cfg.threshold = calib.threshold
    return {"gpt": gpt, "entropy": entropy, "dpar": dpar, "patch_cfg": patch_cfg}


def generate(args, models, kind: str, use_cache: bool, cpu_seconds: bool = False):
    """(codes, patch lengths or None, seconds, stats) of one generation call of args.batch images; with
    cpu_seconds=True also the CPU seconds."""
    n = args.grid[0] * args.grid[1]
    labels = torch.arange(args.batch) % args.classes
    stats = GenerationStats()
    uniforms = sample_uniforms(args.seed, range(args.batch), n)
    if kind == "gpt":
        fn = lambda: (generate_gpt(models["gpt"], labels, cfg_scale=args.cfg_scale, uniforms=uniforms,  # noqa: E731
                                   use_cache=use_cache, stats=stats), None)
    else:
        fn = lambda: generate_dpar(models["dpar"], models["entropy"], labels,  # noqa: E731
                                   patch_cfg=models["patch_cfg"], cfg_scale=args.cfg_scale, uniforms=uniforms,
                                   use_cache=use_cache, stats=stats)
    (codes, lengths), seconds, cpu = timed(fn, args.device)
    return (codes, lengths, seconds, stats) + ((cpu,) if cpu_seconds else ())


def mean_patch_length(lengths, n: int) -> float:
    return n * len(lengths) / sum(len(x) for x in lengths)


def per_image_positions(stats: GenerationStats, batch: int) -> dict:
    return {k: v / batch for k, v in stats.as_dict().items() if k.endswith("positions") and v}


def cache_comparison(args) -> int:
    enc, glob, dec = (int(x) for x in args.dpar_layers.split(","))
    models = build(args, dim=args.dim, n_heads=args.n_heads, gpt_layers=args.gpt_layers, dpar_layers=(enc, glob, dec),
                   entropy_dim=args.dim, entropy_heads=args.n_heads, entropy_layers=args.entropy_layers)
    n = args.grid[0] * args.grid[1]
    generate(args, models, "gpt", True)  # warm-up (allocator, kernels)
    results = []
    for kind in ("gpt", "dpar"):
        cached = generate(args, models, kind, True)
        rows = [("cached", cached)]
        if not args.skip_uncached:
            rows.append(("uncached", generate(args, models, kind, False)))
        for path, (codes, lengths, seconds, stats) in rows:
            entry = {"model": kind, "path": path, "seconds_per_image": seconds / args.batch,
                     "speedup_vs_uncached": None, "same_codes_as_cached": bool(torch.equal(codes, cached[0])),
                     "positions_per_image": per_image_positions(stats, args.batch)}
            if lengths is not None:
                entry["mean_patch_length"] = mean_patch_length(lengths, n)
            results.append(entry)
        if not args.skip_uncached:
            results[-2]["speedup_vs_uncached"] = results[-1]["seconds_per_image"] / results[-2]["seconds_per_image"]

    threshold = models["patch_cfg"].threshold
    setup = {"grid": list(args.grid), "dim": args.dim, "n_heads": args.n_heads, "gpt_layers": args.gpt_layers,
             "dpar_layers": [enc, glob, dec], "entropy_layers": args.entropy_layers, "vocab": args.vocab,
             "batch": args.batch, "cfg_scale": args.cfg_scale, "threshold": threshold,
             "max_patch_length": args.max_patch_length, "device": args.device, "threads": torch.get_num_threads(),
             "torch": torch.__version__}
    print(f"grid {args.grid[0]}x{args.grid[1]}, dim {args.dim}, GPT {args.gpt_layers} layers, DPAR {enc}+{glob}+"
          f"{dec}, entropy {args.entropy_layers}, vocab {args.vocab}, batch {args.batch}, cfg {args.cfg_scale:g} "
          f"({'2x' if args.cfg_scale != 1 else '1x'} rows), θ={threshold:.4f}, {args.device}, "
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
    write_json_report(args.json, {"setup": setup, "results": results})
    return 0


def _width(preset_dim: int, scale: float) -> int:
    return max(64, 64 * round(preset_dim * scale / 64))  # head dim 64, as in the presets


def depth_comparison(args) -> int:
    n = args.grid[0] * args.grid[1]
    entropy_dim = _width(PRESETS["gpt-b"]["dim"], args.width_scale)
    results = []
    for size in [s.strip() for s in args.proportions.split(",") if s.strip()]:
        if f"dpar-{size}" not in PRESETS:
            raise UsageError(f"--proportions: unknown size {size!r} (b, l, xl, xxl)")
        g, d = PRESETS[f"gpt-{size}"], PRESETS[f"dpar-{size}"]
        dim = _width(g["dim"], args.width_scale)
        dpar_layers = (d["n_encoder_layers"], d["n_global_layers"], d["n_decoder_layers"])
        models = build(args, dim=dim, n_heads=dim // 64, gpt_layers=g["n_layers"], dpar_layers=dpar_layers,
                       entropy_dim=entropy_dim, entropy_heads=entropy_dim // 64,
                       entropy_layers=PRESETS["gpt-b"]["n_layers"])
        generate(args, models, "gpt", True)  # warm-up (allocator, kernels)
        row = {"size": size, "dim": dim, "gpt_layers": g["n_layers"], "dpar_layers": list(dpar_layers),
               "entropy": [PRESETS["gpt-b"]["n_layers"], entropy_dim], "threshold": models["patch_cfg"].threshold}
        for kind in ("gpt", "dpar"):
            _, lengths, seconds, stats, cpu = generate(args, models, kind, True, cpu_seconds=True)
            # On CPU the rate is per CPU second of this (1-thread) process; on a GPU per wall second.
            busy = cpu if args.device == "cpu" else seconds
            row[kind] = {"images_per_second": args.batch / busy, "wall_seconds_per_image": seconds / args.batch,
                         "cpu_seconds_per_image": cpu / args.batch,
                         "positions_per_image": per_image_positions(stats, args.batch)}
            if lengths is not None:
                row[kind]["mean_patch_length"] = mean_patch_length(lengths, n)
                dpar_lengths = lengths
        row["dpar_speed_vs_gpt"] = row["dpar"]["images_per_second"] / row["gpt"]["images_per_second"]
        # Forward FLOPs over the final codes (what the caches compute, once per position), per image: GPT and
        # DPAR for both CFG halves, the entropy model for one.
        halves = 2 if args.cfg_scale != 1.0 else 1
        shape = dict(vocab_size=args.vocab, num_classes=args.classes, grid=tuple(args.grid))
        gpt_flops = halves * forward_flops(ModelConfig(kind="gpt", dim=dim, n_heads=dim // 64,
                                                       n_layers=g["n_layers"], **shape), batch_images=1)
        dpar_cfg = ModelConfig(kind="dpar", dim=dim, n_heads=dim // 64, n_encoder_layers=dpar_layers[0],
                               n_global_layers=dpar_layers[1], n_decoder_layers=dpar_layers[2], **shape)
        dpar_flops = halves * forward_flops(dpar_cfg, batch_images=args.batch, patch_lengths=dpar_lengths) / args.batch
        entropy_flops = forward_flops(ModelConfig(kind="entropy", dim=entropy_dim, n_heads=entropy_dim // 64,
                                                  n_layers=PRESETS["gpt-b"]["n_layers"], **shape), batch_images=1)
        row["forward_flops_per_image"] = {"gpt": gpt_flops, "dpar": dpar_flops, "entropy": entropy_flops}
        row["flop_ratio_gpt_over_dpar_with_entropy"] = gpt_flops / (dpar_flops + entropy_flops)
        results.append(row)
        print(f"  {size}: done", flush=True)

    print(f"cached generation, grid {args.grid[0]}x{args.grid[1]}, vocab {args.vocab}, batch {args.batch}, cfg "
          f"{args.cfg_scale:g}, widths x{args.width_scale:g} (head dim 64), entropy model = gpt-b depth @"
          f"{entropy_dim}, {args.device}, {torch.get_num_threads()} threads, one run"
          + (", images per CPU second of this process" if args.device == "cpu" else ""))
    head = (f"{'size':<4} {'width':>5} {'GPT layers':>10} {'DPAR layers':>11} {'GPT img/s':>9} {'DPAR img/s':>10} "
            f"{'DPAR/GPT':>8} {'GPT/DPAR FLOPs':>14} {'patch len':>9} {'global pos/img (both CFG halves)':>32}")
    print(head)
    print("-" * len(head))
    for r in results:
        dp = r["dpar"]
        print(f"{r['size']:<4} {r['dim']:>5} {r['gpt_layers']:>10} {'+'.join(map(str, r['dpar_layers'])):>11} "
              f"{r['gpt']['images_per_second']:>9.3f} {dp['images_per_second']:>10.3f} "
              f"{r['dpar_speed_vs_gpt']:>7.2f}x {r['flop_ratio_gpt_over_dpar_with_entropy']:>13.2f}x "
              f"{dp['mean_patch_length']:>9.2f} "
              f"{dp['positions_per_image'].get('global_positions', 0):>32g}")
    setup = {"grid": list(args.grid), "vocab": args.vocab, "batch": args.batch, "cfg_scale": args.cfg_scale,
             "width_scale": args.width_scale, "target_mean_length": args.target_mean_length,
             "max_patch_length": args.max_patch_length, "device": args.device, "threads": torch.get_num_threads(),
             "torch": torch.__version__}
    write_json_report(args.json, {"setup": setup, "results": results})
    return 0


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return depth_comparison(args) if args.proportions else cache_comparison(args)


if __name__ == "__main__":
    sys.exit(main())
