"""Launching training jobs: Slurm via submitit (`launchers/slurm.py`), the same job locally
(`launchers/local.py`), and the helpers both use.

Rooms: `job` (the submitit callable `TrainJob`, preemption -> checkpoint -> requeue, `validate_launch`), `slurm`
(sbatch rendering, SLURM_* -> rank environment, DeepSpeed hostfile), `processes` (process-tree kill; `free_port` is re-exported from dpar_scale.parallel),
`stages` (the demos' tool pipeline) and `demo_data` (the embedded demos' shared data, evaluator, tokenizer, θ and training runs).
This is the top of the package: it may import anything below it (train, config, parallel).
"""
from dpar_scale.launch.job import (
    ENGINES, TrainJob, check_data_at_launch, job_overrides, trainer_argv, trainer_command, validate_launch,
)
from dpar_scale.launch.processes import kill_process_tree, process_tree
from dpar_scale.parallel.process_group import free_port
from dpar_scale.launch.slurm import (
    SIGNAL_ENV, LaunchError, deepspeed_hostfile, expand_nodelist, parse_time, rank_env, render_sbatch,
    slurm_parameters,
)

__all__ = ["ENGINES", "SIGNAL_ENV", "LaunchError", "TrainJob", "check_data_at_launch", "deepspeed_hostfile",
           "expand_nodelist", "free_port", "job_overrides", "kill_process_tree", "parse_time", "process_tree", "rank_env", "render_sbatch",
           "slurm_parameters", "trainer_argv", "trainer_command", "validate_launch"]
