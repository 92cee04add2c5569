"""The step's data path and overheads: the train/validation split, batches built ahead by workers are the batches
built in the loop, the image cap of packed micro-batches, data_wait_s, the chunked cross-entropy and the foreach
EMA."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpar_scale.config import ConfigError
from dpar_scale.data.loader import BatchSource, CodeData, GlobalOrder
from dpar_scale.train.batches import StepBatches
from dpar_scale.train.ema import EMA
from dpar_scale.train.loss import code_loss_per_image
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.prefetch import Prefetcher
from dpar_scale.train.trainer import Trainer

from test_trainer import make_cfg
from tolerances import assert_close

PACKED = ["data.global_tokens_per_microbatch=40", "train.grad_accum=2"]


def step_batches(cfg, codes, dp_rank=0, dp_size=1):
    data = CodeData.open(str(codes), need_entropy=True, val_fraction=cfg.data.val_fraction)
    order = GlobalOrder(data.train_ids, seed=cfg.train.seed)
    return StepBatches(cfg, data, order, BatchSource(data, cfg.model.patch), dp_rank, dp_size, "cpu")


def assert_same_batches(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        for name in ("codes", "labels", "sample_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.patch_lengths == b.patch_lengths
        for f in dataclasses.fields(b.layout):
            x, y = getattr(a.layout, f.name), getattr(b.layout, f.name)
            assert torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y, f.name


def test_the_validation_images_are_spread_over_a_class_sorted_listing():
    """Extracted ImageFolder rows come class by class: the held-out images are spread over them (each class its
    share, the trainer's first validation batch already several classes), each with all its views, and every
    other row trains."""
    classes, per_class, views = 5, 40, 2
    labels = np.repeat(np.arange(classes), per_class * views)
    data = CodeData(np.zeros((len(labels), 16), dtype=np.int64), labels, grid=(4, 4), vocab_size=8,
                    num_classes=classes, copies_per_image=views, val_fraction=0.1)
    assert data.num_train_images == 180 and len(data.val_ids) == 20 * views
    assert sorted(np.concatenate([data.train_ids, data.val_ids]).tolist()) == list(range(len(labels)))
    assert set(np.bincount(data.val_ids // views).tolist()) == {0, views}  # an image's views stay together
    assert np.bincount(labels[data.val_ids], minlength=classes).tolist() == [4 * views] * classes
    assert len(set(labels[data.val_ids[:4 * views]].tolist())) >= 3


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "fixed"])
def test_workers_build_the_batches_the_loop_builds(tmp_path, code_dataset, packed):
    """Several steps in a row from the 2-worker pipeline (rank 1 of 2: its own slice), then a jump back to an
    earlier cursor (a resume): the same sample ids and the same tensors, layouts included, as building each step
    in the loop."""
    cfg = make_cfg(tmp_path, code_dataset, "dpar", *(PACKED if packed else ["train.grad_accum=2"]))
    batches = step_batches(cfg, code_dataset, dp_rank=1, dp_size=2)
    pipeline = Prefetcher(batches.plan, batches.build, lambda p: p.cursor + len(p.step_ids), workers=2, depth=2)
    cursors, cursor = [], 0
    try:
        for _ in range(5):
            plan, got, wait = pipeline.get(cursor)
            ref, ref_ids = batches.for_step(cursor)
            assert plan.step_ids.tolist() == ref_ids.tolist() and wait >= 0
            assert_same_batches(got, ref)
            cursors.append(cursor)
            cursor += len(ref_ids)
        assert pipeline.starts == 1  # built ahead along the cursor, not restarted per step
        if packed:
            assert len({c2 - c1 for c1, c2 in zip(cursors, cursors[1:])}) > 1  # steps of varying image counts
        # resume mid-run (the pipeline restarts at the cursor asked for), go on from there, jump back again
        for cursor in (cursors[2], cursors[3], cursors[1]):
            plan, got, _ = pipeline.get(cursor)
            ref, ref_ids = batches.for_step(cursor)
            assert plan.step_ids.tolist() == ref_ids.tolist()
            assert_same_batches(got, ref)
        assert pipeline.starts == 3
    finally:
        pipeline.close()


def test_an_error_while_building_ahead_reaches_the_loop(tmp_path, code_dataset):
    cfg = make_cfg(tmp_path, code_dataset, "dpar", *PACKED)
    batches = step_batches(cfg, code_dataset)

    def plan(cursor):
        if cursor > 0:
            raise RuntimeError(f"cannot read the shard at cursor {cursor}")
        return batches.plan(cursor)

    pipeline = Prefetcher(plan, batches.build, lambda p: p.cursor + len(p.step_ids), workers=2, depth=2)
    try:
        first, _, _ = pipeline.get(0)
        with pytest.raises(RuntimeError, match=f"at cursor {len(first.step_ids)}"):
            pipeline.get(len(first.step_ids))
    finally:
        pipeline.close()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "fixed"])
def test_training_with_workers_is_training_without_them(tmp_path, code_dataset, packed):
    """Same sample ids and bit-identical losses with 0 and 2 workers; a run stopped at step 3 and resumed with
    workers continues exactly. Every logged row has data_wait_s, a part of its step time."""
    extra = [*(PACKED if packed else []), "train.log_every=1", "data.log_sample_ids=true", "train.steps=6"]
    Trainer(make_cfg(tmp_path / "w0", code_dataset, "dpar", *extra)).fit()
    Trainer(make_cfg(tmp_path / "w2", code_dataset, "dpar", *extra, "data.num_workers=2")).fit()
    Trainer(make_cfg(tmp_path / "split", code_dataset, "dpar", *extra[:-1], "train.steps=3",
                     "data.num_workers=2")).fit()
    Trainer(make_cfg(tmp_path / "split", code_dataset, "dpar", *extra, "data.num_workers=2",
                     "checkpoint.resume=auto")).fit()
    runs = {name: [r for r in read_metrics(tmp_path / name / "dpar" / "metrics.jsonl") if "loss" in r]
            for name in ("w0", "w2", "split")}
    for name in ("w2", "split"):
        assert [r["sample_ids"] for r in runs[name]] == [r["sample_ids"] for r in runs["w0"]], name
        assert [r["loss"] for r in runs[name]] == [r["loss"] for r in runs["w0"]], name
    for rows in runs.values():
        assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in rows)


def test_packed_micro_batches_hold_at_most_the_image_cap(tmp_path, code_dataset):
    """data.max_images_per_microbatch closes a micro-batch at that many images even when the position budget has
    room; the images still come in global order, without gaps."""
    budget = ["data.global_tokens_per_microbatch=400", "train.grad_accum=2"]
    uncapped = step_batches(make_cfg(tmp_path, code_dataset, "dpar", *budget), code_dataset)
    assert max(len(ids) for ids, _ in uncapped.plan(0).micro) > 3  # the budget alone allows more
    capped = step_batches(make_cfg(tmp_path, code_dataset, "dpar", *budget, "data.max_images_per_microbatch=3"),
                          code_dataset)
    cursor = 0
    for _ in range(3):
        plan = capped.plan(cursor)
        assert [len(ids) for ids, _ in plan.micro] == [3, 3]
        assert np.concatenate([ids for ids, _ in plan.micro]).tolist() == capped.order.ids(cursor, 6).tolist()
        cursor += len(plan.step_ids)
    for bad in ("data.max_images_per_microbatch=-1", "data.num_workers=-1", "data.prefetch_steps=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            make_cfg(tmp_path, code_dataset, "dpar", bad)


def test_packed_plans_do_not_depend_on_how_many_entropies_the_planner_reads_at_once(tmp_path, code_dataset):
    """The planner reads entropies in chunks sized from the previous step; the plans are those of a planner that
    has planned nothing before (its first chunk: all the step can hold) and of one reading one image at a time."""
    cfg = make_cfg(tmp_path, code_dataset, "dpar", *PACKED)
    running, cursor = step_batches(cfg, code_dataset), 0
    for _ in range(6):
        plan = running.plan(cursor)
        assert running._chunk_hint < 4 * len(plan.step_ids)  # sized from what the step packed
        one_at_a_time = step_batches(cfg, code_dataset)
        one_at_a_time._chunk_hint = 1
        for other in (step_batches(cfg, code_dataset).plan(cursor), one_at_a_time.plan(cursor)):
            assert other.step_ids.tolist() == plan.step_ids.tolist() and other.global_flops == plan.global_flops
            assert [(ids.tolist(), lengths) for ids, lengths in other.micro] == [
                (ids.tolist(), lengths) for ids, lengths in plan.micro]
        cursor += len(plan.step_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_is_the_cross_entropy(dtype):
    """Chunks of 7 rows (not dividing the 6 x 9 rows) against F.cross_entropy in one piece: per-image sums and
    their gradient agree to float32 rounding; the chunked loss never holds more than a chunk in fp32."""
    g = torch.Generator().manual_seed(0)
    vocab = 300
    logits = (torch.randn(6, 9, vocab, generator=g) * 3).to(dtype)
    codes = torch.randint(0, vocab, (6, 9), generator=g)
    weight = torch.rand(6, generator=g)
    ref_in, got_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float().reshape(-1, vocab), codes.reshape(-1), reduction="none").view(6, 9).sum(1)
    got = code_loss_per_image(got_in, codes, chunk_elements=7 * vocab)
    (ref * weight).sum().backward()
    (got * weight).sum().backward()
    # a log-sum-exp over the vocabulary, then a sum over 9 codes
    assert_close(got, ref, reduction=vocab * 9, depth=2, msg="loss")
    assert got_in.grad.dtype == dtype
    assert_close(got_in.grad.float(), ref_in.grad.float(), reduction=vocab, depth=2, dtype=dtype, msg="gradient")


def test_foreach_ema_is_the_per_tensor_formula():
    """The foreach update against the old formula (shadow.lerp_(w.float(), 1 - decay) per tensor), fp32 and bf16
    weights and a non-float buffer, over several updates: bit-identical."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    model[1].to(torch.bfloat16)
    model.register_buffer("counter", torch.arange(3))
    ema = EMA(model, 0.9)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    assert "counter" not in ref and len(ref) == 4
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            if k in ref:
                ref[k].lerp_(v.float(), 1.0 - 0.9)
    for k in ref:
        assert torch.equal(ema.shadow[k], ref[k]), k


def test_losses_are_reduced_once_per_log_interval(tmp_path, code_dataset, monkeypatch):
    """The step's loss sums stay on the device: one all-reduce of a whole logging window's sums at its log line
    (12 steps, a line every 4: 3 reductions of 4 sums each), none inside the steps. (Packed: the step's FLOPs come
    from the plan; fixed-size DPAR batches would add one reduction of their FLOPs per line.)"""
    import dpar_scale.train.pending as pending

    calls = []
    real = pending.all_reduce_sum
    monkeypatch.setattr(pending, "all_reduce_sum", lambda values, group=None: calls.append(values.shape) or
                        real(values, group))
    trainer = Trainer(make_cfg(tmp_path, code_dataset, "dpar", *PACKED, "train.steps=12", "train.log_every=4"))
    trainer.train_step()
    assert calls == [] and "loss" not in trainer.pending.steps[0].record
    trainer.state = type(trainer.state)()  # back to step 0 (the model moved once: only counts are checked)
    trainer.pending.steps.clear()
    trainer.fit()
    assert calls == [torch.Size([4])] * 3


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "gpt"])
def test_step_flops_from_the_plan_are_the_batches_flops(tmp_path, code_dataset, packed):
    """The step's analytic FLOPs computed from the plan alone (no reduction over ranks) equal the sum over the
    micro-batches actually built, patch lengths included."""
    from dpar_scale.flops.analytic import train_flops

    kind = "dpar" if packed else "gpt"
    trainer = Trainer(make_cfg(tmp_path, code_dataset, kind, *(PACKED if packed else ["train.grad_accum=2"])))
    cursor = 0
    for _ in range(3):
        plan = trainer.batches.plan(cursor)
        built = trainer.batches.build(plan)
        expected = sum(train_flops(trainer.cfg.model, batch_images=len(b.codes), patch_lengths=b.patch_lengths,
                                   n_codes=b.codes.shape[1]) for b in built)
        assert plan.global_flops == pytest.approx(expected, rel=1e-12)
        cursor += len(plan.step_ids)
