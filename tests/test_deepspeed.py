"""The DeepSpeed engine: ZeRO-3 on 2 CPU processes (gloo) equals one process, also after a resume on 2 processes
and on one (through DeepSpeed's universal checkpoint); JSON/config conflicts are clear.

The launcher form under test is the documented CPU one: `deepspeed --num_gpus 2 train.py --deepspeed_config ...`
(without --num_gpus the launcher starts a single process on a machine without GPUs). It runs as
`python -m deepspeed.launcher.runner`, the module behind the `deepspeed` script, with this interpreter: a
`deepspeed` on PATH may belong to another environment, and the script is not always installed beside python.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpar_scale.config import ConfigError, load_config
from dpar_scale.train.deepspeed_engine import load_deepspeed_json, resolve_deepspeed_config
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from parallel_helpers import REPO, assert_same_run, free_port, overrides, run_env, torchrun

DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]  # what the `deepspeed` script runs
# Accumulation and a warm-up: DeepSpeed's micro-step bookkeeping and our LR schedule on its optimizer are exercised.
EXTRA = ["train.grad_accum=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    codes = write_code_dataset(root / "codes")
    Trainer(load_config(None, overrides(root / "single", codes, "dpar", *EXTRA))).fit()
    return root, codes


def test_zero3_two_processes_matches_single_process(setup):
    root, codes = setup
    out = root / "zero3"
    cmd = [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train.py", "--deepspeed_config",
           "configs/deepspeed/zero3.json",
           *overrides(out, codes, "dpar", *EXTRA, "parallel.activation_checkpoint=full")]
    done = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "deepspeed_shm_comm_op built" not in done.stdout + done.stderr  # no JIT build on CPU
    assert_same_run(root / "single", out, "dpar")
    used = json.loads((out / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == 3 and used["train_batch_size"] == 8
    assert used["gradient_accumulation_steps"] == 2 and used["train_micro_batch_size_per_gpu"] == 2
    assert (out / "checkpoints" / "step-000004" / "deepspeed").is_dir()


ZERO3 = ["train.py", "--deepspeed_config", "configs/deepspeed/zero3.json"]


@pytest.fixture(scope="module")
def zero3_two_steps(setup):
    """The torchrun form of the same engine, stopped at step 2: a copy of its run folder (checkpoint of step 2)."""
    root, codes = setup
    out = root / "zero3-two-steps"
    first = torchrun(2, ZERO3 + overrides(out, codes, "dpar", *EXTRA, "train.steps=2"))
    assert first.returncode == 0, first.stderr[-5000:]
    return out


def continue_run(root, source: Path, name: str) -> Path:
    out = root / name
    shutil.copytree(source, out)
    return out


def test_zero3_resume_under_torchrun(setup, zero3_two_steps):
    """Resume DeepSpeed's ZeRO-3 checkpoint of step 2 on the same 2 processes, to step 4."""
    root, codes = setup
    out = continue_run(root, zero3_two_steps, "zero3-resumed")
    second = torchrun(2, ZERO3 + overrides(out, codes, "dpar", *EXTRA, "checkpoint.resume=auto"))
    assert second.returncode == 0, second.stderr[-5000:]
    assert_same_run(root / "single", out, "dpar")
    assert "resumed from" in second.stdout


def test_zero3_dpar_checkpoint_resumes_on_one_process(setup, zero3_two_steps):
    """2 ranks' ZeRO-3 partitions of DPAR -> DeepSpeed's universal form, converted by the resuming run (with its
    own completion marker) -> one process to step 4: the same run as one process from the start."""
    from dpar_scale.train.deepspeed_engine import universal_ready

    root, codes = setup
    out = continue_run(root, zero3_two_steps, "zero3-on-one")
    done = torchrun(1, ZERO3 + overrides(out, codes, "dpar", *EXTRA, "checkpoint.resume=auto"))
    assert done.returncode == 0, done.stderr[-5000:]
    assert "resuming a checkpoint written by 2 process(es)" in done.stdout
    assert_same_run(root / "single", out, "dpar")
    assert universal_ready(out / "checkpoints" / "step-000002")


def test_ranks_waiting_for_the_universal_conversion(tmp_path, monkeypatch):
    """What a rank other than 0 does while rank 0 converts: it polls the shared filesystem for the conversion's
    marker (no collective, so no process-group timeout), fails at once when rank 0 left an error, and gives up
    after the wait derived from the checkpoint's size (or checkpoint.universal_timeout_min)."""
    import torch.distributed as dist

    from dpar_scale.checkpoint.save_load import CheckpointError
    from dpar_scale.train import deepspeed_engine as engine

    state = tmp_path / "step-000002" / "deepspeed" / "state"
    state.mkdir(parents=True)
    (state / "shard.pt").write_bytes(b"\0" * 10_000_000)
    assert engine.universal_timeout(tmp_path / "step-000002") == pytest.approx(1800 + 2.0)
    assert engine.universal_timeout(tmp_path / "step-000002", minutes=90) == 5400
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    with pytest.raises(CheckpointError, match="did not finish the universal conversion .* within 0 min"):
        engine.prepare_universal(tmp_path / "step-000002", timeout_min=0.001, poll_s=0.01)
    (state.parent / engine.UNIVERSAL_FAILED).write_text("OSError: disk full\n")
    with pytest.raises(CheckpointError, match="rank 0 could not convert .*: OSError: disk full"):
        engine.prepare_universal(tmp_path / "step-000002", poll_s=0.01)
    (state.parent / engine.UNIVERSAL_FAILED).unlink()
    (state.parent / engine.UNIVERSAL_TAG).mkdir()
    (state.parent / engine.UNIVERSAL_TAG / "x.pt").write_bytes(b"12")
    (state.parent / engine.UNIVERSAL_MARKER).write_text(json.dumps({"files": {"state_universal/x.pt": 2}}))
    engine.prepare_universal(tmp_path / "step-000002", poll_s=0.01)  # complete: returns


# ---------------------------------------------------------------------------------- JSON <-> config checks
def cfg(*extra):
    return load_config(None, ["model.preset=gpt-tiny", "data.batch_size=8", "train.grad_accum=2",
                              "optim.grad_clip=1.0", *extra])


def test_shipped_json_files_resolve_from_our_config():
    for name, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        ds = resolve_deepspeed_config(load_deepspeed_json(REPO / "configs" / "deepspeed" / f"{name}.json"), cfg(), 2)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) \
            == (8, 2, 2)
        assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False
    bf16 = resolve_deepspeed_config({"bf16": {"enabled": "auto"}}, cfg("train.precision=bf16"), 2)
    assert bf16["bf16"]["enabled"] is True


@pytest.mark.parametrize("json_values, extra, message", [
    ({"train_batch_size": 16}, [], r'"train_batch_size": 16 but our data.batch_size = 8.*set data.batch_size=16'),
    ({"gradient_accumulation_steps": 4}, [], r"train.grad_accum = 2.*set train.grad_accum=4"),
    ({"train_micro_batch_size_per_gpu": 4}, [], r"train_micro_batch_size_per_gpu.*set data.batch_size=16"),
    ({"gradient_clipping": 0.5}, [], r"optim.grad_clip = 1.0.*set optim.grad_clip=0.5"),
    ({"bf16": {"enabled": True}}, [], r"train.precision=fp32: set train.precision=bf16"),
    ({"optimizer": {"type": "Adam"}}, [], r'"optimizer" section; dpar-scale passes its own AdamW'),
    ({"fp16": {"enabled": True}}, [], "enables fp16"),
    ({}, ["parallel.tp=2"], "parallel.tp=2 is not supported with the DeepSpeed engine"),
    ({}, ["train.ema=0.99"], "train.ema=0.99 is not supported with the DeepSpeed engine"),
])
def test_json_that_disagrees_with_our_config_is_a_clear_error(json_values, extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(json_values, cfg(*extra), 2, source="zero3.json")


def test_train_py_reports_a_conflicting_json(tmp_path, capsys):
    # train.py's main() in this process: the command line's exit code and message, before anything starts
    from test_trainer import train_py

    main = train_py().main
    codes = write_code_dataset(tmp_path / "codes")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    assert main(["--deepspeed_config", str(bad), *overrides(tmp_path / "run", codes, "gpt")]) == 2
    assert '"train_batch_size": 32 but our data.batch_size = 8' in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(["--deepspeed_config", str(tmp_path / "nope.json"), *overrides(tmp_path / "run", codes, "gpt")]) == 2
    assert f"{tmp_path / 'nope.json'}" in (err := capsys.readouterr().err) and "does not exist" in err
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []
