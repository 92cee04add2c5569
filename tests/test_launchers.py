"""Cluster launchers without a cluster: the sbatch script of a dry run, the rank environment from faked SLURM_*
variables, clear errors, and the preemption paths of a real 2-process job through submitit's local executor: the
time-limit signal (USR2 -> checkpoint -> requeue -> resume) and a scheduler's SIGTERM (checkpoint, no requeue of
its own, the resubmission left for the scheduler)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import pytest

from dpar_scale import launch
from dpar_scale.config import load_config
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from parallel_helpers import REPO, assert_same_training, free_port, overrides, start_torchrun


def load_launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slurm_cli():
    return load_launcher("slurm")


def dry_run(slurm_cli, capsys, *args):
    code = slurm_cli.main(["--config", str(REPO / "configs/demo/dpar.yaml"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_sbatch_for_16_nodes_of_8_gpus(slurm_cli, capsys, tmp_path):
    code, out, err = dry_run(slurm_cli, capsys, "--nodes", "16", "--gpus-per-node", "8", "--partition", "P",
                             "--time", "48:00:00", "--account", "acc", "--qos", "high", "--cpus-per-task", "12",
                             "--signal-delay", "90", "--sbatch", "exclusive", "--folder", str(tmp_path / "sub"),
                             "--dry-run", "data.batch_size=256", "parallel.tp=2", "train.steps=1000")
    assert code == 0, err
    script, _, resolved = out.partition("# resolved config")
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=P", "#SBATCH --time=2880", "#SBATCH --signal=USR2@90", "#SBATCH --account=acc",
                 "#SBATCH --qos=high", "#SBATCH --cpus-per-task=12", "#SBATCH --exclusive",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR2"):
        assert line in script.splitlines(), line
    assert script.count("--signal=") == 1
    trainer_line = next(line for line in script.splitlines() if "train.py" in line)
    assert "data.batch_size=256 parallel.tp=2 train.steps=1000 checkpoint.resume=auto" in trainer_line
    assert "srun" in script and f"submitit.core._submit {tmp_path / 'sub' / '%j'}" in script
    assert "128 processes = 16 nodes × 8 GPUs" in resolved
    assert "batch_size: 256" in resolved and "tp: 2" in resolved
    # another signal / delay
    code, out, _ = dry_run(slurm_cli, capsys, "--nodes", "2", "--gpus-per-node", "4", "--signal", "SIGUSR1",
                           "--signal-delay", "300", "--time", "1-00:00:00", "--dry-run")
    assert code == 0 and "#SBATCH --signal=USR1@300" in out and "#SBATCH --time=1440" in out
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in out


def test_clear_errors(slurm_cli, capsys, monkeypatch, tmp_path):
    code, _, err = dry_run(slurm_cli, capsys, "--nodes", "16", "--gpus-per-node", "8", "--dry-run", "parallel.tp=3")
    assert code == 2 and "128 processes (nodes × GPUs per node) do not fit" in err and "parallel.tp" in err
    code, _, err = dry_run(slurm_cli, capsys, "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                           "parallel.dp_shard=4")
    assert code == 2 and "16 processes" in err and "must be equal" in err
    code = slurm_cli.main(["--config", str(tmp_path / "nope.yaml"), "--dry-run"])
    assert code == 2 and "nope.yaml does not exist" in capsys.readouterr().err
    local_cli = load_launcher("local")
    assert local_cli.main(["--config", str(tmp_path / "nope.yaml"), "--nproc", "2"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert local_cli.main(["--config", str(REPO / "configs/demo/dpar.yaml"), "--nproc", "2", "parallel.tp=4"]) == 2
    assert "2 processes" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun
    code, _, err = dry_run(slurm_cli, capsys, "--nodes", "1", "--gpus-per-node", "2")
    assert code == 2 and "Slurm is not available" in err and "launchers/local.py" in err and "--dry-run" in err
    code, _, err = dry_run(slurm_cli, capsys, "--nodes", "1", "--gpus-per-node", "2", "--engine", "deepspeed",
                           "--dry-run")
    assert code == 2 and "--deepspeed-config" in err
    with pytest.raises(launch.LaunchError, match="HH:MM:SS"):
        launch.parse_time("two days")
    assert [launch.parse_time(t) for t in ("90", "30:30", "2:00:00", "1-12", "0-00:00:30")] == [90, 31, 120, 2160, 1]


SLURM_RANK_9 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_NTASKS": "128",
                "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "16",
                "SLURM_JOB_NODELIST": "gpu[007-020,101],login-x", "SLURM_GPUS_ON_NODE": "8"}


def test_rank_environment_from_slurm_variables(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for key, value in SLURM_RANK_9.items():
        monkeypatch.setenv(key, value)
    env = launch.rank_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")} \
        == {"RANK": "9", "WORLD_SIZE": "128", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1",
            "MASTER_ADDR": "gpu007"}
    port = int(env["MASTER_PORT"])
    assert 20000 <= port <= 60000
    monkeypatch.setenv("SLURM_PROCID", "0")  # every rank derives the same port from the job id
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert launch.rank_env()["MASTER_PORT"] == str(port) and launch.rank_env()["RANK"] == "0"
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert launch.rank_env()["MASTER_PORT"] == "12345"
    hosts = launch.expand_nodelist(SLURM_RANK_9["SLURM_JOB_NODELIST"])
    assert hosts == [f"gpu{i:03d}" for i in range(7, 21)] + ["gpu101", "login-x"]
    hostfile = launch.deepspeed_hostfile(SLURM_RANK_9).splitlines()
    assert hostfile[0] == "gpu007 slots=8" and len(hostfile) == 16


def test_requeued_job_resumes_and_counts_requeues():
    job = launch.TrainJob("c.yaml", ["train.steps=9", "checkpoint.resume=/some/ckpt"], max_requeues=2)
    assert launch.job_overrides(job.overrides) == job.overrides  # the user's resume path, first attempt
    nxt = job.checkpoint().function
    assert nxt.requeues == 1 and launch.job_overrides(nxt.overrides, requeued=True) == [
        "train.steps=9", "checkpoint.resume=auto"]
    assert nxt.checkpoint().function.checkpoint() is None  # the limit
    job._trainer = object()
    assert "_trainer" not in job.__getstate__()


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_preempted_two_process_job_checkpoints_requeues_and_resumes(tmp_path, monkeypatch, engine):
    local_cli = load_launcher("local")
    codes = write_code_dataset(tmp_path / "codes")
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 4\n")
    base = overrides(tmp_path / "ref", codes, "gpt")
    Trainer(load_config(str(config), base)).fit()  # the uninterrupted run (one process: the same losses)

    for key, value in {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    deepspeed_config = str(REPO / "configs/deepspeed/zero2.json") if engine == "deepspeed" else None
    job = launch.TrainJob(str(config), overrides(tmp_path / "run", codes, "gpt", "parallel.dp_shard=2"),
                          deepspeed_config=deepspeed_config, simulate_preemption_at=2)
    submitted = local_cli.submit_local(job, nproc=2, folder=tmp_path / "submitit", timeout_min=5)
    start = time.time()
    results = submitted.results()
    assert time.time() - start < 240
    log = "".join(p.read_text() for p in sorted((tmp_path / "submitit").glob("*_log.out")))
    assert f"caught {signal.Signals(signal.SIGUSR2).name}" in log
    assert "stop requested: saved" in log and "step-000002" in log
    assert "Requeued job" in log
    assert "resumed from" in log and "at step 2" in log
    assert results[0]["step"] == 4 and not results[0].get("preempted")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]
    ref = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # no step lost or repeated
    assert_same_training([r["loss"] for r in got], [r["loss"] for r in ref], "gpt", 4)  # 2 processes vs 1


def wait_for_step(metrics, step: int, alive, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip()):
            return
        assert alive(), "the job ended before the step was reached"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def test_sigterm_checkpoints_and_leaves_the_requeue_to_the_scheduler(tmp_path, monkeypatch):
    """Slurm preempts (or cancels) a job by sending SIGTERM to every task; submitit itself ignores it. The job
    saves at the next step boundary, writes the resubmission a requeueing scheduler would run (requeue count + 1,
    checkpoint.resume=auto) without requeuing itself, and the checkpoint continues the run."""
    from submitit.core.utils import DelayedSubmission

    from dpar_scale.checkpoint.save_load import list_checkpoints, step_of

    local_cli = load_launcher("local")
    codes = write_code_dataset(tmp_path / "codes")
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 400\n")
    for key, value in {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    job = launch.TrainJob(str(config), overrides(run, codes, "gpt", "parallel.dp_shard=2", "train.steps=400"))
    submitted = local_cli.submit_local(job, nproc=2, folder=tmp_path / "submitit", timeout_min=5)
    wait_for_step(run / "metrics.jsonl", 2, alive=lambda: not submitted.done())
    os.kill(submitted._process.pid, signal.SIGTERM)  # the local executor's controller forwards it to both tasks
    submitted.wait()
    log = "".join(p.read_text() for p in sorted((tmp_path / "submitit").glob("*_log.out")))
    assert log.count("caught SIGTERM") == 2 and "stop requested: saved" in log
    assert "Requeued job" not in log
    saved = list_checkpoints(run)
    assert len(saved) == 1 and 2 <= step_of(saved[0]) < 400, saved
    resubmission = DelayedSubmission.load(submitted.paths.submitted_pickle).function
    assert resubmission.requeues == 1
    assert launch.job_overrides(resubmission.overrides, requeued=True)[-1] == "checkpoint.resume=auto"
    # the checkpoint continues the run: one process from it, against one process from the start
    stop = step_of(saved[0])
    Trainer(load_config(str(config), overrides(tmp_path / "ref", codes, "gpt", f"train.steps={stop + 2}"))).fit()
    Trainer(load_config(str(config), overrides(run, codes, "gpt", f"train.steps={stop + 2}",
                                               "checkpoint.resume=auto"))).fit()
    ref = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, stop + 3))
    assert_same_training([r["loss"] for r in got], [r["loss"] for r in ref], "gpt", stop + 2)


def test_sigterm_to_torchrun_checkpoints_every_worker(tmp_path):
    """Plain `torchrun train.py`: torchrun forwards SIGTERM to its workers (and SIGKILLs them after its
    --shutdown-timeout, 30 s by default); they stop at the next step boundary with one checkpoint and exit."""
    from dpar_scale.checkpoint.save_load import list_checkpoints, step_of

    codes = write_code_dataset(tmp_path / "codes")
    run = tmp_path / "run"
    proc = start_torchrun(2, ["train.py", *overrides(run, codes, "gpt", "parallel.dp_shard=2", "train.steps=400")],
                          tmp_path / "torchrun.log")
    try:
        wait_for_step(run / "metrics.jsonl", 2, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)  # to torchrun only (its own session): the workers hear it from torchrun
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            launch.kill_process_tree(proc.pid)
    log = (tmp_path / "torchrun.log").read_text()
    assert log.count("caught SIGTERM") == 2, log[-3000:]
    saved = list_checkpoints(run)
    assert len(saved) == 1 and 2 <= step_of(saved[0]) < 400, saved
    assert f"stopped by SIGTERM at step {step_of(saved[0])}: checkpoint {saved[0]}" in log
    assert "Unable to shutdown process" not in log  # they exited by themselves, before torchrun's SIGKILL


def test_submission_through_a_fake_sbatch(slurm_cli, capsys, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 777\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code = slurm_cli.main(["--config", str(REPO / "configs/demo/dpar.yaml"), "--nodes", "2", "--gpus-per-node", "4",
                           "--folder", str(tmp_path / "sub"), "train.steps=10"])
    out = capsys.readouterr().out
    assert code == 0 and "submitted job 777" in out and str(tmp_path / "sub" / "777") in out
    assert "checkpoints:" in out and "runs/demo/dpar/checkpoints" in out
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=USR2@120" in script
    assert "train.steps=10 checkpoint.resume=auto" in script
    from submitit.core.utils import DelayedSubmission

    pickled = DelayedSubmission.load(tmp_path / "sub" / "777" / "777_submitted.pkl").function
    assert isinstance(pickled, launch.TrainJob) and pickled.overrides == ["train.steps=10"]
