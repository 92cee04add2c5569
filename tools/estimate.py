#!/usr/bin/env python
"""What a training run will cost, before it is launched: total training FLOPs, GPU-hours and wall-clock.

    python tools/estimate.py --config configs/paper/dpar-xl-256.yaml --gpus 128 --gpu h100 [--mfu 0.4]
    python tools/estimate.py --config configs/paper/gpt-xl-256.yaml --config configs/paper/dpar-xl-256.yaml \\
        --gpus 128 --gpu h100 --num-images 1281167 [--samples 50000] [--json cost.json] [dotted overrides]

Per config: the model (its preset and shape, parameters counted on the meta device), the number of training
images (the manifest of data.codes_dir, or --num-images when the data is not at hand), the optimizer steps
(train.epochs resolved exactly as the trainer resolves it, else train.steps) x data.batch_size images, and the
training FLOPs per image from the analytic count (dpar_scale/flops/analytic.py: 2 FLOPs per multiply-add,
training = 3 x forward, attention over the real sequences). A DPAR image's FLOPs depend on its patch count; the
layout is, in this order: --mean-patch-length ℓ (an even layout of that mean); the data's own entropies cut with
the config's patch rule (when data.codes_dir has them; --max-images rows read); the paper's mean (1.81 at 256 px,
2.06 at 384 px) when the config's rule is the paper's; mode=static needs none (its layout is fixed). Anything else
is an error that says what to pass.

GPU-hours = FLOPs / (peak x MFU); wall-clock = GPU-hours / --gpus. The peak is the bf16 dense peak of --gpu in
dpar_scale/flops/analytic.py's table (or --peak-tflops). The MFU is an assumption (default 0.4), not a measurement:
the trainer logs the achieved MFU of a real run, which is the number to put here once it is known. With several
configs, each DPAR row is compared with the GPT row of the same size, grid and length (the saving in GPU-hours).
--samples N adds the compute floor of generating N images (KV-cached: each position once, both CFG halves, and the
entropy model (gpt-b's shape) beside DPAR) at the same peak and MFU: generation runs one code per step and is far
from compute-bound, so treat it as a lower bound.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import UsageError, entry_point, fraction, non_negative_int, parser, positive_float  # noqa: E402
from dpar_scale.cli import positive_int  # noqa: E402
from dpar_scale.errors import DparError  # noqa: E402


class EstimateError(DparError):
    """Something the estimate needs is missing; the message says what to pass."""


def num_train_images(cfg, given: int | None) -> tuple[int, str]:
    """(training images, where the number came from)."""
    from dpar_scale.data.loader import DataSummary
    from dpar_scale.data.shards import ShardError

    if given:
        return given, "--num-images"
    try:
        data = DataSummary.read(cfg.data.codes_dir)
    except ShardError as e:
        raise EstimateError(f"{e}; pass --num-images (ImageNet's training set: 1281167)") from None
    return data.num_train_images(cfg.data.val_fraction), f"{cfg.data.codes_dir}/manifest.json"


def is_paper_rule(patch, image_size: int) -> bool:
    from dpar_scale.patching.rule import PAPER_THRESHOLD

    return (patch.mode, patch.alignment, patch.max_patch_length, patch.row_reset) == ("global", "reference", 4, True) \
        and PAPER_THRESHOLD.get(image_size) == patch.threshold


def dpar_layout(cfg, args) -> tuple[list[list[int]], str]:
    """Per image patch lengths to count, and where they came from (see the module docstring for the order)."""
    import numpy as np
    import torch

    from dpar_scale.data.loader import BatchSource, CodeData
    from dpar_scale.patching.layout import lengths_with_mean
    from dpar_scale.patching.rule import PAPER_MEAN_PATCH_LENGTH, patch_lengths

    grid, patch = tuple(cfg.model.grid), cfg.model.patch
    n = grid[0] * grid[1]
    if args.mean_patch_length:
        return lengths_with_mean(grid, args.mean_patch_length, patch.max_patch_length), "--mean-patch-length"
    if patch.mode == "static":
        return patch_lengths(torch.zeros(1, n), width=grid[1], threshold=0.0, max_patch_length=patch.max_patch_length,
                             mode="static", static_length=patch.static_length, row_reset=patch.row_reset), "static"
    try:
        data = CodeData.open(cfg.data.codes_dir, cfg.data.entropy_dir, need_entropy=True)
    except (DparError, FileNotFoundError, ValueError):  # no codes or no entropies here: the next source
        data = None
    if data is not None:
        ids = np.unique(np.linspace(0, len(data.train_ids) - 1, num=min(args.max_images, len(data.train_ids)))
                        .astype(np.int64))
        return BatchSource(data, patch).patch_lengths(data.train_ids[ids]), f"entropies of {len(ids)} rows"
    image_size = 16 * grid[0]
    if is_paper_rule(patch, image_size) and image_size in PAPER_MEAN_PATCH_LENGTH:
        mean = PAPER_MEAN_PATCH_LENGTH[image_size]
        return lengths_with_mean(grid, mean, patch.max_patch_length), f"paper's mean at {image_size} px"
    raise EstimateError(f"the mean patch length of this patch rule ({patch}) is not known without entropies: put "
                        f"them beside {cfg.data.codes_dir} (tools/compute_entropy.py) or pass --mean-patch-length")


def forward_per_image(model_cfg, lengths: list[list[int]] | None) -> float:
    """Analytic forward FLOPs per image (over the given layouts for DPAR)."""
    from dpar_scale.flops.analytic import analytic_breakdown

    images = len(lengths) if lengths is not None else 1
    return analytic_breakdown(model_cfg, batch_images=images, patch_lengths=lengths).total / images


def estimate(path: str, args) -> dict:
    import torch

    from dpar_scale.config import load_config, steps_for_epochs
    from dpar_scale.flops.analytic import TRAIN_FACTOR
    from dpar_scale.models import build_model, count_params, resolve_model_config

    cfg = load_config(path, args.overrides)
    model_cfg = resolve_model_config(cfg.model)
    with torch.device("meta"):
        params = count_params(build_model(model_cfg))
    images, images_from = num_train_images(cfg, args.num_images)
    steps = (steps_for_epochs(cfg.train.epochs, images, cfg.data.batch_size) if cfg.train.epochs > 0
             else cfg.train.steps)
    lengths, layout_from = dpar_layout(cfg, args) if model_cfg.kind == "dpar" else (None, "")
    forward = forward_per_image(model_cfg, lengths)
    total = TRAIN_FACTOR * forward * steps * cfg.data.batch_size
    rate = args.peak * args.mfu  # FLOP/s per GPU
    row = {"config": path, "preset": model_cfg.preset, "kind": model_cfg.kind, "params": params,
           "grid": list(model_cfg.grid), "train_images": images, "train_images_from": images_from,
           "epochs": cfg.train.epochs, "steps": steps, "batch_size": cfg.data.batch_size,
           "images_per_gpu_per_step": cfg.data.batch_size / (args.gpus / cfg.parallel.tp),
           "mean_patch_length": (sum(map(sum, lengths)) / sum(map(len, lengths))) if lengths else 1.0,
           "layout_from": layout_from, "train_flops_per_image": TRAIN_FACTOR * forward, "train_flops": total,
           "gpu_hours": total / rate / 3600, "wall_clock_hours": total / rate / 3600 / args.gpus,
           "compute_ms_per_step": 1e3 * total / rate / args.gpus / steps}
    if model_cfg.kind == "entropy":  # tools/compute_entropy.py: one forward over every code row
        rows = images * max(1, _views(cfg))
        row["entropy_pass"] = {"rows": rows, "flops": rows * forward, "gpu_hours": rows * forward / rate / 3600}
    if args.samples and model_cfg.kind in ("gpt", "dpar"):
        halves = 2 if cfg.sample.cfg_scale != 1.0 else 1
        per_image = halves * forward
        if model_cfg.kind == "dpar" and cfg.model.patch.mode != "static":
            per_image += forward_per_image(dataclasses.replace(model_cfg, kind="entropy", preset="entropy-b", dim=0,
                                                               n_heads=0, n_layers=0, num_classes=0), None)
        flops = args.samples * per_image
        row["sampling"] = {"samples": args.samples, "cfg_scale": cfg.sample.cfg_scale, "flops": flops,
                           "gpu_hours_floor": flops / rate / 3600}
    return row


def _views(cfg) -> int:
    from dpar_scale.data.loader import DataSummary
    from dpar_scale.data.shards import ShardError

    try:
        return DataSummary.read(cfg.data.codes_dir).copies_per_image
    except ShardError:
        return 10  # ten-crop (+ flip): LlamaGen's ten views per image


def pair_baselines(rows: list[dict]) -> None:
    """Adds to each DPAR row the saving against the GPT row of the same size, grid, steps and batch."""
    key = lambda r: (r["preset"].split("-", 1)[1], tuple(r["grid"]), r["steps"], r["batch_size"])  # noqa: E731
    gpts = {key(r): r for r in rows if r["kind"] == "gpt"}
    for r in rows:
        base = gpts.get(key(r)) if r["kind"] == "dpar" else None
        if base:
            r["baseline"] = base["config"]
            r["saving"] = 1 - r["gpu_hours"] / base["gpu_hours"]


def fmt_hours(h: float) -> str:
    return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} d"


def print_rows(rows: list[dict], args) -> None:
    print(f"{args.gpus} x {args.gpu or 'GPU'} at {args.peak / 1e12:,.0f} TFLOP/s bf16 dense peak, MFU {args.mfu:g} "
          f"(assumed) = {args.peak * args.mfu / 1e12:,.0f} TFLOP/s per GPU")
    header = ["config", "params", "train images", "steps", "img/GPU/step", "mean len", "GFLOP/img", "total FLOPs",
              "GPU-hours", "wall-clock", "ms/step", "saving"]
    table = [[Path(r["config"]).name, f"{r['params'] / 1e6:,.1f}M", f"{r['train_images']:,}", f"{r['steps']:,}",
              f"{r['images_per_gpu_per_step']:g}", f"{r['mean_patch_length']:.3f}",
              f"{r['train_flops_per_image'] / 1e9:,.1f}", f"{r['train_flops']:.3e}", f"{r['gpu_hours']:,.0f}",
              fmt_hours(r["wall_clock_hours"]), f"{r['compute_ms_per_step']:,.1f}",
              f"{100 * r['saving']:.1f}%" if "saving" in r else ""] for r in rows]
    widths = [max(len(x[i]) for x in [header] + table) for i in range(len(header))]
    for i, line in enumerate([header] + table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        notes = [f"images from {r['train_images_from']}"]
        if r["kind"] == "dpar":
            notes.append(f"layout: {r['layout_from']}")
        if "entropy_pass" in r:
            e = r["entropy_pass"]
            notes.append(f"entropies (compute_entropy.py) over {e['rows']:,} rows: {e['flops']:.2e} FLOPs, "
                         f"{e['gpu_hours']:,.1f} GPU-hours")
        if "sampling" in r:
            s = r["sampling"]
            notes.append(f"{s['samples']:,} samples at CFG {s['cfg_scale']:g}: {s['flops']:.2e} FLOPs, a compute "
                         f"floor of {3600 * s['gpu_hours_floor']:,.0f} GPU-seconds")
        print(f"{Path(r['config']).name}: " + "; ".join(notes))
    most = max(r["steps"] for r in rows)
    print(f"ms/step is the compute of one step at the assumed MFU; a step also pays fixed costs (kernel launches, "
          f"collectives, the optimizer), and the steps run one after another: every 10 ms of them adds "
          f"{most * 0.01 / 3600:,.1f} h to {most:,} steps")
    if any(r["images_per_gpu_per_step"] < 8 for r in rows):
        print("note: below ~8 images per GPU per step a step's matmuls are small and FSDP's parameter gathers no "
              "longer hide behind them, so the assumed MFU is optimistic there (fewer GPUs, or HSDP: "
              "parallel.dp_shard=8 parallel.dp_replicate=NODES)")


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--config", action="append", required=True, help="a run config; repeat for a table")
    ap.add_argument("--gpus", type=positive_int, required=True, help="GPUs the run uses (e.g. 128 = 16 nodes x 8)")
    ap.add_argument("--gpu", default="", help="GPU name for the peak table, e.g. h100, a100, b200")
    ap.add_argument("--peak-tflops", type=positive_float, help="bf16 dense peak per GPU instead of --gpu")
    ap.add_argument("--mfu", type=fraction, default=0.4, help="assumed model FLOP utilisation (default 0.4)")
    ap.add_argument("--num-images", type=non_negative_int, default=0,
                    help="training images when the manifest is not at hand (ImageNet: 1281167)")
    ap.add_argument("--mean-patch-length", type=positive_float, help="DPAR: count an even layout of this mean")
    ap.add_argument("--max-images", type=positive_int, default=20000, help="entropy rows read for the measured layout")
    ap.add_argument("--samples", type=non_negative_int, default=0, help="also the compute floor of generating N images")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every config, e.g. train.epochs=50")
    args = ap.parse_args(argv)
    from dpar_scale.flops.analytic import peak_flops_for_name

    args.peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for_name(args.gpu) if args.gpu else None
    if not args.peak:
        raise UsageError(f"--gpu {args.gpu!r} is not in dpar_scale/flops/analytic.py's peak table: give --peak-tflops"
                         if args.gpu else "give --gpu NAME (e.g. h100) or --peak-tflops")
    if args.mfu <= 0:
        raise UsageError("--mfu must be in (0, 1]")
    rows = [estimate(path, args) for path in args.config]
    pair_baselines(rows)
    print_rows(rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpus": args.gpus, "gpu": args.gpu, "peak_flops": args.peak,
                                         "mfu": args.mfu, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
