"""The DeepSpeed engine: ZeRO-3 on 2 CPU processes (gloo) equals one process; JSON/config conflicts are clear.

The launcher form under test is the documented CPU one: `deepspeed --num_gpus 2 train.py --deepspeed_config ...`
(without --num_gpus the launcher starts a single process on a machine without GPUs).
"""
from __future__ import annotations

import json
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

DEEPSPEED = Path(sys.executable).with_name("deepspeed")
# Accumulation and a warm-up: DeepSpeed's micro-step bookkeeping and our LR schedule on its optimizer are exercised.
EXTRA = ["train.grad_accum=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    codes = write_code_dataset(root / "codes")
    Trainer(load_config(None, overrides(root / "single", codes, "dpar", *EXTRA))).fit()
    return root, codes


@pytest.mark.skipif(not DEEPSPEED.exists(), reason="the deepspeed launcher is not installed next to python")
def test_zero3_two_processes_matches_single_process(setup):
    root, codes = setup
    out = root / "zero3"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "train.py", "--deepspeed_config",
           "configs/deepspeed/zero3.json",
           *overrides(out, codes, "dpar", *EXTRA, "parallel.activation_checkpoint=full")]
    done = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "deepspeed_shm_comm_op built" not in done.stdout + done.stderr  # no JIT build on CPU
    assert_same_run(root / "single", out)
    used = json.loads((out / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == 3 and used["train_batch_size"] == 8
    assert used["gradient_accumulation_steps"] == 2 and used["train_micro_batch_size_per_gpu"] == 2
    assert (out / "checkpoints" / "step-000004" / "deepspeed").is_dir()


def test_zero3_resume_under_torchrun(setup):
    """The torchrun form of the same engine; stop at step 2, resume from DeepSpeed's checkpoint to step 4."""
    root, codes = setup
    out = root / "zero3-resumed"
    base = ["train.py", "--deepspeed_config", "configs/deepspeed/zero3.json"]
    first = torchrun(2, base + overrides(out, codes, "dpar", *EXTRA, "train.steps=2"))
    assert first.returncode == 0, first.stderr[-5000:]
    second = torchrun(2, base + overrides(out, codes, "dpar", *EXTRA, "checkpoint.resume=auto"))
    assert second.returncode == 0, second.stderr[-5000:]
    assert_same_run(root / "single", out)
    assert "resumed from" in second.stdout


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


def test_train_py_reports_a_conflicting_json(tmp_path):
    codes = write_code_dataset(tmp_path / "codes")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    done = subprocess.run([sys.executable, "train.py", "--deepspeed_config", str(bad),
                           *overrides(tmp_path / "run", codes, "gpt")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert '"train_batch_size": 32 but our data.batch_size = 8' in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    missing = subprocess.run([sys.executable, "train.py", "--deepspeed_config", str(tmp_path / "nope.json"),
                              *overrides(tmp_path / "run", codes, "gpt")],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []
