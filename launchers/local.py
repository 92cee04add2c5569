#!/usr/bin/env python
"""The Slurm launcher's interface on one machine (submitit's local executor): N processes, the same job callable,
the same preemption path (signal -> checkpoint at the step boundary -> requeue -> resume).

  python launchers/local.py --nproc 2 --config PATH [overrides]
  python launchers/local.py --nproc 2 --engine deepspeed --deepspeed-config configs/deepspeed/zero2.json --config PATH

The job's processes get RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 / MASTER_PORT from submitit's
environment, like `torchrun --nproc_per_node N train.py ...`. Logs go to --folder (default runs/local/<job-name>).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import TYPE_CHECKING  # noqa: E402

from dpar_scale.cli import (  # noqa: E402
    entry_point, existing_file, non_negative_int, parser as cli_parser, positive_float, positive_int,
)

if TYPE_CHECKING:
    from dpar_scale.launch import TrainJob


def parser() -> argparse.ArgumentParser:
    p = cli_parser(__doc__)
    p.add_argument("--config", required=True, type=existing_file, help="YAML config of the run")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes (one per GPU on a GPU machine)")
    p.add_argument("--job-name", default="dpar")
    p.add_argument("--folder", default=None, help="submitit folder (logs, pickles); default runs/local/<job-name>")
    p.add_argument("--engine", choices=("fsdp", "deepspeed"), default="fsdp")
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON (with --engine deepspeed)")
    p.add_argument("--time", type=positive_float, default=24 * 60, help="time limit in minutes (the signal "
                                                                        "comes --signal-delay seconds before it)")
    p.add_argument("--signal-delay", type=non_negative_int, default=120)
    p.add_argument("--max-requeues", type=non_negative_int, default=10)
    p.add_argument("--simulate-preemption-at", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-wait", action="store_true", help="submit and return (the job runs in the background)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the trainer")
    return p



def submit_local(job: TrainJob, nproc: int, folder: str | Path, timeout_min: float = 24 * 60,
                 signal_delay: int = 120, max_requeues: int = 10):
    """Submits `job` to submitit's local executor with `nproc` tasks; returns the submitit Job."""
    import submitit
    import torch

    from dpar_scale.launch import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))  # the tasks inherit it (and keep it across requeues)
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(tasks_per_node=nproc, nodes=1, timeout_min=timeout_min, signal_delay_s=signal_delay,
                               gpus_per_node=nproc if torch.cuda.is_available() else 0, stderr_to_stdout=True)
    return executor.submit(job)


@entry_point
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from dpar_scale.launch import TrainJob, validate_launch

    deepspeed_config = args.deepspeed_config if args.engine == "deepspeed" else None
    cfg = validate_launch(args.config, args.overrides, args.nproc, args.engine, args.deepspeed_config)
    folder = Path(args.folder or f"runs/local/{args.job_name}").absolute()
    job = TrainJob(str(Path(args.config).absolute()), list(args.overrides), deepspeed_config,
                   max_requeues=args.max_requeues, simulate_preemption_at=args.simulate_preemption_at)
    submitted = submit_local(job, args.nproc, folder, args.time, args.signal_delay, args.max_requeues)
    print(f"started local job {submitted.job_id} ({args.nproc} processes, engine {args.engine})")
    print(f"logs:        {folder}/{submitted.job_id}_<task>_log.out")
    print(f"checkpoints: {Path(cfg.run.output_dir).absolute() / 'checkpoints'}")
    if args.no_wait:
        return 0
    try:
        result = submitted.results()[0]
    except Exception as e:  # the task's traceback is in its log
        print(f"error: the job failed: {e}", file=sys.stderr)
        return 1
    print(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f} "
          f"checkpoint {result.get('checkpoint')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
