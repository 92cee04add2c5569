#!/usr/bin/env python
"""Training step time of DPAR vs the token-level baseline of equal total depth, on the same batches.

  python tools/bench_train.py [--dpar dpar-tiny --gpt gpt-tiny | --demo] [--dim 128] [--batch 32] [--grid 16]
      [--mean-patch-length 1.81 | --codes DIR --threshold θ] [--steps 10] [--json out.json]

Both models see the same codes and labels; DPAR's patch layout comes from the given entropies (a codes folder
with an entropy/ side array) or from synthetic entropies calibrated to the given mean patch length. Steps of the
two models are interleaved so that drift in machine load hits both alike. Reports the median step time
(forward + backward + AdamW step), images/s, and beside it the analytic training-FLOP ratio
(dpar_scale.flops.analytic), so the measured speed-up can be read against the FLOP saving, and the attention pair
ratio: query-key pairs the packed global attention's kernels computed (SDPA calls counted, padding included)
over Σ L_i² of its documents. The load average is recorded: on a shared machine only ratios measured in one run
mean something. `--demo` takes both models' shapes, the grid and the batch from configs/demo/{gpt,dpar}.yaml
(what `make demo` trains) instead of presets.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpar_scale.cli import (  # noqa: E402
    entry_point, existing_dir, non_negative_int, parser, positive_float, positive_int, write_json_report,
)


def batch_layouts(args, n_codes: int, width: int):
    """(codes, labels, patch lengths) for `args.batch` images."""
    import numpy as np
    import torch

    from dpar_scale.config import PatchConfig
    from dpar_scale.patching.rule import patch_rule, starts_to_lengths, synthetic_patch_lengths

    g = torch.Generator().manual_seed(args.seed)
    if args.codes:
        from dpar_scale.data.loader import CodeData

        data = CodeData.open(args.codes, need_entropy=True)
        ids = np.arange(min(args.batch, len(data.train_ids)))
        codes, labels, entropy = data.gather(ids)
        threshold = args.threshold
    else:
        codes = torch.randint(0, args.vocab, (args.batch, n_codes), generator=g)
        labels = torch.randint(0, args.classes, (args.batch,), generator=g)
        return codes, labels, synthetic_patch_lengths(args.batch, width, mean_length=args.mean_patch_length,
                                                      max_patch_length=args.max_patch_length, vocab=args.vocab,
                                                      seed=args.seed)
    rule = PatchConfig(threshold=threshold, max_patch_length=args.max_patch_length)
    return codes, labels, starts_to_lengths(patch_rule(rule, width)(entropy))


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--dpar", default="dpar-tiny")
    p.add_argument("--gpt", default="gpt-tiny")
    p.add_argument("--dim", type=non_negative_int, default=0, help="override both presets' width")
    p.add_argument("--heads", type=non_negative_int, default=0)
    p.add_argument("--demo", action="store_true", help="the models, grid and batch of configs/demo/{gpt,dpar}.yaml")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step (default 32; --demo: its own)")
    p.add_argument("--grid", type=positive_int, default=None, help="codes per side (default 16; --demo: its own)")
    p.add_argument("--vocab", type=positive_int, default=512)
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--mean-patch-length", type=positive_float, default=1.81)
    p.add_argument("--max-patch-length", type=positive_int, default=4)
    p.add_argument("--codes", type=existing_dir, default=None,
                   help="take codes, labels and entropies from an extracted folder")
    p.add_argument("--threshold", type=float, default=7.8, help="θ with --codes")
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    import torch

    from dpar_scale.config import load_config
    from dpar_scale.flops.analytic import train_flops
    from dpar_scale.flops.counting import sdpa_pair_counter
    from dpar_scale.models import build_model, resolve_model_config
    from dpar_scale.patching.layout import PatchLayout
    from dpar_scale.train.loss import code_loss

    demo_configs = {name: Path(__file__).resolve().parent.parent / f"configs/demo/{name}.yaml" for name in ("gpt", "dpar")}
    if args.demo:
        demo = load_config(demo_configs["gpt"])
        args.batch, args.grid = args.batch or demo.data.batch_size, args.grid or demo.model.grid[0]
    args.batch, args.grid = args.batch or 32, args.grid or 16
    n_codes, width = args.grid * args.grid, args.grid
    shape = [f"model.vocab_size={args.vocab}", f"model.num_classes={args.classes}",
             f"model.grid=[{args.grid},{args.grid}]", "model.dropout=0.0"]
    if args.dim:
        shape.append(f"model.dim={args.dim}")
    if args.heads:
        shape.append(f"model.n_heads={args.heads}")
    codes, labels, lengths = batch_layouts(args, n_codes, width)
    if args.codes:
        args.vocab, args.grid = int(codes.max()) + 1, width
    layout = PatchLayout.from_lengths(lengths, grid=(args.grid, args.grid))
    runs = {}
    for name, preset in (("gpt", args.gpt), ("dpar", args.dpar)):
        source = (demo_configs[name], shape) if args.demo else (None, [f"model.preset={preset}", *shape])
        cfg = resolve_model_config(load_config(*source).model)
        torch.manual_seed(args.seed)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = {"codes": codes, "labels": labels, "layout": layout if cfg.kind == "dpar" else None}
        runs[name] = {"cfg": cfg, "model": model, "opt": opt, "inputs": inputs, "times": []}

    def step(run) -> float:
        t0 = time.perf_counter()
        loss = code_loss(run["model"](**run["inputs"]), codes)
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    # What the packed global attention computes (the kernels' query-key pairs, padding included) against what
    # its documents need (Σ L_i²): one forward, SDPA calls inside the global layers counted.
    dpar = runs["dpar"]
    with torch.no_grad(), sdpa_pair_counter(list(dpar["model"].global_layers)) as counted:
        dpar["model"](**dpar["inputs"])
    needed = sum(x * x for x in layout.doc_lengths) * len(dpar["model"].global_layers)
    attention_pair_ratio = counted["pairs"] / needed

    for i in range(args.warmup + args.steps):
        for run in runs.values():
            seconds = step(run)
            if i >= args.warmup:
                run["times"].append(seconds)

    num_patches = sum(len(x) for x in lengths)
    result = {"batch": len(codes), "grid": [args.grid, args.grid], "mean_patch_length": n_codes * len(codes) / num_patches,
              "threads": torch.get_num_threads(), "models": {}}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        cfg = run["cfg"]
        flops = train_flops(cfg, batch_images=len(codes), patch_lengths=lengths if cfg.kind == "dpar" else None)
        result["models"][name] = {
            "preset": cfg.preset, "dim": cfg.dim, "params": sum(p.numel() for p in run["model"].parameters()),
            "step_time_s": median, "images_per_s": len(codes) / median, "train_flops_per_step": flops,
            "global_positions_per_image": (num_patches + len(codes)) / len(codes) if cfg.kind == "dpar" else n_codes,
        }
    g, d = result["models"]["gpt"], result["models"]["dpar"]
    result["step_time_ratio"] = d["step_time_s"] / g["step_time_s"]
    result["flop_ratio"] = d["train_flops_per_step"] / g["train_flops_per_step"]
    result["attention_pair_ratio"] = attention_pair_ratio
    result["load_average"] = list(os.getloadavg())

    print(f"batch {result['batch']} images, grid {args.grid}x{args.grid}, mean patch length "
          f"{result['mean_patch_length']:.3f}, {result['threads']} threads, median of {args.steps} steps")
    print(f"{'model':<6} {'preset':<10} {'params':>10} {'global pos/img':>15} {'step s':>8} {'img/s':>8} "
          f"{'train GFLOP':>12}")
    for name, r in result["models"].items():
        print(f"{name:<6} {r['preset']:<10} {r['params']:>10,} {r['global_positions_per_image']:>15.1f} "
              f"{r['step_time_s']:>8.3f} {r['images_per_s']:>8.1f} {r['train_flops_per_step'] / 1e9:>12.2f}")
    print(f"DPAR / GPT: step time {result['step_time_ratio']:.3f}, training FLOPs {result['flop_ratio']:.3f} "
          f"(step time / FLOP ratio {result['step_time_ratio'] / result['flop_ratio']:.3f}); global attention "
          f"computed / needed pairs {attention_pair_ratio:.3f}; load average "
          + " ".join(f"{x:.2f}" for x in result["load_average"]))
    write_json_report(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
