"""The one trainer, for all three model kinds: learning, determinism, accumulation, resume, and bad input."""
import json
import math

import numpy as np
import pytest
import torch

from dpar_scale.checkpoint.save_load import list_checkpoints
from dpar_scale.checkpoint.export import load_model_for_inference
from dpar_scale.config import ConfigError, load_config
from dpar_scale.data.loader import GlobalOrder
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import NonFiniteLossError, Trainer

from conftest import write_code_dataset
from parallel_helpers import assert_same_training
from tolerances import abs_tol, magnitude, rel_tol

TINY = {"gpt": "model.n_layers=2", "entropy": "model.n_layers=2", "dpar": "model.n_global_layers=1"}


def make_cfg(tmp_path, codes, kind, *extra):
    overrides = [
        f"run.output_dir={tmp_path / kind}", f"data.codes_dir={codes}", f"model.kind={kind}",
        f"model.preset={'dpar-tiny' if kind == 'dpar' else 'gpt-tiny'}", "model.dim=32", "model.n_heads=2",
        TINY[kind], "model.vocab_size=32", "model.num_classes=3", "model.grid=[4,4]", "model.dropout=0.0",
        "model.class_dropout=0.0", "model.patch.threshold=2.0", "model.patch.max_patch_length=4",
        "data.batch_size=8", "data.val_fraction=0.125", "optim.lr=3e-3", "train.steps=12", "train.log_every=4",
        "train.val_batches=2", "train.progress_bar=false", "wandb.enabled=false", *extra]
    return load_config(None, overrides)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("kind", ["gpt", "entropy", "dpar"])
def test_each_kind_learns_and_writes_its_run_folder(tmp_path, code_dataset, kind):
    cfg = make_cfg(tmp_path, code_dataset, kind, "train.steps=40", "train.log_every=1")
    result = Trainer(cfg).fit()
    run = tmp_path / kind
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert all({"lr", "grad_norm", "codes_per_s", "images_per_s", "global_positions_per_s"} <= set(r) for r in train)
    # ln(32) = 3.47 at initialisation: the output head starts at zero, so every logit is exactly 0 and the loss is
    # the mean of 128 float32 values of ln 32; half the codes repeat their predecessor, so it learns.
    assert abs(train[0]["loss"] - math.log(32)) <= abs_tol(math.log(32), reduction=8 * 16)
    assert np.mean([r["loss"] for r in train[-5:]]) < train[0]["loss"] - 0.5
    assert any("val_loss" in r for r in records) and result["val_loss"] < math.log(32)
    saved = load_config(run / "config.yaml")
    assert saved.model.dim == 32 and saved.model.n_heads == 2
    model, cfg2 = load_model_for_inference(result["checkpoint"])
    assert cfg2.model.kind == kind
    if kind == "dpar":
        lengths = [r["mean_patch_length"] for r in train]
        assert all(1.0 < m <= 4.0 for m in lengths)


def test_training_is_deterministic(tmp_path, code_dataset):
    a = make_cfg(tmp_path / "a", code_dataset, "dpar", "model.class_dropout=0.1", "model.dropout=0.1")
    b = make_cfg(tmp_path / "b", code_dataset, "dpar", "model.class_dropout=0.1", "model.dropout=0.1")
    Trainer(a).fit()
    Trainer(b).fit()
    assert losses(tmp_path / "a" / "dpar") == losses(tmp_path / "b" / "dpar")


@pytest.mark.parametrize("kind", ["gpt", "dpar"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, code_dataset, kind):
    one = make_cfg(tmp_path / "one", code_dataset, kind, "train.log_every=1")
    two = make_cfg(tmp_path / "two", code_dataset, kind, "train.grad_accum=2", "train.log_every=1")
    Trainer(one).fit()
    Trainer(two).fit()
    # one batch of 8 or two of 4: the same sums in another order, through 12 steps
    assert_same_training(losses(tmp_path / "two" / kind), losses(tmp_path / "one" / kind), kind, 12)


def test_resume_continues_exactly(tmp_path, code_dataset):
    straight = make_cfg(tmp_path / "straight", code_dataset, "dpar", "train.log_every=1", "train.ema=0.9",
                        "data.log_sample_ids=true", "model.class_dropout=0.1")
    Trainer(straight).fit()
    first = make_cfg(tmp_path / "split", code_dataset, "dpar", "train.log_every=1", "train.ema=0.9",
                     "data.log_sample_ids=true", "model.class_dropout=0.1", "train.steps=5")
    Trainer(first).fit()
    second = make_cfg(tmp_path / "split", code_dataset, "dpar", "train.log_every=1", "train.ema=0.9",
                      "data.log_sample_ids=true", "model.class_dropout=0.1", "checkpoint.resume=auto")
    trainer = Trainer(second)
    assert trainer.state.step == 5 and trainer.state.samples_seen == 40
    trainer.fit()
    a = read_metrics(tmp_path / "straight" / "dpar" / "metrics.jsonl")
    b = read_metrics(tmp_path / "split" / "dpar" / "metrics.jsonl")
    step_a = {r["step"]: r for r in a if "loss" in r}
    step_b = {r["step"]: r for r in b if "loss" in r}
    for step in range(1, 13):
        assert step_a[step]["loss"] == step_b[step]["loss"], step
        assert step_a[step]["sample_ids"] == step_b[step]["sample_ids"]


def test_sample_order_is_a_pure_function_of_seed_and_position():
    ids = np.arange(10, 30)
    order = GlobalOrder(ids, seed=3)
    epoch0 = order.ids(0, 20)
    assert sorted(epoch0.tolist()) == ids.tolist()  # one epoch is a permutation of the split
    assert order.ids(5, 20).tolist() == GlobalOrder(ids, seed=3).ids(5, 20).tolist()
    assert order.ids(5, 20)[:15].tolist() == epoch0[5:].tolist()
    assert order.ids(0, 20).tolist() != GlobalOrder(ids, seed=4).ids(0, 20).tolist()


def test_keep_last_retention(tmp_path, code_dataset):
    cfg = make_cfg(tmp_path, code_dataset, "gpt", "checkpoint.interval=2", "checkpoint.keep_last=2")
    Trainer(cfg).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "gpt")] == ["step-000010", "step-000012"]


def test_nonfinite_loss_names_step_and_samples_and_keeps_checkpoint(tmp_path, code_dataset):
    cfg = make_cfg(tmp_path, code_dataset, "gpt", "checkpoint.interval=2", "data.log_sample_ids=true")
    trainer = Trainer(cfg)
    forward = trainer.model.forward

    def poisoned(codes, labels=None, layout=None):
        out = forward(codes, labels, layout)
        return out * float("nan") if trainer.state.step == 4 else out

    trainer.model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5; batch sample ids \[") as err:
        trainer.fit()
    assert "step-000004" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "gpt")] == ["step-000002", "step-000004"]


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=64", "model.vocab_size=32"),
    ("model.grid=[8,2]", r"model.grid=\[4, 4\]"),
    ("model.num_classes=2", "model.num_classes=3"),
])
def test_config_that_does_not_fit_the_data(tmp_path, code_dataset, override, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(make_cfg(tmp_path, code_dataset, "gpt", override))


def test_missing_data_and_entropies_are_clear_errors(tmp_path):
    from dpar_scale.data.shards import ShardError

    with pytest.raises(ShardError, match=f"code shards folder '{tmp_path / 'nowhere'}' does not exist"):
        Trainer(make_cfg(tmp_path, tmp_path / "nowhere", "gpt"))
    codes = write_code_dataset(tmp_path / "noent", entropy=False)
    with pytest.raises(FileNotFoundError, match="compute_entropy"):
        Trainer(make_cfg(tmp_path, codes, "dpar"))
    # a static layout needs no entropies: tests/test_patch_modes.py trains one on these codes


def test_bf16_autocast_trains_like_fp32(tmp_path, code_dataset):
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(make_cfg(tmp_path / precision, code_dataset, "dpar", f"train.precision={precision}",
                                   "train.log_every=1"))
        trainer.fit()
        runs[precision] = losses(tmp_path / precision / "dpar")
    # Under autocast the matmuls read bfloat16-rounded inputs (relative error eps_bf16 / 2 each) and accumulate in
    # float32, so a logit is off by ~eps_bf16 of the logits' scale, and a cross-entropy by at most twice its
    # logits' error. The logits' scale is that of the fp32 model (≈ 0.9 after 12 steps).
    batch = trainer.source.make(trainer.order.ids(0, 8))
    with torch.no_grad():
        logits = trainer.model.eval()(**trainer.model_inputs(batch))
    tol = 2 * abs_tol(magnitude(logits), dtype=torch.bfloat16)
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=0, atol=tol)
    assert runs["bf16"] != runs["fp32"]  # bf16 was in use: the rounding shows
    assert runs["bf16"][-1] < runs["bf16"][0] - 2 * tol  # and it learns, by more than rounding (fp32: ≈ 0.13)


def train_py():
    """train.py as a module: its main(argv) is the command line's (exit code, stdout / stderr)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_entry", Path(__file__).resolve().parents[1] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_py_entry_point(tmp_path, code_dataset, capsys):
    import subprocess
    import sys

    args = ["train.py", f"run.output_dir={tmp_path / 'cli'}", f"data.codes_dir={code_dataset}",
            "model.kind=gpt", "model.preset=gpt-tiny", "model.dim=32", "model.n_heads=2", "model.n_layers=1",
            "model.vocab_size=32", "model.num_classes=3", "model.grid=[4,4]", "train.steps=2", "data.batch_size=4",
            "wandb.enabled=false", "train.progress_bar=false"]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)  # the real command line
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 2
    # bad input: exit code 2 and the reason (main() in this process: the same code, without a second start-up)
    main = train_py().main
    assert main(args[1:] + ["model.vocab_size=33"]) == 2 and "model.vocab_size=32" in capsys.readouterr().err
    assert main(args[1:] + ["train.stepz=3"]) == 2 and "train.stepz" in capsys.readouterr().err


def test_logs_achieved_tflops_and_mfu_of_the_flops_the_step_ran(tmp_path, code_dataset):
    from dpar_scale.data.loader import BatchSource, CodeData
    from dpar_scale.flops.counting import count_ops
    from dpar_scale.patching.layout import PatchLayout

    cfg = make_cfg(tmp_path, code_dataset, "dpar", "train.log_every=1", "train.steps=2", "train.peak_tflops=0.5",
                   "data.log_sample_ids=true")
    trainer = Trainer(cfg)
    trainer.fit()
    record = [r for r in read_metrics(tmp_path / "dpar" / "metrics.jsonl") if "loss" in r][0]
    # The logged step's real batch (its sample ids, its patch lengths): count what its forward and backward
    # dispatch (torch's FlopCounterMode over the trained model's ops, attention pairs from the masks), each image
    # in its own pass so that padding is not counted (model FLOPs, as MFU is defined).
    batch = BatchSource(CodeData.open(str(code_dataset), need_entropy=True), trainer.cfg.model.patch).make(
        np.array(record["sample_ids"]))
    counted = 0.0
    for i, lengths in enumerate(batch.patch_lengths):
        ops = count_ops(trainer.model, batch.codes[i:i + 1], batch.labels[i:i + 1],
                        PatchLayout.from_lengths([lengths], (4, 4)), fvcore=False, backward=True)
        counted += ops["FlopCounterMode"].total + ops["backward"].total
    # achieved FLOP/s × step time = the step's FLOPs, and MFU × peak (0.5 TFLOP/s) × step time too: a few float64
    # roundings of the division and the products
    step_time = record["step_time_s"]
    assert abs(record["tflops"] * 1e12 * step_time - counted) <= rel_tol(depth=4, dtype=torch.float64) * counted
    assert abs(record["mfu"] * 0.5e12 * step_time - counted) <= rel_tol(depth=4, dtype=torch.float64) * counted


def test_mfu_is_measured_against_the_peak_of_the_precision_in_use(tmp_path, code_dataset, monkeypatch):
    """No GPU here: the peak lookup is replaced by a table of distinct numbers, so the logged MFU says which
    precision's peak the trainer asked for (the real table per GPU name is tested in test_flops.py)."""
    from dpar_scale.train import trainer as trainer_module

    peaks = {"bf16": 4e9, "tf32": 2e9, "fp32": 1e9}
    asked = []

    def fake_peak(device, *, precision, override=None):
        asked.append(precision)
        return peaks[precision]

    monkeypatch.setattr(trainer_module, "peak_flops", fake_peak)
    for extra, precision in ((["train.tf32=false"], "fp32"), ([], "tf32"), (["train.precision=bf16"], "bf16")):
        cfg = make_cfg(tmp_path / precision, code_dataset, "gpt", "train.steps=1", "train.log_every=1", *extra)
        Trainer(cfg).fit()
        assert torch.backends.cuda.matmul.allow_tf32 == cfg.train.tf32  # the trainer applied train.tf32
        record = [r for r in read_metrics(tmp_path / precision / "gpt" / "metrics.jsonl") if "loss" in r][0]
        assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / peaks[precision], rel=1e-9)
    assert asked == ["fp32", "tf32", "bf16"]


def test_position_budget_packing_varies_images_and_keeps_the_data_order(tmp_path, code_dataset):
    from dpar_scale.data.packing import padded

    extra = ["data.global_tokens_per_microbatch=40", "train.grad_accum=2", "train.log_every=1",
             "data.log_sample_ids=true", "train.steps=6"]
    trainer = Trainer(make_cfg(tmp_path / "straight", code_dataset, "dpar", *extra))
    seen_sizes = []
    cursor = 0
    for _ in range(3):
        batches, step_ids = trainer.step_batches()
        consumed = len(step_ids)
        ids = np.concatenate([b.sample_ids.numpy() for b in batches])
        assert ids.tolist() == step_ids.tolist() == trainer.order.ids(cursor, consumed).tolist()  # in order, no gaps
        for b in batches:
            assert padded(b.num_patches + len(b.codes), 1) <= 40
            seen_sizes.append(len(b.codes))
        cursor += consumed
        trainer.state.samples_seen = cursor
    assert len(set(seen_sizes)) > 1  # images per micro-batch follow the patch counts
    trainer.state.samples_seen = 0
    trainer.fit()
    # resume from the cursor reproduces the same batches and losses
    Trainer(make_cfg(tmp_path / "split", code_dataset, "dpar", *extra[:-1], "train.steps=3")).fit()
    Trainer(make_cfg(tmp_path / "split", code_dataset, "dpar", *extra[:-1], "train.steps=6",
                     "checkpoint.resume=auto")).fit()
    a = [r for r in read_metrics(tmp_path / "straight" / "dpar" / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "split" / "dpar" / "metrics.jsonl") if "loss" in r]
    assert [r["sample_ids"] for r in a] == [r["sample_ids"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    with pytest.raises(ConfigError, match="global_tokens_per_microbatch"):
        Trainer(make_cfg(tmp_path / "gpt", code_dataset, "gpt", "data.global_tokens_per_microbatch=40"))


def test_class_dropout_is_a_function_of_sample_and_step():
    from dpar_scale.config import ModelConfig
    from dpar_scale.models import build_model, resolve_model_config
    from dpar_scale.models.layers import class_drop_mask

    ids = torch.arange(20000)
    mask = class_drop_mask(ids, step=3, seed=0, prob=0.1)
    assert abs(mask.double().mean().item() - 0.1) <= 5 * math.sqrt(0.1 * 0.9 / len(ids))  # 5 standard deviations
    assert torch.equal(mask[7:11], class_drop_mask(ids[7:11], 3, 0, 0.1))  # however the batch is split
    assert not torch.equal(mask, class_drop_mask(ids, 4, 0, 0.1))  # new decisions every step
    assert not torch.equal(mask, class_drop_mask(ids, 3, 1, 0.1))  # and per seed
    # the model replaces exactly the marked labels with the null class (training mode only)
    model = build_model(resolve_model_config(ModelConfig(kind="gpt", preset="gpt-tiny", dim=32, n_heads=2,
                                                         n_layers=1, vocab_size=32, num_classes=3, grid=(4, 4),
                                                         dropout=0.0, class_dropout=0.5)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.output.weight.copy_(torch.randn(model.output.weight.shape, generator=g))
    codes, labels = torch.randint(0, 32, (2, 16), generator=g), torch.tensor([1, 2])
    drop = torch.tensor([True, False])
    with torch.no_grad():
        got = model.train()(codes, labels, drop_class=drop)
        want = model.eval()(codes, torch.tensor([3, 2]))
        assert torch.equal(got, want)
        assert torch.equal(model.eval()(codes, labels, drop_class=drop), model(codes, labels))  # eval: no drop
