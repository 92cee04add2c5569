"""Shared parts of the cluster launchers (`launchers/slurm.py`, `launchers/local.py`).

- `TrainJob`: the submitit callable. `__call__` maps the job's ranks to the torch.distributed environment
  (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), builds the `Trainer` and runs it. The preemption
  signal (submitit's, USR2 unless `SUBMITIT_PREEMPT_SIGNAL` says otherwise) only asks the trainer to stop
  (`Trainer.request_stop`): at the next step boundary every rank agrees, saves one checkpoint and returns. Then
  submitit's own handler is called as the signal would have called it: on rank 0 it calls `checkpoint()`, which
  returns the resubmission (same job, `checkpoint.resume=auto`, one more requeue counted), requeues the job and
  exits. The requeued job resumes from the newest complete checkpoint and the same wandb run (its id is in the
  checkpoint's TrainState).
- `validate_launch`: config path, dotted overrides and the parallel layout against the number of processes, before
  anything is submitted.
- `slurm_parameters` / `render_sbatch`: the sbatch script (what `--dry-run` prints is what is submitted).
- `rank_env`, `expand_nodelist`, `deepspeed_hostfile`: rank environment and DeepSpeed hostfile from SLURM_*.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpar_scale.config import ConfigError

ENGINES = ("fsdp", "deepspeed")
SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit reads the preemption signal's name from this variable


class LaunchError(RuntimeError):
    """A launch that cannot work as asked; the message says what to change."""


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


# ----------------------------------------------------------------------------------------- rank environment
def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list ("gpu[001-003,007],login5") expanded, in order."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in nodelist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, (p.strip() for p in parts)):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def rank_env(default_port: int = 29500) -> dict[str, str]:
    """torch.distributed's env:// variables for this task of a submitit job (Slurm or local executor), from
    submitit's `TorchDistributedEnvironment` (which reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
    SLURM_JOB_NODELIST ... or the local executor's equivalents). MASTER_PORT: the exported one, else a port derived
    from the job id (the same on every node)."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    job = JobEnvironment()
    dist = TorchDistributedEnvironment()
    master = "127.0.0.1" if job.cluster == "local" else dist.master_addr
    return {"RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size), "NODE_RANK": str(job.node), "MASTER_ADDR": master,
            "MASTER_PORT": str(dist.master_port or default_port)}


def deepspeed_hostfile(environ: dict | None = None) -> str:
    """A DeepSpeed hostfile ("host slots=N" per node) for the current Slurm allocation, for people who start
    ranks with `deepspeed --hostfile` (pdsh/ssh) instead of srun."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_NODELIST" not in env:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run this inside a Slurm allocation (sbatch / salloc)")
    slots = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    return "".join(f"{host} slots={int(slots)}\n" for host in expand_nodelist(env["SLURM_JOB_NODELIST"]))


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
        from dpar_scale.distributed import destroy_distributed
        from dpar_scale.trainer import Trainer

        os.environ.update(rank_env())
        os.chdir(self.workdir)  # relative config / data paths mean the same thing on every node
        sig = _preempt_signal()
        self._trainer, self._signalled = None, False
        submitit_handler = signal.signal(sig, self._on_signal)
        cfg = load_config(self.config, job_overrides(self.overrides, requeued=self.requeues > 0))
        trainer = self._trainer = Trainer(cfg, deepspeed_config=self.deepspeed_config)
        if self._signalled:
            trainer.request_stop()
        if self.simulate_preemption_at and self.requeues == 0:
            step, at = trainer.train_step, self.simulate_preemption_at

            def train_step():
                record = step()
                if trainer.state.step == at:
                    os.kill(os.getpid(), sig)
                return record

            trainer.train_step = train_step
        result = trainer.fit()
        destroy_distributed()
        signal.signal(sig, submitit_handler)
        if result.get("preempted") and callable(submitit_handler):
            # The checkpoint is on disk; now what the signal would have done under submitit: rank 0 calls
            # self.checkpoint(), writes the resubmission, requeues and exits. Other ranks just return.
            submitit_handler(sig, None)
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}

    def _on_signal(self, signum, frame) -> None:
        print(f"dpar-scale: caught {signal.Signals(signum).name}; stopping at the next step boundary to "
              f"checkpoint and requeue", file=sys.stderr, flush=True)
        self._signalled = True
        if getattr(self, "_trainer", None) is not None:
            self._trainer.request_stop()

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


# -------------------------------------------------------------------------------------------------- sbatch
def parse_time(text: str) -> int:
    """Slurm time ("48:00:00", "2-00:00:00", "90" minutes, "30:00" mm:ss) in whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if c is not None:
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:
        hours, minutes, seconds = (int(a), int(b), 0) if days else (0, int(a), int(b))
    else:
        hours, minutes, seconds = (int(a), 0, 0) if days else (0, int(a), 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds + 59) // 60


def slurm_parameters(*, nodes: int, gpus_per_node: int, time: str, job_name: str, partition: str | None = None,
                     account: str | None = None, qos: str | None = None, constraint: str | None = None,
                     cpus_per_task: int | None = None, mem: str | None = None, signal_name: str = "USR2",
                     signal_delay: int = 120, sbatch: list[str] = (), comment: str = "") -> dict:
    """Keyword arguments of submitit's sbatch rendering / `SlurmExecutor.update_parameters`: one task per GPU."""
    if signal_name.upper().removeprefix("SIG") not in {s.name.removeprefix("SIG") for s in signal.Signals}:
        raise LaunchError(f"--signal {signal_name!r} is not a signal name (e.g. USR2, USR1, TERM)")
    sig = signal_name.upper().removeprefix("SIG")
    extra = {"signal": f"{sig}@{signal_delay}"}  # submitit's own --signal uses its class default; ours wins
    if mem:
        extra["mem"] = mem
    for item in sbatch:
        key, eq, value = item.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value if eq else True
    params = {"nodes": nodes, "ntasks_per_node": gpus_per_node, "gpus_per_node": gpus_per_node,
              "time": parse_time(time), "job_name": job_name, "signal_delay_s": signal_delay,
              "stderr_to_stdout": True, "setup": [f"export {SIGNAL_ENV}={sig}"] + ([comment] if comment else []),
              "additional_parameters": extra}
    for key, value in (("partition", partition), ("account", account), ("qos", qos), ("constraint", constraint),
                       ("cpus_per_task", cpus_per_task)):
        if value:
            params[key] = value
    return params


def render_sbatch(params: dict, folder: str | Path, python: str | None = None) -> str:
    """The sbatch script submitit writes for `params` (the command is submitit's job runner)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = python or shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def main(argv=None) -> int:
    """`python -m dpar_scale.launch deepspeed-hostfile [PATH]`: the allocation's hostfile (stdout or PATH)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "deepspeed-hostfile":
        print(main.__doc__, file=sys.stderr)
        return 2
    try:
        text = deepspeed_hostfile()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------------------- local helpers
def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT of a local multi-process launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- hard kills
def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (read from /proc, Linux), parents first."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def kill_process_tree(pid: int) -> None:
    """SIGKILL to `pid` and every descendant: what losing a node does to a job. (torchrun starts each worker in
    its own session, so killing torchrun's process group alone would leave the workers running.)"""
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass

