#!/usr/bin/env python
"""Submit a training run to Slurm (through submitit) that checkpoints and requeues itself on preemption and at the
time limit.

  python launchers/slurm.py --nodes 16 --gpus-per-node 8 --partition P --time 48:00:00 --config PATH [overrides]
  python launchers/slurm.py ... --dry-run          print the sbatch script and the resolved config, submit nothing
  python launchers/slurm.py ... --engine deepspeed --deepspeed-config configs/deepspeed/zero3.json

One task per GPU (srun); every task maps SLURM_* to RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and
runs the trainer with `checkpoint.resume=auto`. Slurm sends --signal (default USR2, which NCCL does not catch)
--signal-delay seconds before preemption or the time limit; the trainer finishes its step, saves a checkpoint, and
the job requeues itself (at most --max-requeues times) and resumes from that checkpoint and the same wandb run.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import (  # noqa: E402
    entry_point, existing_file, non_negative_int, parser as cli_parser, positive_int,
)


def parser() -> argparse.ArgumentParser:
    p = cli_parser(__doc__)
    p.add_argument("--config", required=True, type=existing_file, help="YAML config of the run")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="also the tasks per node (one rank per GPU)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None)
    p.add_argument("--mem", default=None, help="sbatch --mem per node, e.g. 480G or 0 (all)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit per attempt: HH:MM:SS, D-HH:MM:SS or minutes")
    p.add_argument("--job-name", default="dpar")
    p.add_argument("--folder", default=None, help="submitit folder (sbatch script, logs); default "
                                                  "runs/slurm/<job-name>")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (e.g. --sbatch exclusive --sbatch mail_type=END)")
    p.add_argument("--engine", choices=("fsdp", "deepspeed"), default="fsdp")
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON (with --engine deepspeed)")
    p.add_argument("--signal", default="USR2", help="signal Slurm sends before preemption / the time limit")
    p.add_argument("--signal-delay", type=non_negative_int, default=120,
                   help="seconds between that signal and the kill")
    p.add_argument("--max-requeues", type=non_negative_int, default=10, help="give up after this many requeues")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config only")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the trainer, e.g. train.steps=100000")
    return p


@entry_point
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import yaml

    from dpar_scale.config import to_dict
    from dpar_scale.launch import (
        LaunchError, TrainJob, check_data_at_launch, render_sbatch, slurm_parameters, trainer_command,
        validate_launch,
    )

    world = args.nodes * args.gpus_per_node
    deepspeed_config = args.deepspeed_config if args.engine == "deepspeed" else None
    cfg = validate_launch(args.config, args.overrides, world, args.engine, args.deepspeed_config)
    data_line = check_data_at_launch(cfg)
    folder = Path(args.folder or f"runs/slurm/{args.job_name}").absolute()
    command = trainer_command(args.config, args.overrides, deepspeed_config)
    params = slurm_parameters(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, job_name=args.job_name,
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        cpus_per_task=args.cpus_per_task, mem=args.mem, signal_name=args.signal,
        signal_delay=args.signal_delay, sbatch=args.sbatch,
        comment=f"# each task runs (in-process, with the SLURM_* ranks mapped to torch.distributed): {command}")
    job = TrainJob(str(Path(args.config).absolute()), list(args.overrides), deepspeed_config,
                   max_requeues=args.max_requeues)
    print(f"# {data_line}".replace("\n", "\n# "))
    if args.dry_run:
        print(render_sbatch(params, folder / "%j"))
        print(f"# resolved config ({world} processes = {args.nodes} nodes × {args.gpus_per_node} GPUs):")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("Slurm is not available here (no sbatch/srun on PATH). Use launchers/local.py --nproc N "
                          "for this machine, or add --dry-run to see the sbatch script that would be submitted.")
    import submitit
    from submitit.slurm.slurm import SlurmJobEnvironment

    SlurmJobEnvironment.USR_SIG = params["additional_parameters"]["signal"].split("@")[0]  # for job._interrupt
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    submitted = executor.submit(job)
    print(f"submitted job {submitted.job_id} ({args.nodes} nodes × {args.gpus_per_node} GPUs, engine {args.engine})")
    print(f"logs:        {submitted.paths.stdout}".replace("%t", "0"))
    print(f"checkpoints: {Path(cfg.run.output_dir).absolute() / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
