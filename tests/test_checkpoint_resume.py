"""Sharded checkpoints and resume, with real processes (gloo) killed hard.

* Bit-exact: a run killed with SIGKILL at a step drawn per test and resumed on the same layout logs exactly the losses,
  gradient norms and sample ids of an uninterrupted run (FSDP2, TP, DeepSpeed ZeRO).
* Any layout: a checkpoint resumed on another layout (2→1, 2→4, 1→2, tp2→tp1, dp2×tp2→dp4) consumes exactly the
  samples the uninterrupted run consumed, with losses equal to fp32 reduction-order tolerance.
* Kill during save (one rank of a TP run dies between its model and optimizer shard writes): the run resumes
  from the previous checkpoint.
* Background (async) saves restore exactly what synchronous ones do, are published only when complete, and as
  soon as every rank's writes are done (a step or two later, not at the next save).
Class dropout is on (0.1) in every run: its decisions are per (sample, step), so they do not depend on the layout.
"""
from __future__ import annotations

import random
import shutil

import pytest

from dpar_scale.checkpoint.save_load import MARKER, list_checkpoints, read_train_state, step_of
from dpar_scale.config import load_config
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from parallel_helpers import (REPO, assert_same_training, assert_same_weights, kill_at_step, overrides,
                              start_torchrun, torchrun)

STEPS, INTERVAL = 12, 2
FSDP2 = ["parallel.dp_shard=2"]
TP2 = ["parallel.dp_shard=1", "parallel.tp=2"]
DP2TP2 = ["parallel.dp_shard=2", "parallel.tp=2"]
DP4 = ["parallel.dp_shard=4"]
DEEPSPEED = ["--deepspeed_config", str(REPO / "configs" / "deepspeed" / "zero2.json")]


def run_overrides(out, codes, kind, *extra):
    return overrides(out, codes, kind, f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}",
                     "checkpoint.keep_last=0", "model.class_dropout=0.1", "data.log_sample_ids=true", *extra)


def train_args(out, codes, kind, *extra, deepspeed: bool = False):
    return ["train.py", *(DEEPSPEED if deepspeed else []), *run_overrides(out, codes, kind, *extra)]


def records(run):
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def run_to_end(nproc, args, what):
    done = torchrun(nproc, args, timeout=600)
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return write_code_dataset(tmp_path_factory.mktemp("resume") / "codes")


@pytest.fixture(scope="module")
def root(codes):
    return codes.parent


def straight(root, codes, name, kind, nproc, layout, deepspeed=False):
    """An uninterrupted run (cached per name within the module)."""
    out = root / "straight" / name
    if not (out / "metrics.jsonl").is_file():
        if nproc == 1:
            Trainer(load_config(None, run_overrides(out, codes, kind, *layout))).fit()
        else:
            run_to_end(nproc, train_args(out, codes, kind, *layout, deepspeed=deepspeed), f"straight {name}")
    return out


def killed_then_resumed(root, codes, name, kind, nproc, layout, deepspeed=False):
    """Starts the run, SIGKILLs its process group at a random step, resumes with checkpoint.resume=auto on the same
    layout. Returns (run folder, the step the resume started from). The step is drawn per run name (seeded: the
    same on every machine and every run of the suite, different between the tests)."""
    out = root / "killed" / name
    kill_step = random.Random(name).randint(5, STEPS - 3)
    proc = start_torchrun(nproc, train_args(out, codes, kind, *layout, deepspeed=deepspeed), root / f"{name}.log")
    last = kill_at_step(proc, out / "metrics.jsonl", kill_step)
    newest = list_checkpoints(out)[-1]
    resume_step = int(newest.name.split("-")[1])
    assert resume_step < STEPS and resume_step <= last, (resume_step, last)
    done = run_to_end(nproc, train_args(out, codes, kind, *layout, "checkpoint.resume=auto", deepspeed=deepspeed),
                      f"resume {name}")
    assert f"resumed from {newest}" in done.stdout + done.stderr
    return out, resume_step


def assert_identical_after(resume_step, ref_run, run):
    ref, got = records(ref_run), records(run)
    for step in range(resume_step + 1, STEPS + 1):
        assert got[step]["sample_ids"] == ref[step]["sample_ids"], step
        assert got[step]["loss"] == ref[step]["loss"], (step, got[step]["loss"], ref[step]["loss"])
        assert got[step]["grad_norm"] == ref[step]["grad_norm"], step
        assert got[step]["lr"] == ref[step]["lr"], step


def assert_same_continuation(resume_step, ref_run, run, kind):
    """Another layout: the same samples in the same order, losses equal up to fp32 reduction order (from the
    same weights at the resume step on: rounding accumulates over the steps after it)."""
    ref, got = records(ref_run), records(run)
    steps = list(range(resume_step + 1, STEPS + 1))
    assert sorted(got) == steps  # the resumed run logged exactly the remaining steps
    assert [got[s]["sample_ids"] for s in steps] == [ref[s]["sample_ids"] for s in steps]
    assert_same_training([got[s]["loss"] for s in steps], [ref[s]["loss"] for s in steps], kind, len(steps))
    assert_same_training([got[s]["grad_norm"] for s in steps], [ref[s]["grad_norm"] for s in steps], kind,
                         len(steps), "grad_norm", backward=True)


def resume_elsewhere(root, codes, name, kind, nproc, layout, source, deepspeed=False):
    """A new run folder resuming from checkpoint `source` (written by another layout) to the end."""
    out = root / "moved" / name
    args = [*layout, f"checkpoint.resume={source}"]
    if nproc == 1 and not deepspeed:  # in this process (DeepSpeed always wants a process group: torchrun)
        Trainer(load_config(None, run_overrides(out, codes, kind, *args))).fit()
        return out
    run_to_end(nproc, train_args(out, codes, kind, *args, deepspeed=deepspeed), f"resume {name}")
    return out


# ------------------------------------------------------------------------------------------- bit-exact resume
@pytest.mark.parametrize("name,kind,layout,ref_name", [("fsdp2", "dpar", FSDP2, "fsdp2"), ("tp2", "gpt", TP2, "tp2")])
def test_sigkill_then_resume_is_bit_exact(root, codes, name, kind, layout, ref_name):
    ref = straight(root, codes, ref_name, kind, 2, layout)
    run, resume_step = killed_then_resumed(root, codes, name, kind, 2, layout)
    assert_identical_after(resume_step, ref, run)
    # the checkpoint files: every rank wrote its own shards; no full copy of the weights
    final = list_checkpoints(run)[-1]
    assert sorted(p.name for p in (final / "model").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(final.rglob("*.safetensors"))


def test_async_checkpoint_is_published_when_written_and_resumes_exactly(root, codes):
    """checkpoint.async_save=true, a checkpoint every 4 steps, SIGKILL once step 7 is logged: the checkpoint of
    step 4 is complete (published at a step boundary once both ranks' background writes finished; before, only at
    the save of step 8, so a crash lost two intervals), and the run resumes from it exactly as an uninterrupted
    run with synchronous saves continues."""
    ref = straight(root, codes, "fsdp2", "dpar", 2, FSDP2)
    out = root / "killed" / "async"
    layout = [*FSDP2, "checkpoint.async_save=true", "checkpoint.interval=4"]
    proc = start_torchrun(2, train_args(out, codes, "dpar", *layout), root / "async.log")
    last = kill_at_step(proc, out / "metrics.jsonl", 7)
    saved = list_checkpoints(out)
    assert saved and step_of(saved[-1]) >= 4 * ((last - 2) // 4), (last, saved)  # within two step boundaries
    assert not list(saved[-1].parent.glob(f"{saved[-1].name}.tmp"))
    run_to_end(2, train_args(out, codes, "dpar", *layout, "checkpoint.resume=auto"), "resume async")
    assert_identical_after(step_of(saved[-1]), ref, out)


def test_sigkill_then_resume_is_bit_exact_under_deepspeed(root, codes):
    ref = straight(root, codes, "deepspeed", "gpt", 2, [], deepspeed=True)
    run, resume_step = killed_then_resumed(root, codes, "deepspeed", "gpt", 2, [], deepspeed=True)
    assert_identical_after(resume_step, ref, run)


# ---------------------------------------------------------------------------------------- resume on other layouts
@pytest.mark.parametrize("target", ["one process", "dp4"])
def test_two_process_checkpoint_resumes_on_one_and_four(root, codes, target):
    ref = straight(root, codes, "fsdp2", "dpar", 2, FSDP2)
    source = ref / "checkpoints" / "step-000006"
    nproc, layout = (1, []) if target == "one process" else (4, DP4)
    run = resume_elsewhere(root, codes, f"fsdp2-to-{nproc}", "dpar", nproc, layout, source)
    assert_same_continuation(6, ref, run, "dpar")


def test_one_process_checkpoint_resumes_on_two(root, codes):
    ref = straight(root, codes, "single-dpar", "dpar", 1, [])
    run = resume_elsewhere(root, codes, "single-to-dp2", "dpar", 2, FSDP2, ref / "checkpoints" / "step-000008")
    assert_same_continuation(8, ref, run, "dpar")


def test_tensor_parallel_checkpoint_resumes_without_tp(root, codes):
    ref = straight(root, codes, "tp2", "gpt", 2, TP2)
    run = resume_elsewhere(root, codes, "tp2-to-1", "gpt", 1, [], ref / "checkpoints" / "step-000004")
    assert_same_continuation(4, ref, run, "gpt")


def test_dp2_tp2_checkpoint_resumes_on_dp4(root, codes):
    ref = straight(root, codes, "dp2tp2", "gpt", 4, DP2TP2)
    run = resume_elsewhere(root, codes, "dp2tp2-to-dp4", "gpt", 4, DP4, ref / "checkpoints" / "step-000010")
    assert_same_continuation(10, ref, run, "gpt")
    tp_ref = straight(root, codes, "tp2", "gpt", 2, TP2)  # and every layout trains the same model
    assert_same_training([r["loss"] for r in records(ref).values()], [r["loss"] for r in records(tp_ref).values()],
                         "gpt", STEPS)


@pytest.mark.parametrize("nproc", [1, 4])
def test_deepspeed_checkpoint_resumes_on_another_process_count(root, codes, nproc):
    """Through DeepSpeed's universal checkpoint, converted by the resuming run itself."""
    ref = straight(root, codes, "deepspeed", "gpt", 2, [], deepspeed=True)
    source = root / "ds-source" / str(nproc) / "step-000006"
    shutil.copytree(ref / "checkpoints" / "step-000006", source)
    run = resume_elsewhere(root, codes, f"deepspeed-to-{nproc}", "gpt", nproc, [], source, deepspeed=True)
    assert_same_continuation(6, ref, run, "gpt")
    from dpar_scale.train.deepspeed_engine import universal_ready

    assert universal_ready(source)  # converted once, with its own completion marker


# ------------------------------------------------------------------------------------------------------ export
def export_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_export_consolidates_dcp_and_deepspeed_checkpoints(root, codes, tmp_path):
    import torch

    from dpar_scale.checkpoint.export import consolidated_weights, load_model_for_inference
    # DCP shards of a tensor-parallel run (DTensors split by columns and rows) and DeepSpeed's ZeRO-2 partitions
    dcp = straight(root, codes, "tp2", "gpt", 2, TP2) / "checkpoints" / f"step-{STEPS:06d}"
    ds = straight(root, codes, "deepspeed", "gpt", 2, [], deepspeed=True) / "checkpoints" / f"step-{STEPS:06d}"
    exported = {}
    for name, ckpt in (("dcp", dcp), ("deepspeed", ds)):
        assert export_main([str(ckpt), "--out", str(tmp_path / name)]) == 0
        weights, cfg, _ = consolidated_weights(tmp_path / name / "model.safetensors")
        assert (tmp_path / name / "config.json").is_file() and cfg.model.kind == "gpt"
        exported[name] = weights
    # what was exported is what the checkpoint holds, and both engines trained the same weights
    direct = consolidated_weights(dcp)[0]
    assert all(torch.equal(direct[k], exported["dcp"][k]) for k in direct)
    assert_same_weights(exported["dcp"], exported["deepspeed"], "gpt", STEPS)
    # a checkpoint folder and its export load as the same model
    codes_in = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    a, _ = load_model_for_inference(dcp)
    b, _ = load_model_for_inference(tmp_path / "dcp")
    with torch.no_grad():
        assert torch.equal(a(codes_in, labels), b(codes_in, labels))


def test_export_errors_are_clear(root, tmp_path, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half" / "step-000004").mkdir(parents=True)
    (tmp_path / "half" / "step-000004" / "config.yaml").write_text("model:\n  kind: gpt\n")
    assert export_main([str(tmp_path / "half" / "step-000004")]) == 2
    assert "save was interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ kill during save
def test_rank_killed_between_shard_writes_leaves_previous_checkpoint(root, codes):
    out = root / "die-in-save"
    import json

    jobs = [{"job": "die_in_save", "rank": 1, "step": 6, "overrides": run_overrides(out, codes, "gpt", *TP2)}]
    (root / "die.json").write_text(json.dumps(jobs))
    done = torchrun(2, [str(REPO / "tests" / "parallel_worker.py"), str(root / "die.json")], timeout=300)
    assert done.returncode != 0
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    partial = out / "checkpoints" / "step-000006.tmp"
    assert (partial / "model").is_dir() and not (partial / MARKER).exists()  # rank 1 died after its model shards
    run_to_end(2, train_args(out, codes, "gpt", *TP2, "checkpoint.resume=auto"), "resume after the crash")
    assert not partial.exists()  # the interrupted save was cleaned up by the next one
    ref = straight(root, codes, "tp2", "gpt", 2, TP2)
    assert_identical_after(4, ref, out)


# --------------------------------------------------------------------------------------------- batch size change
def test_changed_global_batch_size_continues_from_the_same_sample(root, codes, capsys):
    ref = straight(root, codes, "single-dpar", "dpar", 1, [])
    source = ref / "checkpoints" / "step-000004"
    out = root / "moved" / "bigger-batch"
    trainer = Trainer(load_config(None, run_overrides(out, codes, "dpar", "data.batch_size=16", "train.steps=6",
                                                      f"checkpoint.resume={source}")))
    assert "global batch size changed on resume: 8 -> 16" in capsys.readouterr().out
    cursor = read_train_state(source)["train_state"]["samples_seen"]
    assert cursor == 4 * 8
    trainer.fit()
    got = records(out)
    assert sorted(got) == [5, 6]
    assert got[5]["sample_ids"] == trainer.order.ids(cursor, 16).tolist()
    assert got[6]["sample_ids"] == trainer.order.ids(cursor + 16, 16).tolist()


def test_checkpoint_without_marker_is_not_resumed(root, codes):
    ref = straight(root, codes, "single-dpar", "dpar", 1, [])
    run = root / "unmarked"
    shutil.copytree(ref / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / f"step-{STEPS:06d}" / MARKER).unlink()
    assert list_checkpoints(run)[-1].name == f"step-{STEPS - INTERVAL:06d}"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Trainer(load_config(None, run_overrides(run, codes, "dpar",
                                                f"checkpoint.resume={run / 'checkpoints' / f'step-{STEPS:06d}'}")))


def test_async_checkpoints_hold_what_synchronous_ones_hold(root, codes):
    import torch

    from dpar_scale.checkpoint.export import consolidated_weights

    sync = straight(root, codes, "single-dpar", "dpar", 1, [])
    out = root / "async-single"
    Trainer(load_config(None, run_overrides(out, codes, "dpar", "checkpoint.async_save=true", "train.ema=0.9"))).fit()
    assert [p.name for p in list_checkpoints(out)] == [f"step-{s:06d}" for s in range(INTERVAL, STEPS + 1, INTERVAL)]
    assert not list((out / "checkpoints").glob("*.tmp"))  # every background save was published
    assert [r["loss"] for r in records(out).values()] == [r["loss"] for r in records(sync).values()]
    for step in (INTERVAL, STEPS // 2, STEPS):
        a = consolidated_weights(sync / "checkpoints" / f"step-{step:06d}", use_ema=False)[0]
        b = consolidated_weights(out / "checkpoints" / f"step-{step:06d}", use_ema=False)[0]
        assert all(torch.equal(a[k], b[k]) for k in a), step  # the step's weights, not later ones


def test_export_tool_converts_deepspeed_checkpoints_to_universal_ahead_of_time(root, codes, tmp_path, capsys):
    import json

    from dpar_scale.train.deepspeed_engine import UNIVERSAL_MARKER, universal_ready

    ds = straight(root, codes, "deepspeed", "gpt", 2, [], deepspeed=True) / "checkpoints" / "step-000004"
    copy = tmp_path / "step-000004"
    shutil.copytree(ds, copy)
    assert export_main([str(copy), "--universal"]) == 0
    assert "resume on any number of processes" in capsys.readouterr().out
    universal = copy / "deepspeed" / "state_universal"
    assert (universal / "zero").is_dir() and (copy / "deepspeed" / "latest_universal").read_text() == "state_universal"
    marker = copy / "deepspeed" / UNIVERSAL_MARKER
    assert universal_ready(copy) and json.loads(marker.read_text())["files"]
    written = marker.stat().st_mtime_ns
    assert export_main([str(copy), "--universal"]) == 0  # complete: nothing to do
    assert marker.stat().st_mtime_ns == written
    # an interrupted conversion (a folder without its marker, a leftover temporary folder) is never used: redone
    marker.unlink()
    (universal / "half-written").write_text("x")
    (copy / "deepspeed" / "state_universal.tmp").mkdir()
    assert not universal_ready(copy)
    assert export_main([str(copy), "--universal"]) == 0
    assert universal_ready(copy) and not (universal / "half-written").exists()
    assert not (copy / "deepspeed" / "state_universal.tmp").exists()
    # a damaged one (a file of another size than its marker says) is redone too
    damaged = next(p for p in sorted(universal.rglob("*.pt")))
    damaged.write_bytes(damaged.read_bytes()[:-1])
    assert not universal_ready(copy)
    assert export_main([str(copy), "--universal"]) == 0 and universal_ready(copy)
    dcp = straight(root, codes, "tp2", "gpt", 2, TP2) / "checkpoints" / "step-000004"
    assert export_main([str(dcp), "--universal"]) == 2  # not a DeepSpeed checkpoint
    assert "only DeepSpeed checkpoints" in capsys.readouterr().err
