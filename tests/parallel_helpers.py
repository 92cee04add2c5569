"""Shared by the multi-process tests: launching torchrun, the tiny run config, comparing two runs."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from dpar_scale.checkpoint.export import consolidated_weights
from dpar_scale.launch import free_port
from dpar_scale.train.metrics_log import read_metrics
from tolerances import assert_close

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"gpt": ["model.preset=gpt-tiny", "model.n_layers=2"],
         "entropy": ["model.preset=entropy-tiny", "model.n_layers=2"],
         "dpar": ["model.preset=dpar-tiny", "model.n_global_layers=2"]}
# The forward chain of these tiny runs (and of tests/test_trainer.py's) for tests/tolerances.py: the longest sum is
# the SwiGLU's 256-wide hidden layer (dim 32, ffn_multiple_of 256); depth is every layer of every stack + 2.
TINY_REDUCTION = 256
TINY_DEPTH = {"gpt": 2 + 2, "entropy": 2 + 2, "dpar": 1 + 2 + 1 + 2}


def assert_same_training(got: list[float], ref: list[float], kind: str, steps: int, what: str = "loss",
                         backward: bool = False) -> None:
    """Values logged by two runs that differ only in rounding (layout, reduction order, resume), `steps`
    optimizer steps in: every step's forward and backward add one chain of rounding to the weights the next one
    computes with; those of different steps are independent, so they add like a random walk (√steps), like the
    terms of one reduction; a gradient (`backward`) is one more chain. (Measured: accumulating two micro-batches
    against one batch moves the GPT's losses over 12 steps by 1.2e-6, 300x below this; a defect as small as a
    2x gradient scale under clipping moves them by 1.1e-3, 3x above it.)"""
    depth = math.sqrt(steps) * TINY_DEPTH[kind] * (2 if backward else 1)
    assert_close(got, ref, reduction=TINY_REDUCTION, depth=depth, msg=what)



def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}


def torchrun(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def overrides(out: Path, codes: Path, kind: str, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"data.codes_dir={codes}", f"model.kind={kind}", *SHAPE[kind],
            "model.dim=32", "model.n_heads=4", "model.vocab_size=32", "model.num_classes=3", "model.grid=[4,4]",
            "model.dropout=0.0", "model.class_dropout=0.0", "model.patch.threshold=2.0",
            "model.patch.max_patch_length=4", "data.batch_size=8", "data.val_fraction=0.125", "optim.lr=3e-3",
            "optim.grad_clip=0.5", "train.steps=4", "train.log_every=1", "train.val_batches=2",
            "train.progress_bar=false", "wandb.enabled=false", *extra]


def assert_same_run(single: Path, parallel: Path, kind: str) -> None:
    ref, got = read_metrics(single / "metrics.jsonl"), read_metrics(parallel / "metrics.jsonl")
    ref_train, got_train = [r for r in ref if "loss" in r], [r for r in got if "loss" in r]
    assert [r["step"] for r in got_train] == [1, 2, 3, 4]
    assert [set(r) for r in got_train] == [set(r) for r in ref_train]  # same metrics.jsonl records
    assert_same_training([r["loss"] for r in got_train], [r["loss"] for r in ref_train], kind, 4)
    assert_same_training([r["grad_norm"] for r in got_train], [r["grad_norm"] for r in ref_train], kind, 4,
                         "grad_norm", backward=True)
    assert all(r["grad_norm"] > 0.5 for r in ref_train)  # clipping was active in every step
    assert [r["lr"] for r in got_train] == [r["lr"] for r in ref_train]
    ref_val = [r["val_loss"] for r in ref if "val_loss" in r]
    assert_same_training([r["val_loss"] for r in got if "val_loss" in r][-1:], ref_val[-1:], kind, 4, "val_loss")
    assert_same_weights(final_weights(single), final_weights(parallel), kind, 4)


def assert_same_weights(a: dict, b: dict, kind: str, steps: int) -> None:
    """All weights within the training tolerance of the weights' scale (the largest |w|: the updates, not each
    tensor's size, carry the rounding, and Adam's steps are the same size in every tensor)."""
    assert sorted(a) == sorted(b)
    flat = [torch.cat([w[k].flatten().double() for k in sorted(a)]) for w in (a, b)]
    assert_same_training(flat[1], flat[0], kind, steps, "parameters", backward=True)


def final_weights(run: Path, step: int = 4) -> dict:
    """The full weights of a run's checkpoint, consolidated from its shards in this process."""
    return consolidated_weights(run / "checkpoints" / f"step-{step:06d}", use_ema=False)[0]


def start_torchrun(nproc: int, args: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """torchrun in its own process group (so the whole group can be killed), output to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env={**run_env(), **(extra_env or {})}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and every worker (see dpar_scale.launch.kill_process_tree)."""
    from dpar_scale.launch import kill_process_tree

    kill_process_tree(proc.pid)
    proc.wait()


def kill_at_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> int:
    """SIGKILLs torchrun and its workers as soon as metrics.jsonl records `step` (no clean exit, no final save);
    returns the last step recorded before the kill."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step} was reached")
        complete_lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
        steps = [json.loads(line)["step"] for line in complete_lines if line.strip()]
        if steps and max(steps) >= step:
            kill_hard(proc)
            return max(steps)
        time.sleep(0.005)
    kill_hard(proc)
    raise AssertionError(f"step {step} not reached within {timeout} s")
