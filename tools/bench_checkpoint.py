#!/usr/bin/env python
"""What a checkpoint costs: bytes on disk, seconds the training loop is blocked (synchronous vs background save),
seconds to publish, verify and load — per layout, with the real trainer (CPU, gloo).

    python tools/bench_checkpoint.py [--preset dpar-b] [--layouts 1,dp2] [--repeats 2] [--out bench.json]

For each layout one process per rank runs: one training step (so the optimizer has its moments), then `repeats`
times each of
  sync      trainer.save() with checkpoint.async_save=false: shards + checksums + complete.json + rename
  async     trainer.save() with checkpoint.async_save=true: what the step waits for (copy to CPU memory);
            then one training step runs while the threads write, then finish_pending_save() (the wait that is
            left, checksums, complete.json, rename)
  verify    the resume checks of the newest checkpoint (sizes + sha256 of every file, work split over ranks)
  load      load_checkpoint: weights and optimizer state read back into the live model (DCP)
Times are the slowest rank's, medians over the repeats. LlamaGen's vocabulary (16,384) and classes (1,000),
16x16 codes. Not a test: the numbers depend on the disk and the CPU. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_parallel import LAYOUTS, write_random_codes  # noqa: E402

from dpar_scale.checkpoint.save_load import step_folder  # noqa: E402
from dpar_scale.cli import entry_point, parser, positive_int  # noqa: E402


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from dpar_scale.checkpoint.save_load import load_checkpoint
    from dpar_scale.config import load_config
    from dpar_scale.checkpoint.resume_checks import check_checkpoint_files
    from dpar_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, json.loads(args.overrides)))
    rank = trainer.env.rank

    def timed(fn) -> float:
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return float(took)

    step_time = timed(trainer.train_step)
    times: dict[str, list[float]] = {k: [] for k in ("sync", "async_blocking", "async_step", "async_finish",
                                                      "verify", "load")}
    path = None
    for _ in range(args.repeats):
        trainer.cfg.checkpoint.async_save = False
        times["sync"].append(timed(lambda: trainer.save()))
        trainer.train_step()
        trainer.cfg.checkpoint.async_save = True
        times["async_blocking"].append(timed(lambda: trainer.save()))
        times["async_step"].append(timed(trainer.train_step))  # runs while the writer threads work
        times["async_finish"].append(timed(trainer.finish_pending_save))
        path = step_folder(trainer.out, trainer.state.step - 1)
        times["verify"].append(timed(lambda: check_checkpoint_files(path)))
        times["load"].append(timed(lambda: load_checkpoint(path, trainer.engine, trainer.scheduler,
                                                           trainer.layout(), say=lambda *_: None)))
    if rank == 0:
        params = sum(p.numel() for p in trainer.engine.model.parameters())
        result = {"world_size": trainer.env.world_size, "parameters": params, "train_step_s": step_time,
                  "bytes": {part: _folder_bytes(path / part) for part in ("model", "optimizer")},
                  "bytes_total": _folder_bytes(path),
                  "seconds": {k: statistics.median(v) for k, v in times.items()}, "all_seconds": times}
        Path(args.result).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_layout(args, layout: str, codes: Path, tmp: Path) -> dict:
    from dpar_scale.launch import free_port

    nproc, parallel = LAYOUTS[layout]
    result = tmp / f"{layout}.json"
    overrides = [f"run.output_dir={tmp / f'run-{layout}'}", f"data.codes_dir={codes}", f"model.preset={args.preset}",
                 "model.vocab_size=16384", "model.num_classes=1000", "model.grid=[16,16]", "model.dropout=0.0",
                 "model.patch.threshold=4.0", f"data.batch_size={args.batch}", "data.val_fraction=0.0",
                 "train.steps=1000", "train.progress_bar=false", "wandb.enabled=false", "checkpoint.keep_last=2",
                 *parallel]
    script = [str(Path(__file__).resolve()), "--worker", "--overrides", json.dumps(overrides), "--result",
              str(result), "--repeats", str(args.repeats)]
    cmd = [sys.executable, *script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"layout {layout} failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def table(results: dict, preset: str) -> str:
    lines = [f"{preset}: seconds (slowest rank, median) and size per checkpoint",
             "| layout | procs | GB | train step | sync save | async: step waits | async: step meanwhile | "
             "async: publish | verify | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layout, r in results.items():
        s = r["seconds"]
        lines.append(f"| {layout} | {r['world_size']} | {r['bytes_total'] / 1e9:.2f} | {r['train_step_s']:.2f} | "
                     f"{s['sync']:.2f} | {s['async_blocking']:.2f} | {s['async_step']:.2f} | "
                     f"{s['async_finish']:.2f} | {s['verify']:.2f} | {s['load']:.2f} |")
    return "\n".join(lines)


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="dpar-b")
    ap.add_argument("--layouts", default="1,dp2")
    ap.add_argument("--batch", type=positive_int, default=2,
                    help="images per step (the step only fills the optimizer)")
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--out", default="", help="JSON output path")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        tmp = Path(tmp)
        codes = write_random_codes(tmp / "codes", n_images=64, grid=(16, 16), vocab=16384, num_classes=1000)
        for layout in args.layouts.split(","):
            results[layout] = run_layout(args, layout, codes, tmp)
            print(f"{layout}: done", flush=True)
    print(table(results, args.preset))
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "batch": args.batch, "repeats": args.repeats,
                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
