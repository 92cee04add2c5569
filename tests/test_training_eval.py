"""Evaluation during training (eval.every): the trainer samples a balanced set with the KV-cached sampler on all
ranks and logs fid_domain / precision / recall / class_accuracy with train_flops; 2 processes (FSDP2, gloo) make
the same samples and the same metrics as 1; unsupported layouts are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_code_dataset
from parallel_helpers import REPO, overrides, torchrun
from tolerances import assert_close

from dpar_scale.config import ConfigError, load_config
from dpar_scale.data import shards as S
from dpar_scale.evaluation.domain_classifier import DomainClassifier, save_domain_classifier
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

WORKER = REPO / "tests" / "parallel_worker.py"
METRICS = ("fid_domain", "precision", "recall", "class_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Codes on a 4x4 grid decoded by a 2x2-block k-means tokenizer (8x8 images), a random-weight evaluator for
    those images and a reference npz."""
    from dpar_scale.tokenizer.kmeans import KMeansTokenizer

    root = tmp_path_factory.mktemp("training_eval")
    codes = write_code_dataset(root / "codes", entropy=False)
    KMeansTokenizer(torch.rand(32, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                    block_size=2).save(str(root / "tok.safetensors"))
    manifest = json.loads((codes / "manifest.json").read_text())
    manifest["tokenizer"] = {"name": "kmeans", "path": str(root / "tok.safetensors"), "sha256": ""}
    S.write_manifest(str(codes), manifest)
    torch.manual_seed(0)
    save_domain_classifier(root / "evaluator.pt", DomainClassifier({"class": 3}, 8, width=8),
                           {"heads": {"class": ["c0", "c1", "c2"]}})
    rng = np.random.default_rng(0)
    np.savez(root / "reference.npz", arr_0=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    return root, codes


def eval_overrides(root: Path, codes: Path, out: Path, kind: str, *extra: str) -> list[str]:
    return overrides(out, codes, kind, "eval.every=2", "eval.num_samples=10", "eval.batch_size=4",
                     f"eval.detector=domain:{root / 'evaluator.pt'}", f"eval.reference={root / 'reference.npz'}",
                     "eval.seed=3", "train.ema=0.9", "model.patch.mode=static", "model.patch.static_length=2",
                     *extra)


def eval_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_seconds" in r]


def sample_codes(run: Path, step: int) -> np.ndarray:
    with np.load(run / "eval" / f"step_{step:07d}" / "samples.npz") as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def runs(setup):
    root, codes = setup
    single = {kind: root / "single" / kind for kind in ("gpt", "dpar")}
    for kind, out in single.items():
        Trainer(load_config(None, eval_overrides(root, codes, out, kind))).fit()
    jobs = [{"job": "train", "overrides": eval_overrides(root, codes, root / "dp2" / kind, kind,
                                                         "parallel.dp_shard=2")} for kind in single]
    jobs.append({"job": "config_error", "out": str(root / "tp2_error.txt"),
                 "overrides": eval_overrides(root, codes, root / "bad", "gpt", "parallel.tp=2")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(2, [str(WORKER), str(root / "jobs.json")])
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return root


@pytest.mark.parametrize("kind", ["gpt", "dpar"])
def test_eval_during_training_logs_the_metrics_and_flops(runs, kind):
    rows = eval_rows(runs / "single" / kind)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert set(METRICS) <= set(r) and "fid" not in r and r["eval_ema"] is True and r["eval_samples"] == 10
        assert r["fid_domain"] > 0 and 0 <= r["class_accuracy"] <= 1
    flops = [r["train_flops"] for r in rows]
    # every step of this run has the same analytic cost, so 4 steps cost twice 2 steps
    assert flops[0] > 0 and flops[1] == pytest.approx(2 * flops[0], rel=1e-12)
    labels = np.load(runs / "single" / kind / "eval" / "step_0000004" / "samples.npz")["labels"]
    assert np.bincount(labels).tolist() == [4, 3, 3]  # balanced


@pytest.mark.parametrize("kind", ["gpt", "dpar"])
def test_two_processes_make_the_same_samples_and_metrics(runs, kind):
    single, dp2 = eval_rows(runs / "single" / kind), eval_rows(runs / "dp2" / kind)
    assert [r["step"] for r in dp2] == [2, 4]
    for a, b in zip(single, dp2):
        np.testing.assert_array_equal(sample_codes(runs / "dp2" / kind, a["step"]),
                                      sample_codes(runs / "single" / kind, a["step"]))
        # same images: the metrics differ only by the detector's float rounding (features in another batch split)
        assert_close([b[k] for k in METRICS], [a[k] for k in METRICS], reduction=64, depth=8, msg=kind)
        assert b["train_flops"] == pytest.approx(a["train_flops"], rel=1e-12)


def test_tensor_parallel_is_refused(runs):
    assert "tensor parallelism" in (runs / "tp2_error.txt").read_text()


def test_eval_config_errors(setup, tmp_path):
    root, codes = setup
    with pytest.raises(ConfigError, match="eval.detector"):
        load_config(None, overrides(tmp_path, codes, "gpt", "eval.every=2"))
    with pytest.raises(ConfigError, match="more than 3 samples"):
        load_config(None, eval_overrides(root, codes, tmp_path, "gpt", "eval.num_samples=2"))
    with pytest.raises(ConfigError, match="class-conditional"):
        load_config(None, eval_overrides(root, codes, tmp_path, "entropy"))


def test_the_samples_come_from_the_ema_weights(runs):
    """Chunk 0 of the last evaluation equals what the checkpoint's EMA weights sample (and not its raw weights)."""
    from dpar_scale.checkpoint.export import consolidated_weights
    from dpar_scale.config import load_saved_config
    from dpar_scale.models import build_model
    from dpar_scale.sampling.generate import generate_gpt
    from dpar_scale.sampling.streams import sample_uniforms

    run = runs / "single" / "gpt"
    with np.load(run / "eval" / "step_0000004" / "chunks" / "chunk-000000.npz") as f:
        labels, logged = torch.from_numpy(f["labels"]), f["codes"]
    got = {}
    for ema in (True, False):
        model = build_model(load_saved_config(run / "config.yaml").model).eval()
        model.load_state_dict(consolidated_weights(run / "checkpoints" / "step-000004", use_ema=ema)[0])
        with torch.no_grad():
            got[ema] = generate_gpt(model, labels, uniforms=sample_uniforms(3, range(len(labels)), 16),
                                    cfg_scale=2.0).numpy()
    np.testing.assert_array_equal(logged, got[True])
    assert (logged != got[False]).any()
