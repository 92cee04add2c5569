#!/usr/bin/env python
"""How long the training step waits for its batch: `data_wait_s` of metrics.jsonl against `step_time_s`, with the
batches built in the loop (data.num_workers=0) and built ahead by background workers, fixed-size and packed.

    python tools/bench_data.py [--workers 0 2] [--modes fixed packed] [--steps 30] [--warmup 5] [--batch 32] \
        [--grid 8] [--images 4096] [--threads 1] [--device cpu] [--override KEY=VALUE ...] \
        [--build-only [--profile K]] [--json results/bench_data.json]

Trains the demo's DPAR (configs/demo/dpar.yaml: dpar-tiny, vocabulary 512; `--grid` G x G codes, the demo's 8 by
default) on random codes and entropies written in the real shard format (one memory-mapped shard; θ=3.0 on
entropies uniform in [0, ln 512] gives ~1.9 codes per patch); packed mode fills
data.global_tokens_per_microbatch = batch/grad_accum x ⌊1.05 (G²/1.9 + 1)⌋ positions per micro-batch (142 at
G = 16). Each configuration is one `Trainer.fit` of warmup + steps steps logging every step; the table averages
the logged rows after the warmup. With 0 workers the wait is the whole build (gather, patch rule, packing,
layouts); with workers it is what is left of it. The machine's load is printed and saved: on a shared machine
the workers compete with the training thread for the cores.

`--build-only` trains nothing: it times (the median over the steps) what the background threads do per step —
the planner (`StepBatches.plan`: sample ids; packed: entropies, patch rule, packing) and a worker
(`StepBatches.build`: codes gathered, patch rule, layouts) — and what the training thread does besides the model
(the packed attention's plan of every micro-batch, built in DPAR's forward), one thread, `--workers` ignored.
`--profile K` adds the K functions with the most own time under cProfile over those steps.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import entry_point, parser, positive_int  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_random_codes(folder: Path, n_images: int, grid: int, vocab: int, num_classes: int) -> None:
    import numpy as np

    from dpar_scale.data import shards as S
    from dpar_scale.data import side_arrays as SA

    rng = np.random.default_rng(0)
    n = grid * grid
    labels = rng.integers(0, num_classes, size=n_images)
    folder.mkdir(parents=True, exist_ok=True)
    record = S.write_code_shard(str(folder), 0, rng.integers(0, vocab, size=(n_images, n)), labels)
    S.write_manifest(str(folder), {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": n_images,
        "num_source_images": n_images, "grid": [grid, grid], "vocab_size": vocab,
        "tokenizer": {"name": "random", "path": "", "sha256": ""}, "image_size": grid * 16,
        "augmentation": {"ten_crop": False, "flip": False, "copies_per_image": 1}, "num_classes": num_classes,
        "classes": [f"c{i}" for i in range(num_classes)], "shards": [record], "skipped": []})
    entropy = (rng.random((n_images, n)) * math.log(vocab)).astype(np.float16)
    SA.write_side_shard(str(folder / "entropy"), 0, entropy)
    SA.write_side_manifest(str(folder / "entropy"), S.CodeShards(str(folder)), extra={"grid": [grid, grid]})


def positions_per_image(grid: int) -> int:
    """The packed budget per image of the batch: the mean run (class + G²/1.9 patches) plus 5%."""
    return int(1.05 * (grid * grid / 1.9 + 1))


def config_overrides(args, codes: Path, out: Path, mode: str, workers: int) -> list[str]:
    overrides = [f"run.output_dir={out}", f"data.codes_dir={codes}", "data.val_fraction=0.0", "data.verify=size",
                 f"data.batch_size={args.batch}", f"train.grad_accum={args.grad_accum}",
                 f"data.num_workers={workers}", f"data.prefetch_steps={args.prefetch}",
                 f"train.steps={args.warmup + args.steps}", "train.log_every=1", "train.progress_bar=false",
                 "wandb.enabled=false", "model.patch.threshold=3.0", "model.class_dropout=0.0",
                 f"model.grid=[{args.grid},{args.grid}]"]
    if mode == "packed":
        budget = args.batch // args.grad_accum * positions_per_image(args.grid)
        overrides.append(f"data.global_tokens_per_microbatch={budget}")
    return overrides + args.override


def trainer(args, codes: Path, out: Path, mode: str, workers: int):
    from dpar_scale.config import load_config
    from dpar_scale.train.trainer import Trainer

    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's log lines; the table says it all
        return Trainer(load_config(str(REPO / "configs/demo/dpar.yaml"), config_overrides(args, codes, out, mode,
                                                                                          workers)),
                       device=args.device)


def run(args, codes: Path, out: Path, mode: str, workers: int) -> dict:
    from dpar_scale.train.metrics_log import read_metrics

    fit = trainer(args, codes, out, mode, workers)
    with contextlib.redirect_stdout(io.StringIO()):
        fit.fit()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][args.warmup:]
    step = statistics.mean(r["step_time_s"] for r in rows)
    wait = statistics.mean(r["data_wait_s"] for r in rows)
    return {"mode": mode, "workers": workers, "steps": len(rows), "step_s": step, "data_wait_s": wait,
            "wait_fraction": wait / step, "images_per_step": statistics.mean(r["images_per_s"] * r["step_time_s"]
                                                                             for r in rows)}


def build_only(args, codes: Path, out: Path, mode: str) -> dict:
    """Per-step seconds of the planner, a worker and the attention plans (see the docstring), no training."""
    import cProfile
    import pstats

    from dpar_scale.models.attention import AttentionMask

    batches = trainer(args, codes, out, mode, 0).batches
    cursor, times = 0, {"plan_s": [], "build_s": [], "attention_plan_s": []}
    images, profile = [], cProfile.Profile()

    def timed(key, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        times[key].append(time.perf_counter() - t0)
        return out

    def attention_plans(step_batches):
        for b in step_batches:
            AttentionMask.packed(b.layout.packed_image_id[None], b.layout.doc_lengths).prepare(
                "sdpa", b.layout.packed_image_id.device, None)

    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            times = {key: [] for key in times}
            if args.profile:
                profile.enable()
        plan = timed("plan_s", batches.plan, cursor)
        built = timed("build_s", batches.build, plan)
        timed("attention_plan_s", attention_plans, built)
        images.append(len(plan.step_ids))
        cursor += len(plan.step_ids)
    profile.disable()
    result = {"mode": mode, "steps": args.steps, "images_per_step": statistics.mean(images[args.warmup:]),
              **{key: statistics.median(v) for key, v in times.items()}}  # median: robust to preemption
    if args.profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile)
        result["profile"] = text.getvalue()
    return result


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--modes", nargs="+", choices=("fixed", "packed"), default=["fixed", "packed"])
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--warmup", type=positive_int, default=5)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--grid", type=positive_int, default=8, help="G: G x G codes per image (the demo's: 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--prefetch", type=positive_int, default=2)
    p.add_argument("--images", type=positive_int, default=4096)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of the training loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--override", nargs="*", default=[],
                   help="more config overrides, e.g. model.dim=32 for a step as short as a GPU's")
    p.add_argument("--build-only", action="store_true", help="time the batch building alone, train nothing")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="with --build-only: print the K functions with the most own time (cProfile)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error(f"--profile must be >= 0, got {args.profile}")
    if min(args.workers) < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_random_codes(Path(tmp) / "codes", args.images, args.grid, 512, 10)
        cases = [(m, w) for m in args.modes for w in ([0] if args.build_only else args.workers)]
        for mode, workers in tqdm(cases, desc="bench_data", leave=False):
            folder = Path(tmp) / f"run-{mode}-{workers}"
            results.append(build_only(args, Path(tmp) / "codes", folder, mode) if args.build_only
                           else run(args, Path(tmp) / "codes", folder, mode, workers))
    machine = {"overrides": args.override, "cpus": os.cpu_count(), "loadavg_1min_before": load_before[0],
               "loadavg_1min_after": os.getloadavg()[0],
               "torch_threads": args.threads, "device": args.device, "torch": torch.__version__}
    if args.build_only:
        print(f"{'mode':>7} {'images/step':>12} {'planner ms':>11} {'worker ms':>10} {'attention plans ms':>19}")
        for r in results:
            print(f"{r['mode']:>7} {r['images_per_step']:>12.1f} {1e3 * r['plan_s']:>11.2f} "
                  f"{1e3 * r['build_s']:>10.2f} {1e3 * r['attention_plan_s']:>19.2f}")
        for r in results:
            if r.get("profile"):
                print(f"--- {r['mode']}: own time per function over {r['steps']} steps\n{r['profile']}")
    else:
        print(f"{'mode':>7} {'workers':>8} {'images/step':>12} {'step ms':>9} {'data wait ms':>13} {'wait % of step':>15}")
        for r in results:
            print(f"{r['mode']:>7} {r['workers']:>8} {r['images_per_step']:>12.1f} {1e3 * r['step_s']:>9.1f} "
                  f"{1e3 * r['data_wait_s']:>13.2f} {100 * r['wait_fraction']:>14.2f}%")
    print(f"machine: {machine['cpus']} CPUs, load average {machine['loadavg_1min_before']:.1f} -> "
          f"{machine['loadavg_1min_after']:.1f}, {args.threads} torch thread(s), device {args.device}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
