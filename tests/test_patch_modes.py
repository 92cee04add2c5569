"""The patch modes other than the default, end to end: DPAR trains under model.patch.mode=static and
model.patch.mode=global+monotonic, the trained model samples, and the sampler's patches are the rule's.

Tiny runs on the conftest codes (4x4 grid, 32 codes, code 0 = the class); a few seconds each.
"""
import json
import math

import numpy as np
import torch

from dpar_scale.checkpoint.export import load_model_for_inference
from dpar_scale.data.side_arrays import open_side_array
from dpar_scale.patching.entropy import code_entropies
from dpar_scale.patching.layout import static_lengths
from dpar_scale.patching.rule import patch_lengths
from dpar_scale.sampling.generate import generate_dpar
from dpar_scale.sampling.streams import sample_uniforms
from dpar_scale.train.metrics_log import read_metrics
from dpar_scale.train.trainer import Trainer

from conftest import write_code_dataset
from test_entropy_tools import tool
from test_trainer import make_cfg
from tolerances import abs_tol

LABELS = torch.arange(24) % 3


def train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def sample_both_ways(model, entropy_model, patch_cfg, seed=0):
    """(codes, patch lengths) of the KV-cached sampler, after checking that the uncached one draws the same."""
    uniforms = sample_uniforms(seed, range(len(LABELS)), 16)
    runs = [generate_dpar(model, entropy_model, LABELS, patch_cfg=patch_cfg, use_cache=cached, uniforms=uniforms)
            for cached in (True, False)]
    (codes, lengths), (ref_codes, ref_lengths) = runs
    assert torch.equal(codes, ref_codes) and lengths == ref_lengths
    return codes, lengths


def test_static_mode_trains_and_samples(tmp_path):
    codes = write_code_dataset(tmp_path / "codes", entropy=False)  # a static layout reads no entropies
    result = Trainer(make_cfg(tmp_path, codes, "dpar", "model.patch.mode=static", "model.patch.static_length=2",
                              "train.steps=40", "train.log_every=1")).fit()
    train = train_records(tmp_path / "dpar")
    # Every row of 4 codes is two patches of 2, in every image of every batch: 8 patches per 16 codes.
    assert [r["mean_patch_length"] for r in train] == [2.0] * 40
    # The output head starts at zero, so the first loss is ln 32 up to float32 rounding of a mean of 128 terms;
    # then it learns (half the codes repeat their predecessor, code 0 is the class).
    assert abs(train[0]["loss"] - math.log(32)) <= abs_tol(math.log(32), reduction=128)
    assert np.mean([r["loss"] for r in train[-5:]]) < train[0]["loss"] - 0.5

    model, cfg = load_model_for_inference(result["checkpoint"])
    assert (cfg.model.patch.mode, cfg.model.patch.static_length) == ("static", 2)
    sampled, lengths = sample_both_ways(model, None, cfg.model.patch)  # no entropy model needed
    assert lengths == [static_lengths((4, 4), 2)] * len(LABELS)
    # The samples are the trained model's: it draws the class as code 0 (as in every training image) far more
    # often than chance (1 in 32) would, p < 1e-3 under a binomial law.
    hits, n, p = int((sampled[:, 0] == LABELS).sum()), len(LABELS), 1 / 32
    assert sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(hits, n + 1)) < 1e-3, hits


def test_global_plus_monotonic_trains_and_samples_with_the_patchers_boundaries(tmp_path):
    codes = write_code_dataset(tmp_path / "codes", entropy=False)
    entropy_ckpt = Trainer(make_cfg(tmp_path, codes, "entropy", "train.steps=15")).fit()["checkpoint"]
    assert tool("compute_entropy").main(["--checkpoint", entropy_ckpt, "--codes", str(codes)]) == 0
    stored = torch.from_numpy(open_side_array(str(codes / "entropy"))[np.arange(64)].astype(np.float32))
    # θ_rel: the median rise between neighbouring entropies; θ: calibrated by the tool for that θ_rel
    rises = stored[:, 1:] - stored[:, :-1]
    rel = float(rises[rises > 0].median())
    assert tool("calibrate_threshold").main([
        "--entropy", str(codes / "entropy"), "--target-mean-length", "1.6", "--max-patch-length", "4",
        "--mode", "global+monotonic", "--relative-threshold", str(rel), "--json", str(tmp_path / "theta.json")]) == 0
    theta = json.loads((tmp_path / "theta.json").read_text())["threshold"]

    def rule(entropy, **change):
        spec = dict(width=4, threshold=theta, max_patch_length=4, mode="global+monotonic", relative_threshold=rel)
        return patch_lengths(entropy, **{**spec, **change})

    # Both signals shape the patches of these entropies: either one alone cuts others.
    assert rule(stored) != rule(stored, mode="global", relative_threshold=None)
    assert rule(stored) != rule(stored, mode="monotonic", threshold=rel, relative_threshold=None)

    result = Trainer(make_cfg(tmp_path, codes, "dpar", "model.patch.mode=global+monotonic",
                              f"model.patch.threshold={theta}", f"model.patch.relative_threshold={rel}",
                              "train.steps=20", "train.log_every=1", "data.log_sample_ids=true")).fit()
    train = train_records(tmp_path / "dpar")
    for r in train:  # every step's batch was cut by this rule on its images' stored entropies
        assert r["mean_patch_length"] == 8 * 16 / sum(map(len, rule(stored[r["sample_ids"]]))), r["step"]
    assert np.mean([r["loss"] for r in train[-5:]]) < train[0]["loss"] - 0.2

    model, cfg = load_model_for_inference(result["checkpoint"])
    entropy_model, _ = load_model_for_inference(entropy_ckpt)
    assert (cfg.model.patch.mode, cfg.model.patch.relative_threshold) == ("global+monotonic", rel)
    sampled, lengths = sample_both_ways(model, entropy_model, cfg.model.patch, seed=1)
    # The boundaries chosen while sampling are the patcher's on the final codes (what training would cut).
    entropies = code_entropies(entropy_model, sampled)
    assert lengths == rule(entropies)
    assert lengths != rule(entropies, mode="global", relative_threshold=None)
