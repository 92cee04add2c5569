"""Multi-process training on CPU (gloo, real processes) against a single-process reference.

For every model kind, the same run (same seed, data, init, 4 optimizer steps with active gradient clipping) is
trained in one process and under torchrun with dp_shard=2 (FSDP2), tp=2 (TP + sequence parallelism) and
dp_shard=2 × tp=2 (4 processes); losses, gradient norms, validation losses and the final weights must agree to fp32
precision. One torchrun launch per layout trains all kinds (plus the extras named in LAYOUTS) to keep the suite
short; each (layout, kind) is still its own test. The extras: tp=2 with dropout on (GPT, and DPAR with static
patches, whose packed global sequence needs no padding) against one process with the same dropout; and the
per-device FLOPs logged under dp=2 and tp=2 against an independent count of each step's samples.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from dpar_scale.config import ConfigError, load_config
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from parallel_helpers import REPO, assert_same_run, assert_same_training, assert_same_weights, overrides, torchrun
from tolerances import abs_tol

WORKER = REPO / "tests" / "parallel_worker.py"
KINDS = ("gpt", "entropy", "dpar")
IDS = ["data.log_sample_ids=true"]
# Static patches: every image has the same patch count M, so a micro-batch of 8 images packs 8 (M + 1) global
# positions, a multiple of tp=2: no padding, so every dropout acts on the tensor shape one process has.
STATIC = ["model.patch.mode=static", "model.patch.static_length=2"]
DROPOUT_RUNS = {"gpt-dropout": ("gpt", ["model.dropout=0.1"]),
                "dpar-dropout": ("dpar", ["model.dropout=0.1", *STATIC, *IDS])}
TP2 = ["parallel.dp_shard=1", "parallel.tp=2"]

# layout -> (processes, parallel overrides, extra overrides per kind, extra runs [(name, kind, overrides)])
LAYOUTS = {
    "dp2": (2, ["parallel.dp_shard=2"], {"gpt": ["parallel.activation_checkpoint=full"]},
            [("entropy-hsdp", "entropy", ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
             ("dpar-ids", "dpar", ["parallel.dp_shard=2", "data.num_workers=2", *IDS]),
             ("gpt-accum", "gpt", ["parallel.dp_shard=2", "train.grad_accum=2", "train.ema=0.9"])]),
    "tp2": (2, TP2, {"gpt": ["parallel.compile=true"]},
            [(name, kind, [*TP2, *more]) for name, (kind, more) in DROPOUT_RUNS.items()]),
    "dp2tp2": (4, ["parallel.dp_shard=2", "parallel.tp=2"],
               {"dpar": ["parallel.activation_checkpoint=selective"], "entropy": ["train.grad_accum=2"]}, []),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return root, write_code_dataset(root / "codes")


@pytest.fixture(scope="module")
def references(workdir):
    """One-process runs of every kind (in this process: no process group)."""
    root, codes = workdir
    for kind in KINDS:
        Trainer(load_config(None, overrides(root / "single" / kind, codes, kind))).fit()
    return root / "single"


@functools.cache
def _launch(layout: str, root: Path, codes: Path) -> tuple[Path, str]:
    nproc, parallel, extra, extra_runs = LAYOUTS[layout]
    out = root / layout
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    if layout == "tp2":
        jobs.append({"job": "packed_sp", "out": str(out / "packed_sp.json")})
    for kind in KINDS:
        jobs.append({"job": "train", "overrides": overrides(out / kind, codes, kind, *parallel, *extra.get(kind, []))})
    for name, kind, more in extra_runs:
        jobs.append({"job": "train", "overrides": overrides(out / name, codes, kind, *more)})
    if layout == "dp2":  # a TP degree the 2 launched processes cannot hold; a NaN on one rank only
        jobs.append({"job": "config_error", "out": str(out / "tp4_error.txt"),
                     "overrides": overrides(out / "bad", codes, "gpt", "parallel.tp=4")})
        jobs.append({"job": "nonfinite", "out": str(out / "nonfinite"), "step": 3, "rank": 1,
                     "overrides": overrides(out / "nan", codes, "gpt", "parallel.dp_shard=2", "train.log_every=2",
                                            "checkpoint.interval=1")})
    if layout == "dp2tp2":  # stop after 2 steps, resume to 4 (sharded optimizer state through DCP)
        first = overrides(out / "gpt-resumed", codes, "gpt", *parallel, "train.steps=2")
        jobs += [{"job": "train", "overrides": first},
                 {"job": "train", "overrides": overrides(out / "gpt-resumed", codes, "gpt", *parallel,
                                                         "checkpoint.resume=auto")}]
    (out / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(nproc, [str(WORKER), str(out / "jobs.json")])
    assert done.returncode == 0, f"torchrun {layout} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out, done.stderr


def launch(layout: str, workdir) -> Path:
    return _launch(layout, *workdir)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", KINDS)
def test_layout_matches_single_process(workdir, references, layout, kind):
    out = launch(layout, workdir)
    assert_same_run(references / kind, out / kind, kind)
    assert (out / kind / "config.yaml").is_file()
    ckpt = out / kind / "checkpoints" / "step-000004"
    assert (ckpt / "optimizer").is_dir() and (ckpt / "train_state.pt").is_file()
    # every rank wrote its own shard files; no full copy of the model anywhere in the checkpoint
    nproc = LAYOUTS[layout][0]
    for part in ("model", "optimizer"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(nproc)]
    assert not list(ckpt.rglob("*.safetensors"))


def test_fsdp_gradient_accumulation_matches_single_process(workdir, references):
    """FSDP2 with train.grad_accum=2 reduces the gradients once per optimizer step (the first micro-batch keeps
    them unsharded, set_requires_gradient_sync): the same training as one process taking the batch at once."""
    assert_same_run(references / "gpt", launch("dp2", workdir) / "gpt-accum", "gpt")


def test_foreach_ema_on_fsdp_shards_matches_single_process(workdir, references, tmp_path):
    """train.ema on FSDP2 (each rank lerps its own shards in one foreach op) holds the one-process EMA."""
    from dpar_scale.checkpoint.export import consolidated_weights

    root, codes = workdir
    Trainer(load_config(None, overrides(tmp_path / "ema", codes, "gpt", "train.grad_accum=2", "train.ema=0.9"))).fit()
    ema = [consolidated_weights(run / "checkpoints" / "step-000004", use_ema=True) for run in
           (tmp_path / "ema", launch("dp2", workdir) / "gpt-accum")]
    assert ema[0][2] == ema[1][2] == "ema"
    assert_same_weights(ema[1][0], ema[0][0], "gpt", 4)


def test_batch_workers_on_two_ranks_match_single_process(workdir, references):
    """dp_shard=2 with batches built ahead by 2 workers per rank trains like one process building them in the loop."""
    ref = [r for r in read_metrics(references / "dpar" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(launch("dp2", workdir) / "dpar-ids" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert_same_training([r[key] for r in got], [r[key] for r in ref], "dpar", 4, key, backward=key != "loss")


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(workdir):
    """Rank 1's loss turns NaN at step 3; losses are read at the log line (every 2 steps) and before each
    checkpoint (every step): both ranks stop at step 3's flush naming step 3, and no checkpoint holds it."""
    out = launch("dp2", workdir)
    messages = [(out / f"nonfinite.{rank}").read_text() for rank in (0, 1)]
    assert all(m.startswith("loss is nan at step 3; batch sample ids [") for m in messages), messages
    assert all("the last checkpoint (" in m and "step-000002" in m for m in messages), messages
    assert sorted(p.name for p in (out / "nan" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_hsdp_matches_single_process(workdir, references):
    out = launch("dp2", workdir)
    assert_same_run(references / "entropy", out / "entropy-hsdp", "entropy")


def test_resume_in_parallel_layout_matches_single_process(workdir, references):
    out = launch("dp2tp2", workdir)
    assert_same_run(references / "gpt", out / "gpt-resumed", "gpt")
    records = read_metrics(out / "gpt-resumed" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def dropout_references(workdir):
    """One-process runs with dropout on, and the static-patch DPAR without it."""
    root, codes = workdir
    for name, (kind, more) in DROPOUT_RUNS.items():
        Trainer(load_config(None, overrides(root / "single" / name, codes, kind, *more))).fit()
    Trainer(load_config(None, overrides(root / "single" / "dpar-static", codes, "dpar", *STATIC))).fit()
    return root / "single"


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("name", list(DROPOUT_RUNS))
def test_tensor_parallel_with_dropout_matches_single_process(workdir, references, dropout_references, name):
    """Sequence-parallel shards draw their slice of the whole sequence's mask, replicated regions the same mask on
    every rank: tp=2 trains exactly what one process trains, dropout included."""
    out = launch("tp2", workdir)
    assert_same_run(dropout_references / name, out / name, DROPOUT_RUNS[name][0])
    without = references / "gpt" if name == "gpt-dropout" else dropout_references / "dpar-static"
    # dropout acts (from step 2: the zero-initialised head gives every model the same first loss)
    assert all(a != b for a, b in zip(train_losses(dropout_references / name)[1:], train_losses(without)[1:]))


def independent_step_flops(run: Path, codes: Path, sample_ids: list[int]) -> float:
    """Training FLOPs of one step from its logged samples: their entropies through the patch rule (not the
    trainer's batches), counted by the analytic formula."""
    import numpy as np

    from dpar_scale.data.loader import CodeData
    from dpar_scale.flops.analytic import train_flops
    from dpar_scale.models import resolve_model_config
    from dpar_scale.patching.rule import patch_lengths

    cfg = load_config(str(run / "config.yaml"))
    model = resolve_model_config(cfg.model)
    if model.kind != "dpar":
        return train_flops(model, batch_images=len(sample_ids))
    p = cfg.model.patch
    entropy = CodeData.open(str(codes), need_entropy=True).read_entropy(np.array(sample_ids))
    lengths = patch_lengths(entropy, width=model.grid[1], threshold=p.threshold, max_patch_length=p.max_patch_length,
                            mode=p.mode, alignment=p.alignment, static_length=p.static_length)
    return train_flops(model, batch_images=len(sample_ids), patch_lengths=lengths)


@pytest.mark.parametrize("layout,name", [("dp2", "dpar-ids"), ("tp2", "dpar-dropout")])
def test_per_device_flops_add_up_to_the_step(workdir, layout, name):
    """MFU's numerator: the step's FLOPs over all devices. Under tp=2 the two ranks of a TP group share one batch,
    so each is credited half of it (crediting each with the whole batch doubled MFU); under dp=2 the ranks' own
    batches, with their own patch counts, add up."""
    out = launch(layout, workdir)
    nproc = LAYOUTS[layout][0]
    rows = [r for r in read_metrics(out / name / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4
    for row in rows:
        expected = independent_step_flops(out / name, workdir[1], row["sample_ids"])
        assert row["flops_per_device"] * nproc == pytest.approx(expected, rel=1e-12)


def test_sequence_sharded_dropout_is_the_unsharded_dropout():
    """The two shards of a sequence-parallel activation, each dropped by its rank from the same RNG state, are the
    one-process dropout of the whole tensor (distinct masks per shard), and leave the RNG where it leaves it."""
    import torch
    import torch.nn.functional as F

    from dpar_scale.parallel.tensor_parallel import SequenceShardedDropout

    x = torch.randn(3, 10, 8)
    torch.manual_seed(5)
    whole = F.dropout(x, 0.25, training=True)
    after = torch.rand(4)
    shards = []
    for rank, part in enumerate(x.chunk(2, dim=1)):
        torch.manual_seed(5)
        shards.append(SequenceShardedDropout(0.25, rank, 2)(part))
        assert torch.equal(torch.rand(4), after)
    assert torch.equal(torch.cat(shards, dim=1), whole)
    assert not torch.equal(shards[0] == 0, shards[1] == 0)
    part = x[:, :5]
    assert SequenceShardedDropout(0.25, 0, 2).eval()(part) is part  # evaluation: no dropout


def test_packed_sequence_parallel_with_ragged_patch_counts(workdir):
    """TP=2 + SP over packed global sequences of different lengths, one of which needed padding."""
    out = launch("tp2", workdir)
    results = json.loads((out / "packed_sp.json").read_text())
    # the authors' structure (global state before every decoder layer) and the legacy one (once, + FFN)
    assert [r["structure"] for r in results] == ["every"] * 3 + ["first"] * 3
    assert [r["positions"] for r in results] == [25, 22, 6] * 2
    assert [r["packed_length"] for r in results] == [26, 22, 6] * 2  # padded only to a multiple of tp
    assert results[0]["cu_seqlens"] == [0, 8, 13, 22, 25]  # image boundaries are not moved by the padding
    for r in results:
        # one forward / backward of the tiny DPAR (dim 32, SwiGLU hidden 256; 1 + 2 + 1 layers, the injection
        # before each decoder layer or the FFN after the cross-attention, + 2), sharded or not: float32 rounding of
        # the chain, relative to the logits' and the gradients' own scale
        assert r["logits_diff"] <= abs_tol(r["logits_scale"], reduction=256, depth=8), r
        assert r["max_grad_diff"] <= abs_tol(r["grad_scale"], reduction=256, depth=2 * 8), r
        assert r["grads_checked"] == r["params"] and r["sharded_params"] > 0


# ------------------------------------------------------------------------------------------ clear errors
def test_world_size_that_does_not_fit_the_layout_is_a_clear_error(workdir):
    """Under a real 2-process launch (the dp2 one; train.py's exit code 2 for a ConfigError is tested in
    tests/test_trainer.py)."""
    out = launch("dp2", workdir)
    message = (out / "tp4_error.txt").read_text()
    assert "world size 2 is not divisible by parallel.dp_replicate × parallel.tp = 1 × 4" in message


def test_parallel_dims_errors():
    from dpar_scale.parallel import ParallelDims

    assert ParallelDims(1, -1, 2, world_size=8).dp_shard == 4
    assert ParallelDims(2, -1, 1, world_size=8).dp_shard == 4
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.dp_replicate × parallel.tp"):
        ParallelDims(1, -1, 4, world_size=6)
    with pytest.raises(ConfigError, match=r"2 × 2 × 1 = 4, but 2 processes were launched"):
        ParallelDims(2, 2, 1, world_size=2)


def test_single_process_with_tp_is_a_clear_error(workdir, tmp_path):
    _, codes = workdir
    with pytest.raises(ConfigError, match="world size 1 is not divisible"):
        Trainer(load_config(None, overrides(tmp_path, codes, "gpt", "parallel.tp=2")))


@pytest.mark.parametrize("change, message", [
    (["model.n_heads=3", "model.dim=48"], "model.n_heads=3 is not divisible by parallel.tp=2"),
    (["model.vocab_size=33"], "model.vocab_size=33 is not divisible by parallel.tp=2"),
    (["model.grid=[3,3]"], "grid has 9 codes, not a multiple of parallel.tp=2"),
    (["model.ffn_multiple_of=3"], "FFN hidden width 87 is not divisible by parallel.tp=2"),
])
def test_tp_degree_that_does_not_divide_the_model_is_a_clear_error(change, message):
    from dpar_scale.models import resolve_model_config
    from dpar_scale.parallel import check_tp_compatible

    cfg = load_config(None, ["model.preset=dpar-tiny", "model.dim=32", "model.n_heads=4", "model.vocab_size=32",
                             "model.grid=[4,4]", *change])
    with pytest.raises(ConfigError, match=message):
        check_tp_compatible(resolve_model_config(cfg.model), 2)


def test_launch_environment_from_torchrun_slurm_or_nothing(monkeypatch):
    from dpar_scale.parallel import LaunchEnv

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded first, so teardown restores the original state (detect() writes
        monkeypatch.delenv(key)      # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_PORT under Slurm)
    assert (LaunchEnv.detect().rank, LaunchEnv.detect().world_size) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        LaunchEnv.detect()
    monkeypatch.setenv("MASTER_ADDR", "node01")
    env = LaunchEnv.detect()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 1, "slurm")
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "8"  # for torch's env:// rendezvous
    monkeypatch.setenv("RANK", "5")  # torchrun / deepspeed launcher variables win
    assert LaunchEnv.detect().rank == 5


def test_uneven_validation_shares_weight_padding_zero():
    import numpy as np

    from dpar_scale.data.loader import rank_share

    ids = np.arange(10, 15)
    parts = [rank_share(ids, r, 2) for r in range(2)]
    assert [p[0].tolist() for p in parts] == [[10, 11, 12], [13, 14, 13]]
    assert [p[1].tolist() for p in parts] == [[1, 1, 1], [1, 1, 0]]
    ids_small = np.arange(3)
    assert rank_share(ids_small, 3, 4)[1].tolist() == [0.0]  # an empty share still runs one (weightless) image


@pytest.mark.parametrize("injection, ffn, outside", [
    ("every", "false", {"tok_embeddings", "class_embedding", "dec_start", "norm", "output"}),
    ("first", "true", {"tok_embeddings", "class_embedding", "dec_start", "norm", "output", "global_to_local",
                       "global_to_local_norm"}),
])
def test_blocks_hold_the_per_layer_injection(injection, ffn, outside):
    """Checkpointing, compilation and FSDP wrap `transformer_blocks`: every decoder layer's global-state
    injection lives inside its block; only embeddings, the start vector, the head (and the single injection of
    decoder_injection=first) stay with the root. Full checkpointing computes the same logits and gradients."""
    import torch

    from dpar_scale.models import build_model
    from dpar_scale.parallel.parallelize import apply_activation_checkpointing, transformer_blocks
    from dpar_scale.patching.layout import PatchLayout

    cfg = load_config(None, ["model.preset=dpar-tiny", "model.dim=32", "model.n_heads=4", "model.vocab_size=32",
                             "model.num_classes=3", "model.grid=[4,4]", "model.dropout=0", "model.class_dropout=0",
                             "model.n_decoder_layers=2",
                             f"model.dpar.decoder_injection={injection}", f"model.dpar.cross_attn_ffn={ffn}"])
    torch.manual_seed(0)
    model, plain = build_model(cfg.model), build_model(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.output.weight.normal_(generator=g)
    plain.load_state_dict(model.state_dict())
    blocks = [getattr(parent, name) for parent, name in transformer_blocks(model)]
    inside = {id(p) for b in blocks for p in b.parameters()}
    assert {n.split(".")[0] for n, p in model.named_parameters() if id(p) not in inside} == outside
    assert len(blocks) == 1 + 1 + 2 + 2  # encoder, patch cross-attention, global, decoder
    apply_activation_checkpointing(model, "full")
    layout = PatchLayout.from_lengths([[1, 3, 4, 4, 4], [2] * 8], (4, 4))
    codes, labels = torch.randint(0, 32, (2, 16), generator=g), torch.tensor([0, 2])
    outs = []  # checkpointing replays the same ops on the same shapes: bit-identical, no tolerance
    for m in (model, plain):
        logits = m.train()(codes, labels, layout)
        logits.square().mean().backward()
        outs.append(logits.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name.replace("._checkpoint_wrapped_module", "")].grad,
                                   atol=0, rtol=0)
