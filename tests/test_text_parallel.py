"""Text-conditioned DPAR and GPT trained under tp=2 (TP + sequence parallelism, text embedding sharded over its
rows), FSDP2 dp_shard=2 and DeepSpeed ZeRO-3 (text embedding partitioned, 2 micro-batches a step) on CPU (gloo,
real processes) against one process: the same losses, gradient norms, validation loss and final weights to fp32
precision, with caption dropout on (decided per (seed, step, sample), so every layout and micro-batch split
empties the same captions). One torchrun launch trains the four parallel runs."""
from __future__ import annotations

import json

import pytest

from dpar_scale.config import load_config
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import add_text_captions, write_code_dataset
from parallel_helpers import REPO, assert_same_run, overrides, torchrun

WORKER = REPO / "tests" / "parallel_worker.py"
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
# name: (kind, overrides, DeepSpeed JSON or None for the native engine)
RUNS = {"dpar-tp2": ("dpar", ["parallel.dp_shard=1", "parallel.tp=2"], None),
        "gpt-tp2": ("gpt", ["parallel.dp_shard=1", "parallel.tp=2"], None),
        "dpar-dp2": ("dpar", ["parallel.dp_shard=2"], None),
        # accumulation against the one-process run without it: each micro-batch carries its own samples' captions
        "dpar-zero3": ("dpar", ["train.grad_accum=2"], ZERO3)}


def text_overrides(out, codes, model_path, kind, *extra):
    return overrides(out, codes, kind, "model.conditioning=text", f"model.text.tokenizer={model_path}",
                     "model.text.vocab_size=36", "model.text.max_length=12", "model.text.dropout=0.25", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_parallel")
    codes = write_code_dataset(root / "codes")
    model_path = add_text_captions(codes)
    for kind in ("dpar", "gpt"):
        Trainer(load_config(None, text_overrides(root / "single" / kind, codes, model_path, kind))).fit()
    jobs = [{"job": "train", "overrides": text_overrides(root / name, codes, model_path, kind, *more),
             "deepspeed_config": deepspeed} for name, (kind, more, deepspeed) in RUNS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(2, [str(WORKER), str(root / "jobs.json")])
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_text_model_in_parallel_matches_single_process(runs, name):
    kind = RUNS[name][0]
    assert_same_run(runs / "single" / kind, runs / name, kind)
    rows = [r for r in read_metrics(runs / name / "metrics.jsonl") if "loss" in r]
    single = [r for r in read_metrics(runs / "single" / kind / "metrics.jsonl") if "loss" in r]
    # the whole step's truncated captions, summed over the data-parallel ranks: the one-process count
    assert [r["text_truncated"] for r in rows] == [r["text_truncated"] for r in single]
    assert any(r["text_truncated"] > 0 for r in rows)


def test_deepspeed_text_checkpoint_carries_the_tokenizer(runs):
    """The DeepSpeed run's checkpoint holds the text model it trained with (sampling needs nothing else)."""
    step = runs / "dpar-zero3" / "checkpoints" / "step-000004"
    assert (step / "deepspeed").is_dir()
    assert (step / "text_tokenizer.model").read_bytes() == (runs / "codes" / "text.model").read_bytes()
