"""The submitit job that trains, and the checks made before anything is submitted.

- `TrainJob`: the submitit callable. `__call__` maps the job's ranks to the torch.distributed environment
  (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), builds the `Trainer` and runs it. Two signals
  only ask the trainer to stop (`Trainer.request_stop`; at the next step boundary every rank agrees, saves one
  checkpoint and returns):
  * the time-limit signal (submitit's, USR2 unless `SUBMITIT_PREEMPT_SIGNAL` says otherwise). Then submitit's
    own handler is called as the signal would have called it: on rank 0 it calls `checkpoint()`, which returns
    the resubmission (same job, `checkpoint.resume=auto`, one more requeue counted), requeues the job and exits;
  * SIGTERM, what Slurm sends on preemption (and on `scancel`, and at the time limit before the kill; submitit
    itself ignores it). Then rank 0 writes the resubmission for a scheduler that requeues the job
    (PreemptMode=REQUEUE) but does not requeue it itself (a cancelled job should stay cancelled), and exits.
  A requeued job resumes from the newest complete checkpoint and the same wandb run (its id is in the
  checkpoint's TrainState).
- `validate_launch`: config path, dotted overrides and the parallel layout against the number of processes, before
  anything is submitted; `check_data_at_launch`: the config against its data's manifest (and train.epochs -> steps).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpar_scale.config import ConfigError
from dpar_scale.launch.slurm import LaunchError, rank_env

ENGINES = ("fsdp", "deepspeed")


# ------------------------------------------------------------------------------------------ trainer command
def job_overrides(overrides: list[str], requeued: bool = False) -> list[str]:
    """The dotted overrides the job runs with. `checkpoint.resume=auto` is added unless the user chose a resume
    path for the first attempt; a requeued attempt always resumes from the newest checkpoint of the run."""
    overrides = list(overrides)
    if requeued:
        return [o for o in overrides if not o.startswith("checkpoint.resume=")] + ["checkpoint.resume=auto"]
    if not any(o.startswith("checkpoint.resume=") for o in overrides):
        overrides.append("checkpoint.resume=auto")
    return overrides


def trainer_argv(config: str, overrides: list[str], deepspeed_config: str | None = None,
                 requeued: bool = False) -> list[str]:
    """train.py's arguments for the job (what `TrainJob` runs in-process)."""
    ds = ["--deepspeed_config", str(deepspeed_config)] if deepspeed_config else []
    return ["--config", str(config), *ds, *job_overrides(overrides, requeued)]


def trainer_command(config: str, overrides: list[str], deepspeed_config: str | None = None) -> str:
    return shlex.join(["python", "train.py", *trainer_argv(config, overrides, deepspeed_config)])


# --------------------------------------------------------------------------------------------- validation
def validate_launch(config: str, overrides: list[str], world_size: int, engine: str = "fsdp",
                    deepspeed_config: str | None = None):
    """Loads the config as the job will, and checks the layout against `world_size` processes. Returns it."""
    from dpar_scale.config import load_config
    from dpar_scale.parallel.dims import ParallelDims

    if engine not in ENGINES:
        raise LaunchError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not Path(config).is_file():
        raise LaunchError(f"config {config} does not exist (pass --config configs/demo/dpar.yaml or your own YAML)")
    if engine == "deepspeed":
        if not deepspeed_config:
            raise LaunchError("--engine deepspeed needs --deepspeed-config (e.g. configs/deepspeed/zero3.json)")
        if not Path(deepspeed_config).is_file():
            raise LaunchError(f"--deepspeed-config {deepspeed_config} does not exist (see configs/deepspeed/)")
    cfg = load_config(config, job_overrides(overrides))
    try:
        dims = ParallelDims.from_config(cfg.parallel, world_size)
    except ConfigError as e:
        raise LaunchError(f"{world_size} processes (nodes × GPUs per node) do not fit the config's parallel "
                          f"layout: {e}") from None
    if engine == "deepspeed" and dims.tp > 1:
        raise LaunchError("parallel.tp > 1 needs the fsdp engine (DeepSpeed runs ZeRO data parallelism only)")
    if cfg.data.global_tokens_per_microbatch == 0 and cfg.data.batch_size % (cfg.train.grad_accum * dims.dp):
        raise LaunchError(f"data.batch_size={cfg.data.batch_size} is not divisible by train.grad_accum × "
                          f"data-parallel ranks = {cfg.train.grad_accum} × {dims.dp} ({dims.describe()}); change "
                          f"data.batch_size or the number of nodes / GPUs")
    return cfg


def check_data_at_launch(cfg) -> str:
    """Checks `cfg` against the manifest of the codes it names before the job waits in a queue: the model must fit
    the data (grid, vocabulary, classes), and train.epochs becomes train.steps (set in `cfg`, as the trainer will).
    Returns what to print. A codes folder this machine cannot read (not mounted on a login node) is reported, not
    an error: the trainer checks it again at start."""
    from dpar_scale.config import resolve_epochs
    from dpar_scale.data.loader import DataSummary
    from dpar_scale.data.shards import ShardError
    from dpar_scale.models import resolve_model_config
    from dpar_scale.train.validation import check_model_fits_data

    try:
        data = DataSummary.read(cfg.data.codes_dir)
    except ShardError as e:
        return f"data not checked here: {e}; the job checks it (and resolves train.epochs) at start"
    check_model_fits_data(dataclasses.replace(cfg, model=resolve_model_config(cfg.model)), data)
    images = data.num_train_images(cfg.data.val_fraction)
    line = (f"data {data.codes_dir}: {data.num_rows:,} code rows ({data.copies_per_image} views per image), "
            f"{images:,} training images, grid {data.grid[0]}x{data.grid[1]}, vocabulary {data.vocab_size}, "
            f"{data.num_classes} classes: fits the model")
    epochs = resolve_epochs(cfg, images)
    return line + (f"\n{epochs}" if epochs else "")


# ------------------------------------------------------------------------------------------ the job itself
@dataclass
class TrainJob:
    """What submitit runs on every task. Picklable; the live Trainer is not part of the pickled state."""

    config: str
    overrides: list[str] = field(default_factory=list)
    deepspeed_config: str | None = None
    max_requeues: int = 10
    requeues: int = 0
    simulate_preemption_at: int = 0  # testing aid: the first attempt signals itself after this step
    workdir: str = field(default_factory=os.getcwd)  # relative paths in the config mean what they meant here

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __call__(self) -> dict:
        from dpar_scale.config import load_config
        from dpar_scale.parallel.process_group import destroy_process_group
        from dpar_scale.train.trainer import Trainer

        from dpar_scale.train.stop_signals import StopOnSignals

        os.environ.update(rank_env())
        os.chdir(self.workdir)  # relative config / data paths mean the same thing on every node
        sig = _preempt_signal()
        stop = StopOnSignals((sig, signal.SIGTERM), reason="checkpoint (and requeue on the time-limit signal)")
        cfg = load_config(self.config, job_overrides(self.overrides, requeued=self.requeues > 0))
        trainer = Trainer(cfg, deepspeed_config=self.deepspeed_config)
        stop.attach(trainer)
        if self.simulate_preemption_at and self.requeues == 0:
            step, at = trainer.train_step, self.simulate_preemption_at

            def train_step():
                record = step()
                if trainer.state.step == at:
                    os.kill(os.getpid(), sig)
                return record

            trainer.train_step = train_step
        try:
            result = trainer.fit()
        finally:
            submitit_handlers = stop.restore()
        destroy_process_group()
        if result.get("preempted"):
            # The checkpoint is on disk; now what submitit does for that signal. Rank 0 exits in there; the other
            # ranks just return.
            if sig in stop.caught and callable(submitit_handlers[sig]):
                submitit_handlers[sig](sig, None)  # self.checkpoint(), write the resubmission, requeue, exit
            elif hasattr(getattr(submitit_handlers[signal.SIGTERM], "__self__", None), "checkpoint_and_exit"):
                # submitit's SIGTERM handler is a method of its SignalHandler: this one writes the resubmission
                # (self.checkpoint()) without requeuing, then exits.
                submitit_handlers[signal.SIGTERM].__self__.checkpoint_and_exit(signal.SIGTERM)
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}

    def checkpoint(self, *args, **kwargs):
        """submitit's checkpointing protocol: the resubmission to requeue (None: do not requeue). The trainer has
        saved before this is called (see `__call__`)."""
        from submitit.helpers import DelayedSubmission

        if self.requeues >= self.max_requeues:
            print(f"dpar-scale: not requeuing, already requeued {self.requeues} times (--max-requeues)",
                  file=sys.stderr, flush=True)
            return None
        nxt = TrainJob(self.config, list(self.overrides), self.deepspeed_config, self.max_requeues,
                       self.requeues + 1, self.simulate_preemption_at, self.workdir)
        return DelayedSubmission(nxt)


def _preempt_signal() -> signal.Signals:
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()
