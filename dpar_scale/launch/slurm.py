"""Slurm side of launching: the sbatch script, the rank environment of a task, DeepSpeed hostfiles.

- `slurm_parameters` / `render_sbatch`: the sbatch script (what `--dry-run` prints is what is submitted).
- `rank_env`, `expand_nodelist`, `deepspeed_hostfile`: rank environment and DeepSpeed hostfile from SLURM_*.
- `parse_time`: Slurm's time formats in minutes.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path

from dpar_scale.errors import DparError

SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit reads the preemption signal's name from this variable


class LaunchError(DparError, RuntimeError):
    """A launch that cannot work as asked; the message says what to change."""


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


