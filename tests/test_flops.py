"""FLOP accounting: fvcore, FlopCounterMode and the analytic formula agree, and their attention counts equal a
brute-force count over each call's mask; the probe (one layer per stack) equals a full count; a real backward costs
2 x forward, so training = 3 x forward; layouts of a given mean length are valid; the paper's saving is reproduced.

FLOP counts are sums of integers far below 2^53, exact in float64: they are compared with ==."""
import dataclasses
import importlib.util
import json
import os
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from dpar_scale.flops import counting as C
from dpar_scale.flops import analytic as F
from dpar_scale.config import DPARConfig, ModelConfig
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.models.attention import AttentionMask
from dpar_scale.patching.rule import patch_lengths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (4, 6)  # N = 24 codes, rows of 6
# Three images with unequal patch counts (9, 24 and 8 patches): packed global lengths 10, 25, 9.
LENGTHS = [[1, 2, 3, 4, 2, 4, 2, 4, 2], [1] * 24, [1, 4, 1, 4, 4, 4, 3, 3]]


def small_cfg(kind="dpar", **kw):
    depth = dict(n_encoder_layers=2, n_global_layers=3, n_decoder_layers=2) if kind == "dpar" else dict(n_layers=3)
    base = dict(kind=kind, dim=64, n_heads=4, grid=GRID, vocab_size=96, num_classes=10, dropout=0.0,
                class_dropout=0.0, **depth)
    base.update(kw)
    return ModelConfig(**base)


def batch(cfg, lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    codes = torch.randint(0, cfg.vocab_size, (b, GRID[0] * GRID[1]), generator=gen)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=gen)
    layout = PatchLayout.from_lengths(lengths, GRID) if cfg.kind == "dpar" else None
    return codes, labels, layout


def brute_force_attention(model, codes, labels, layout, attention):
    """Attention FLOPs of one forward by group, counted without the counters' machinery: every call of the model's
    attention is intercepted, its boolean mask is materialised from the rule (query i of row b sees key j iff
    their ids are equal and the query's is not padding, and, counting "exact", j <= i + q_offset when causal) and
    its True pairs are counted, 2 FLOPs per multiply-add of QKᵀ (d_qk) and PV (d_v) per pair and head."""
    from torch import nn

    from dpar_scale.models import layers

    current, flops = [None], defaultdict(int)
    hooks = []
    for name, group in model.PARAM_GROUPS.items():
        module = getattr(model, name, None)  # some kinds lack some (an unconditional GPT has no class embedding)
        for m in (module if isinstance(module, nn.ModuleList) else [module]):
            if isinstance(m, nn.Module):
                hooks.append(m.register_forward_pre_hook(lambda *_, g=group: current.__setitem__(0, g)))
    real = layers.attend

    def counting(q, k, v, mask, backend="sdpa"):
        b, heads, lq, d_qk = q.shape
        lk = k.shape[2]
        ids = mask.q_ids is not None
        q_ids = mask.q_ids.numpy() if ids else np.zeros((1, lq), np.int64)
        kv_ids = mask.kv_ids.numpy() if ids else np.zeros((1, lk), np.int64)
        allowed = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
        if mask.causal and attention == "exact":
            allowed = allowed & (np.arange(lk)[None, None, :] <= np.arange(lq)[None, :, None] + mask.q_offset)
        pairs = int(allowed.sum()) * (b // allowed.shape[0])
        flops[current[0]] += 2 * pairs * heads * (d_qk + v.shape[-1])
        return real(q, k, v, mask, backend)

    layers.attend = counting
    try:
        with torch.no_grad():
            model(codes, labels, layout) if layout is not None else model(codes, labels)
    finally:
        layers.attend = real
        for h in hooks:
            h.remove()
    return dict(flops)


# ----------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("case", ["plain", "offset", "packed", "cross"])
def test_attention_pairs_match_the_dense_mask(case):
    gen = torch.Generator().manual_seed(1)
    if case == "plain":
        mask, b, lq, lk = AttentionMask(causal=True), 2, 7, 7
    elif case == "offset":
        mask, b, lq, lk = AttentionMask(causal=True, q_offset=5), 3, 2, 7
    elif case == "packed":  # three images of 4, 1 and 6 positions + 2 padding positions
        ids = torch.tensor([[0] * 4 + [1] + [2] * 6 + [-1] * 2])
        mask, b, lq, lk = AttentionMask(causal=True, q_ids=ids, kv_ids=ids), 1, 13, 13
    else:  # patch queries (-1 = padding patch) against their codes
        q_ids = torch.tensor([[0, 1, 2, -1], [0, 1, 2, 3]])
        kv_ids = torch.sort(torch.randint(0, 4, (2, 9), generator=gen)).values
        mask, b, lq, lk = AttentionMask(q_ids=q_ids, kv_ids=kv_ids), 2, 4, 9
    dense = mask.dense(lq, lk, "cpu").expand(b, 1, lq, lk)
    assert C.attention_pairs(mask, b, lq, lk, "exact") == int(dense.sum())
    full = dataclasses.replace(mask, causal=False, q_offset=0, _cache={})
    assert C.attention_pairs(mask, b, lq, lk, "full") == int(full.dense(lq, lk, "cpu").expand(b, 1, lq, lk).sum())
    if case == "packed":  # Σ L_i², not the padded T²
        assert C.attention_pairs(mask, b, lq, lk, "full") == 4 ** 2 + 1 ** 2 + 6 ** 2


# DPAR structures (model.dpar): the authors' (global state before every decoder layer, no FFN after the patch
# cross-attention; the default) and the legacy one
LEGACY = DPARConfig(decoder_injection="first", cross_attn_ffn=True)
KINDS = {"dpar": {}, "dpar-legacy": {"dpar": LEGACY}, "gpt": {}}


# --------------------------------------------------------------------------------- the three counts agree
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("attention", ["full", "exact"])
def test_fvcore_equals_analytic_and_flop_counter(kind, attention):
    cfg = small_cfg(kind.split("-")[0], **KINDS[kind])
    model, scale = C.counting_model(cfg, probe=False)
    codes, labels, layout = batch(cfg)
    counts = C.count_ops(model, codes, labels, layout, attention=attention, scale=scale)
    analytic = F.analytic_breakdown(cfg, batch_images=3, layout=layout, attention=attention, include_padding=True)
    brute = brute_force_attention(model, codes, labels, layout, attention)
    assert set(brute) == ({"encoder", "global", "decoder"} if kind.startswith("dpar") else {"global"})
    assert analytic.attention == brute
    for name in ("fvcore", "FlopCounterMode"):
        assert counts[name].groups() == analytic.groups(), name
        assert counts[name].attention == brute, name
    assert sum(analytic.attention.values()) > 0
    if kind.startswith("dpar"):  # the global stack's attention is Σ (M_i + 1)² pairs (full) of 4·d FLOPs, not T²
        lengths = [len(x) + 1 for x in LENGTHS]
        pairs = sum(L * L if attention == "full" else L * (L + 1) // 2 for L in lengths)
        assert counts["fvcore"].attention["global"] == 3 * pairs * 4 * cfg.dim
        assert counts["fvcore"].attention["global"] < 3 * sum(lengths) ** 2 * 4 * cfg.dim


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_count_equals_the_full_count(kind):
    cfg = small_cfg(kind.split("-")[0], **KINDS[kind])
    codes, labels, layout = batch(cfg)
    full_model, full_scale = C.counting_model(cfg, probe=False)
    probe_model, probe_scale = C.counting_model(cfg, probe=True)
    assert all(len(getattr(probe_model, c)) == 1 for c in probe_scale)
    full = C.count_ops(full_model, codes, labels, layout, scale=full_scale)
    probe = C.count_ops(probe_model, codes, labels, layout, scale=probe_scale)
    for name in full:
        assert probe[name].groups() == full[name].groups()


def test_per_image_forwards_count_no_padding():
    """measure() counts each image alone (model FLOPs); one batched forward also runs the padding patch queries."""
    cfg = small_cfg("dpar")
    alone = C.measure(cfg, patch_lengths=LENGTHS, probe=True)
    batched = C.measure(cfg, patch_lengths=LENGTHS, probe=True, per_image=False)
    assert alone.disagreement == 0 and batched.disagreement == 0
    assert alone.fvcore.total == F.forward_flops(cfg, batch_images=3, patch_lengths=LENGTHS)
    assert batched.fvcore.total > alone.fvcore.total  # 3 x 24 patch-query rows instead of 9 + 24 + 8


@pytest.mark.parametrize("kind", ["dpar", "gpt"])
def test_training_is_three_forwards(kind):
    """Backward matmul FLOPs (FlopCounterMode on a real backward) are exactly twice the forward's, so the analytic
    training count equals what a real forward + backward of the batch dispatches."""
    cfg = small_cfg(kind)
    model, _ = C.counting_model(cfg, probe=False)
    codes, labels, layout = batch(cfg)
    counts = C.count_ops(model, codes, labels, layout, fvcore=False, backward=True)
    fwd, bwd = counts["FlopCounterMode"], counts["backward"]
    assert sum(bwd.matmul.values()) == 2 * sum(fwd.matmul.values())
    assert sum(bwd.attention.values()) == 2 * sum(fwd.attention.values())
    assert sum(fwd.attention.values()) == sum(brute_force_attention(model, codes, labels, layout, "full").values())
    padded = dict(layout=layout, include_padding=True) if kind == "dpar" else {}  # one batched pass: padding ran
    assert F.train_flops(cfg, batch_images=3, **padded) == fwd.total + bwd.total


def test_no_merging_gives_one_global_position_per_code():
    """P_max = 1: every code is a patch, so DPAR's global stack runs over N patches (+ the class token) and costs
    more than the GPT; the patch cross-attention then has the encoder's shapes (ordered recording is needed)."""
    lengths = F.lengths_with_mean(GRID, 1.0, 1, batch_images=2)
    assert lengths == [[1] * 24] * 2
    dpar = C.measure(small_cfg("dpar"), patch_lengths=lengths)
    gpt = C.measure(small_cfg("gpt", n_layers=7), batch_images=2)
    assert dpar.global_positions_per_image == 24 + 1 and dpar.mean_patch_length == 1.0
    assert gpt.global_positions_per_image == 24
    assert dpar.disagreement == 0 and gpt.disagreement == 0
    assert dpar.fvcore.train_per_image() > gpt.fvcore.train_per_image()


def test_reduction_grows_with_mean_patch_length():
    grid = (16, 16)
    dpar, gpt = (ModelConfig(kind=k, preset=f"{k}-b", grid=grid) for k in ("dpar", "gpt"))
    base = F.train_flops(gpt, batch_images=1)
    reductions = []
    for mean in (1.0, 1.25, 1.5, 1.81, 2.0, 2.5, 3.0, 3.5):
        lengths = F.lengths_with_mean(grid, mean, 4, batch_images=4)
        reductions.append(1 - F.train_flops(dpar, batch_images=4, patch_lengths=lengths) / 4 / base)
    assert all(b > a for a, b in zip(reductions, reductions[1:])), reductions
    assert reductions[0] < 0 < reductions[-1]


@pytest.mark.parametrize("grid", [(16, 16), (24, 24), (4, 6)])
def test_layout_of_a_given_mean_length_is_valid(grid):
    h, w = grid
    n = h * w
    for p_max in (1, 2, 4):
        for mean in (1.0, 1.3, 1.81, 2.06, 2.5, 3.2):
            try:
                lengths = F.lengths_with_mean(grid, mean, p_max, batch_images=3)
            except ValueError as err:  # only when the mean is out of reach of row resets + P_max
                fewest = 1 + -(-(w - 1) // p_max) + (h - 1) * -(-w // p_max)  # patches per image, at least
                assert "not reachable" in str(err) and round(3 * n / mean) < 3 * fewest
                continue
            total = sum(map(len, lengths))
            assert abs(total - 3 * n / mean) <= 0.5  # the closest patch count
            for per_image in lengths:
                assert sum(per_image) == n and per_image[0] == 1 and max(per_image) <= p_max
                # the patch rule reproduces it: a start at k fires through e[k-1] > θ
                starts = torch.zeros(n, dtype=torch.bool)
                starts[np.cumsum([0] + per_image[:-1])] = True
                e = torch.zeros(1, n)
                e[0, :-1] = starts[1:].float() * 10
                assert patch_lengths(e, width=w, threshold=5.0, max_patch_length=p_max) == [per_image]


def test_paper_statistics_xl_384():
    """XL at 384 px, mean patch length 2.06, P_max 4: the paper reports 40.4% fewer training FLOPs."""
    grid = (24, 24)
    t0 = time.time()
    lengths = F.lengths_with_mean(grid, 2.06, 4)
    dpar = C.measure(ModelConfig(kind="dpar", preset="dpar-xl", grid=grid), patch_lengths=lengths)
    gpt = C.measure(ModelConfig(kind="gpt", preset="gpt-xl", grid=grid))
    dpar.check(0.02)
    gpt.check(0.02)
    reduction = 1 - dpar.fvcore.train_per_image() / gpt.fvcore.train_per_image()
    exact = 1 - (F.analytic_breakdown(ModelConfig(kind="dpar", preset="dpar-xl", grid=grid), patch_lengths=lengths,
                                      attention="exact").total
                 / F.analytic_breakdown(ModelConfig(kind="gpt", preset="gpt-xl", grid=grid), attention="exact").total)
    print(f"\nDPAR-XL vs LlamaGen-XL, 384 px, mean patch length {dpar.mean_patch_length:.4f}: training FLOPs "
          f"{gpt.fvcore.train_per_image() / 1e9:.1f} -> {dpar.fvcore.train_per_image() / 1e9:.1f} GFLOP/image = "
          f"{100 * reduction:.2f}% fewer (causal attention as L²; {100 * exact:.2f}% counting L(L+1)/2); "
          f"paper 40.4%; counted in {time.time() - t0:.1f}s")
    assert 0.37 <= reduction <= 0.45 and 0.37 <= exact <= 0.45
    assert dpar.global_positions_per_image == 280 + 1  # round(576 / 2.06) patches + the class token


# ---------------------------------------------------------------------------------------------- trainer API
def test_train_flops_api():
    cfg = small_cfg("dpar")
    counts = [len(x) for x in LENGTHS]
    by_lengths = F.train_flops(cfg, batch_images=3, patch_lengths=LENGTHS)
    assert F.train_flops(cfg, batch_images=3, num_patches=counts) == by_lengths
    assert F.train_flops(cfg, batch_images=3, num_patches=torch.tensor(counts)) == by_lengths
    layout = PatchLayout.from_lengths(LENGTHS, GRID, pad_to_multiple=4)
    assert F.train_flops(cfg, batch_images=3, layout=layout) == by_lengths  # useful work by default
    assert F.train_flops(cfg, batch_images=3, layout=layout, include_padding=True) > by_lengths
    with pytest.raises(ValueError, match="patch"):
        F.train_flops(cfg, batch_images=3)
    with pytest.raises(ValueError, match="batch_images"):
        F.train_flops(cfg, batch_images=2, patch_lengths=LENGTHS)
    gpt = small_cfg("gpt")
    assert F.train_flops(gpt, batch_images=4) == 4 * F.train_flops(gpt, batch_images=1)
    assert F.train_flops(ModelConfig(kind="entropy", preset="entropy-tiny", grid=GRID), batch_images=1) > 0
    tp = F.throughput(2e12, 2.0, peak=1e12)  # 2 TFLOP in 2 s on a 1 TFLOP/s device: exact in binary floats
    assert tp["tflops"] == 1.0 and tp["mfu"] == 1.0
    assert "mfu" not in F.throughput(2e12, 2.0, peak=None)


def test_peak_flops_table():
    assert F.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert F.peak_flops_for_name("NVIDIA H100 NVL") == 835e12
    assert F.peak_flops_for_name("NVIDIA H200") == 989e12
    assert F.peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert F.peak_flops_for_name("NVIDIA L40S") == 362e12
    assert F.peak_flops_for_name("NVIDIA L4") == 121e12
    assert F.peak_flops_for_name("AMD Instinct MI300X") == 1307e12
    assert F.peak_flops_for_name("NVIDIA GeForce GTX 1080") is None
    assert F.peak_flops("cpu") is None
    assert F.peak_flops("cpu", override=5e12) == 5e12


@pytest.mark.parametrize("name,bf16,tf32,fp32", [("NVIDIA H100 80GB HBM3", 989e12, 494.7e12, 66.9e12),
                                                 ("NVIDIA A100-SXM4-80GB", 312e12, 156e12, 19.5e12)])
def test_peak_of_the_precision_in_use(monkeypatch, name, bf16, tf32, fp32):
    """A GPU as torch would name it: bf16 runs are measured against the bf16 peak, fp32 runs against TF32's (TF32
    on, the default) or plain fp32's (train.tf32=false)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = {(p, t): F.peak_flops("cuda:0", precision=F.matmul_precision(p, t))
            for p in ("bf16", "fp32") for t in (True, False)}
    assert peak == {("bf16", True): bf16, ("bf16", False): bf16, ("fp32", True): tf32, ("fp32", False): fp32}
    assert F.peak_flops("cuda:0", precision="fp32", override=7e12) == 7e12  # train.peak_tflops wins
    with pytest.raises(ValueError, match="precision 'fp8' is not one of bf16, tf32, fp32"):
        F.peak_flops_for_name(name, "fp8")


# -------------------------------------------------------------------------------------------------- the tool
def _tool():
    spec = importlib.util.spec_from_file_location("tool_count_flops", os.path.join(ROOT, "tools", "count_flops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_flops_tool(tmp_path, capsys):
    tool = _tool()
    common = ["--model", "dpar-tiny", "--baseline", "gpt-tiny", "--image-size", "64", "--vocab", "96",
              "--classes", "10"]
    out = tmp_path / "flops.json"
    assert tool.main(common + ["--mean-patch-length", "1.8", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    lengths = F.lengths_with_mean((4, 4), 1.8, 4)  # round(16 / 1.8) = 9 patches
    assert rec["layout"]["mean_patch_length"] == 16 / 9
    for name in ("dpar-tiny", "gpt-tiny"):
        m = rec["models"][name]
        assert {"train_flops_per_image", "forward_flops_per_image", "global_positions_per_image", "params"} <= set(m)
        # the tool counts ops (fvcore); the analytic formula of the same model and layout must give the same
        cfg = ModelConfig(kind=name.split("-")[0], preset=name, grid=(4, 4), vocab_size=96, num_classes=10)
        assert m["train_flops_per_image"] == F.train_flops(cfg, batch_images=1, patch_lengths=lengths)
    assert rec["reduction"] == 1 - (rec["models"]["dpar-tiny"]["train_flops_per_image"]
                                    / rec["models"]["gpt-tiny"]["train_flops_per_image"])
    ent = np.random.default_rng(0).gamma(4.0, 2.0, size=(20, 16)).astype(np.float16)
    np.save(tmp_path / "ent.npy", ent)
    e = torch.from_numpy(ent.astype(np.float32))
    trained = {}
    for rule in (["--threshold", "8"], ["--threshold", "8", "--mode", "global+monotonic", "--relative-threshold", "3"]):
        assert tool.main(common + ["--entropies", str(tmp_path / "ent.npy"), *rule, "--batch-images", "3",
                                   "--json", str(out)]) == 0
        rec = json.loads(out.read_text())
        assert rec["layout"]["batch_images"] == 3 and rec["dataset"]["images"] == 20
        # the data set's patches are the rule's on the stored entropies
        expect = patch_lengths(e, width=4, threshold=8.0, max_patch_length=4, mode=rec["layout"]["mode"],
                               relative_threshold=3.0 if "--relative-threshold" in rule else None)
        assert rec["dataset"]["mean_patch_length"] == 20 * 16 / sum(map(len, expect))
        assert "fewer" in capsys.readouterr().out
        trained[rec["layout"]["mode"]] = rec["models"]["dpar-tiny"]["train_flops_per_image"]
    assert rec["layout"]["relative_threshold"] == 3.0
    assert tool.main(common + ["--entropies", str(tmp_path / "ent.npy"), "--mode", "global+monotonic"]) == 2
    assert "--relative-threshold (> 0) goes with --mode global+monotonic" in capsys.readouterr().err
    # the legacy structure: its own (larger: FFN after the cross-attention) count, the structure in the JSON
    assert tool.main(common + ["--entropies", str(tmp_path / "ent.npy"), "--threshold", "8", "--batch-images", "3",
                               "--dpar", "first,true", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["dpar_structure"] == {"decoder_injection": "first", "cross_attn_ffn": True}
    assert rec["models"]["dpar-tiny"]["train_flops_per_image"] > trained["global"]
    assert tool.main(common + ["--dpar", "all"]) == 2  # a user error: one line, exit 2
    assert "--dpar 'all': expected INJECTION,FFN" in capsys.readouterr().err


def test_disagreement_fails_loudly():
    cfg = small_cfg("gpt")
    m = C.measure(cfg, batch_images=1)
    m.check(0.02)
    bad = dataclasses.replace(m, fvcore=dataclasses.replace(m.fvcore, matmul={"global": 2 * m.fvcore.total}))
    bad.disagreement = max(F.max_disagreement(bad.analytic, bad.fvcore), m.disagreement)
    with pytest.raises(AssertionError, match="disagree"):
        bad.check(0.02)
