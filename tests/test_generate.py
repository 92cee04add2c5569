"""Generation: the KV-cached samplers equal the uncached reference (the training forward on the whole prefix),
DPAR's on-the-fly patch boundaries equal the patcher's on the final codes, and the cache does linear work.

Tiny random-init float32 models in eval mode; every comparison is exact on codes and boundaries (the sampler
draws one uniform per image per code, so float rounding between the two paths cannot move a draw unless it lands
within ~1e-6 of a CDF step, which the fixed seeds here do not).
"""
import dataclasses

import pytest
import torch

from dpar_scale.config import PatchConfig
from dpar_scale.patching.entropy import code_entropies
from dpar_scale.sampling.generate import (GenerationStats, dpar_logits_cached, entropies_cached, generate_dpar,
                                          generate_gpt, gpt_logits_cached, sample_logits)
from dpar_scale.sampling.streams import sample_uniforms
from dpar_scale.patching.layout import PatchLayout, static_lengths
from dpar_scale.models import DPAR, GPT
from dpar_scale.models.attention import KVCache
from dpar_scale.patching.rule import patch_lengths
from sampling_fixtures import load_tool, randomize, write_sampling_setup
from tolerances import assert_close, model_chain

GRID = (6, 6)
N = GRID[0] * GRID[1]
VOCAB, CLASSES = 48, 5
COMMON = dict(dim=64, n_heads=4, vocab_size=VOCAB, grid=GRID, multiple_of=32, dropout=0.1, class_dropout=0.1)
LABELS = torch.tensor([0, 3, 4])
# DPAR models: (global_rope, model.dpar.decoder_injection, model.dpar.cross_attn_ffn); the authors' structure with
# both RoPEs, and the legacy one (the global state injected once, an FFN after the patch cross-attention)
DPAR_MODELS = {"dynamic": ("dynamic", "every", False), "1d": ("1d", "every", False),
               "legacy": ("dynamic", "first", True)}




@pytest.fixture(scope="module")
def models():
    gpt = randomize(GPT(n_layers=2, num_classes=CLASSES, **COMMON), 0)
    entropy = randomize(GPT(n_layers=2, num_classes=0, **COMMON), 1, scale=0.15)
    dpar = {name: randomize(DPAR(n_encoder_layers=1, n_global_layers=2, n_decoder_layers=2, num_classes=CLASSES,
                                 global_rope=rope, decoder_injection=injection, cross_attn_ffn=ffn, **COMMON), 2)
            for name, (rope, injection, ffn) in DPAR_MODELS.items()}
    # θ at the median entropy of random codes: boundaries both fire and stay quiet.
    codes = torch.randint(0, VOCAB, (16, N), generator=torch.Generator().manual_seed(3))
    theta = float(code_entropies(entropy, codes).median())
    return dict(gpt=gpt, entropy=entropy, dpar=dpar, theta=theta)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen(seed))


def streams(seed: int, b: int = 3) -> torch.Tensor:
    """The random streams of samples 0..b-1 of a run with this seed."""
    return sample_uniforms(seed, range(b), N)


# ------------------------------------------------------------------------------------ cached == full forward
def test_gpt_cached_logits_equal_forward(models):
    codes = torch.randint(0, VOCAB, (3, N), generator=gen(5))
    for model, labels in ((models["gpt"], LABELS), (models["gpt"], None), (models["entropy"], None)):
        with torch.no_grad():
            full = model(codes, labels)
        assert_close(gpt_logits_cached(model, codes, labels), full, **model_chain(model, N))
    # an entropy is a sum over the vocabulary of p·log p computed from those logits: one more reduction
    chain = model_chain(models["entropy"], max(N, VOCAB))
    assert_close(entropies_cached(models["entropy"], codes), code_entropies(models["entropy"], codes),
                 reduction=chain["reduction"], depth=chain["depth"] + 1)


def test_gpt_multi_position_prefill(models):
    # Several positions in one step (causal inside the new block) == one at a time == forward.
    model, codes = models["gpt"], torch.randint(0, VOCAB, (2, N), generator=gen(6))
    cache = model.new_cache(2)
    with torch.no_grad():
        first = model.step(cache, codes[:, :10], LABELS[:2])  # condition + codes 0..9 -> logits of codes 0..10
        rest = model.step(cache, codes[:, 10:N - 1])
        full = model(codes, LABELS[:2])
    assert_close(torch.cat([first, rest], 1), full, **model_chain(model, N))
    assert cache.length == N and cache.positions == 2 * N


def dpar_layouts():
    gen_ = torch.Generator().manual_seed(7)
    e = torch.rand(3, N, generator=gen_) * 4
    return {
        "pmax1": [[1] * N] * 3,
        "static2": [static_lengths(GRID, 2)] * 3,
        "patcher": patch_lengths(e, width=GRID[1], threshold=2.0, max_patch_length=4),
        "ragged": [[1] * N, static_lengths(GRID, 6), [1, 5] + static_lengths(GRID, 3)[2:]],
        "cross-rows": [[1, 11, 24], [2, 34], [36]],  # patches spanning rows (not produced by the patcher)
    }


@pytest.mark.parametrize("rope", list(DPAR_MODELS))
@pytest.mark.parametrize("name", ["pmax1", "static2", "patcher", "ragged", "cross-rows"])
def test_dpar_cached_logits_equal_forward(models, rope, name):
    model = models["dpar"][rope]
    lengths = dpar_layouts()[name]
    layout = PatchLayout.from_lengths(lengths, GRID, pad_to_multiple=4)
    codes = torch.randint(0, VOCAB, (3, N), generator=gen(8))
    with torch.no_grad():
        full = model(codes, LABELS, layout)
    cached, cache = dpar_logits_cached(model, codes, LABELS, layout)
    assert_close(cached, full, **model_chain(model, N), msg=f"{rope}/{name}")
    # The global model saw each image's class and its patches but the last (whose output nothing reads), once.
    assert cache.glob.positions == sum(len(x) for x in lengths)
    assert cache.num_patches.tolist() == [len(x) - 1 for x in lengths]
    assert cache.encoder.positions == 3 * (N - 1) and cache.decoder.positions == 3 * N


def test_kv_cache_guards():
    cache = KVCache(1, 2, 3)
    k = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, k, k)
    cache = KVCache(1, 2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        cache.update(0, k[:1], k[:1], rows=torch.tensor([0]))


# -------------------------------------------------------------------------------------- sampler semantics
def test_sample_logits_filters():
    logits = torch.randn(64, VOCAB, generator=gen(9)) * 3
    top = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, uniform(0, 64), top_k=1), top)
    assert torch.equal(sample_logits(logits, uniform(0, 64), top_p=1e-6), top)
    assert torch.equal(sample_logits(logits, uniform(0, 64), temperature=0), top)
    k5 = sample_logits(logits.repeat(50, 1), uniform(1, 3200), top_k=5).view(50, 64)
    allowed = torch.topk(logits, 5, -1).indices
    assert (k5[..., None] == allowed[None]).any(-1).all(), "top-k drew outside the k best"
    # top-p: the kept set is the smallest prefix (by probability) whose mass reaches p.
    probs = torch.softmax(logits, -1)
    sp, order = probs.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) <= 0.7
    p7 = sample_logits(logits.repeat(50, 1), uniform(2, 3200), top_p=0.7).view(50, 64)
    rank = (order[None] == p7[..., None]).float().argmax(-1)
    assert torch.gather(keep[None].expand(50, -1, -1), 2, rank[..., None]).all(), "top-p drew a dropped code"


def test_sample_logits_matches_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    # A frequency of n draws has standard deviation sqrt(p(1-p)/n): within 5 of them (seeded, so deterministic;
    # a wrong distribution, e.g. a temperature applied twice, is off by tens of them).
    n = 40000
    for temperature in (1.0, 0.25):
        draws = sample_logits(logits.expand(n, -1), uniform(3, n), temperature=temperature)
        freq = torch.bincount(draws, minlength=4).double() / n
        p = torch.softmax(logits[0].double() / temperature, -1)
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (temperature, freq, p)


# ---------------------------------------------------------------------------------- GPT cached == uncached
GPT_CASES = [dict(cfg_scale=1.0), dict(cfg_scale=3.0), dict(cfg_scale=2.0, top_k=8, top_p=0.9, temperature=0.9)]


@pytest.mark.parametrize("kw", GPT_CASES, ids=["no-cfg", "cfg", "cfg-topk-topp"])
def test_gpt_cached_equals_uncached(models, kw):
    stats = [GenerationStats(), GenerationStats()]
    out = [generate_gpt(models["gpt"], LABELS, uniforms=streams(11), use_cache=c, stats=s, **kw)
           for c, s in zip((True, False), stats)]
    assert torch.equal(out[0], out[1])
    assert out[0].shape == (3, N) and out[0].min() >= 0 and out[0].max() < VOCAB
    rows = 3 * (2 if kw["cfg_scale"] != 1.0 else 1)
    assert stats[0].token_positions == rows * N  # cached: each input position once
    assert stats[1].token_positions == rows * N * (N + 1) // 2  # uncached: the prefix again at every code


def test_gpt_guidance_and_seed(models):
    a = generate_gpt(models["gpt"], LABELS, cfg_scale=4.0, uniforms=streams(1))
    assert torch.equal(a, generate_gpt(models["gpt"], LABELS, cfg_scale=4.0, uniforms=streams(1)))
    assert not torch.equal(a, generate_gpt(models["gpt"], LABELS, cfg_scale=1.0, uniforms=streams(1)))
    assert not torch.equal(a, generate_gpt(models["gpt"], LABELS, cfg_scale=4.0, uniforms=streams(2)))
    with pytest.raises(ValueError, match="labels must lie"):
        generate_gpt(models["gpt"], torch.tensor([CLASSES]), uniforms=streams(0, 1))  # the null class is no label


# --------------------------------------------------------------------------------- DPAR cached == uncached
DPAR_CASES = [  # (alignment, mode, P_max, sampling keywords, model)
    ("reference", "global", 4, dict(cfg_scale=1.0), "dynamic"),
    ("reference", "global", 4, dict(cfg_scale=2.5), "dynamic"),
    ("reference", "global", 1, dict(cfg_scale=2.5), "dynamic"),
    ("blt", "global", 4, dict(cfg_scale=2.5, top_k=10, top_p=0.9), "dynamic"),
    ("blt", "global", 1, dict(cfg_scale=1.0, top_p=0.8), "dynamic"),
    ("reference", "static", 4, dict(cfg_scale=2.0), "dynamic"),
    ("reference", "monotonic", 4, dict(cfg_scale=2.0, temperature=1.3), "1d"),
    ("reference", "global", 4, dict(cfg_scale=2.5), "legacy"),
    ("blt", "global", 4, dict(cfg_scale=1.0), "legacy"),
]


@pytest.mark.parametrize("alignment,mode,pmax,kw,rope", DPAR_CASES,
                         ids=[f"{a}-{m}-pmax{p}-{'cfg' if k['cfg_scale'] != 1 else 'nocfg'}"
                              + ("-filters" if "top_p" in k else "") + f"-{r}" for a, m, p, k, r in DPAR_CASES])
def test_dpar_cached_equals_uncached(models, alignment, mode, pmax, kw, rope):
    theta = models["theta"] if mode != "monotonic" else 0.05
    rule = PatchConfig(mode=mode, alignment=alignment, threshold=theta, max_patch_length=pmax, static_length=3)
    entropy = models["entropy"] if mode != "static" else None
    stats = [GenerationStats(), GenerationStats()]
    runs = [generate_dpar(models["dpar"][rope], entropy, LABELS, patch_cfg=rule, uniforms=streams(21), use_cache=c,
                          stats=s, **kw) for c, s in zip((True, False), stats)]
    (codes, lengths), (ref_codes, ref_lengths) = runs
    assert torch.equal(codes, ref_codes)
    assert lengths == ref_lengths
    assert all(sum(x) == N for x in lengths)

    # The boundaries chosen on the fly are the patcher's on the final codes (training's rule).
    source = code_entropies(models["entropy"], codes) if mode != "static" else torch.zeros(3, N)
    expect = patch_lengths(source, width=GRID[1], threshold=rule.threshold, max_patch_length=pmax, mode=mode,
                           alignment=alignment, static_length=3)
    assert lengths == expect
    if pmax == 1:
        assert all(x == [1] * N for x in lengths)
    elif mode == "global":  # a real mix: some patches merged, some entropy-fired starts off the forced ones
        flat = [v for x in lengths for v in x]
        assert max(flat) > 1 and len(flat) > 3 * (GRID[0] * -(-GRID[1] // pmax) + 1)

    # Cost: with the cache the global model sees every image's class + its patches but the last, once per CFG half;
    # the uncached path pays the whole packed prefix at every code.
    halves = 2 if kw["cfg_scale"] != 1.0 else 1
    assert stats[0].global_positions == halves * sum(len(x) for x in lengths)
    prefix_cost = sum(halves * (len(PatchLayout.from_lengths(lengths, GRID).prefix(k).lengths[i]) + 1)
                      for k in range(1, N + 1) for i in range(3))
    assert stats[1].global_positions == prefix_cost
    assert stats[0].decoder_positions == halves * 3 * N and stats[0].encoder_positions == halves * 3 * (N - 1)
    assert stats[0].entropy_positions == (3 * N if mode != "static" else 0)


def test_dpar_float16_entropies_match_training_storage(models):
    # Training reads entropies stored as float16: entropy_dtype=float16 reproduces the patcher on those.
    rule = PatchConfig(threshold=models["theta"], max_patch_length=4)
    codes, lengths = generate_dpar(models["dpar"]["dynamic"], models["entropy"], LABELS, patch_cfg=rule,
                                   cfg_scale=2.0, uniforms=streams(4), entropy_dtype=torch.float16)
    stored = code_entropies(models["entropy"], codes).half().float()
    assert lengths == patch_lengths(stored, width=GRID[1], threshold=rule.threshold, max_patch_length=4)


def test_dpar_cached_generation_logits(models):
    # The logits the cached sampler used at each code are the training forward's on the final codes and layout.
    model, rule = models["dpar"]["dynamic"], PatchConfig(threshold=models["theta"], max_patch_length=4)
    codes, lengths = generate_dpar(model, models["entropy"], LABELS, patch_cfg=rule, uniforms=streams(5))
    layout = PatchLayout.from_lengths(lengths, GRID)
    cached, _ = dpar_logits_cached(model, codes, LABELS, layout)
    with torch.no_grad():
        assert_close(cached, model(codes, LABELS, layout), **model_chain(model, N))


def test_dpar_sampler_honours_the_ablation_rules(models):
    # No row reset and no P_max ("entropy only"), and the fractional static length: the boundaries chosen on the
    # fly are the patcher's on the final codes under the same rule, and without row reset some patch crosses a row.
    model = models["dpar"]["dynamic"]
    rule = PatchConfig(threshold=models["theta"], max_patch_length=N, row_reset=False)
    codes, lengths = generate_dpar(model, models["entropy"], LABELS, patch_cfg=rule, uniforms=streams(8))
    entropy = code_entropies(models["entropy"], codes)
    assert lengths == patch_lengths(entropy, width=GRID[1], threshold=rule.threshold, max_patch_length=N,
                                    row_reset=False)
    starts = [set(torch.tensor([0] + x[:-1]).cumsum(0).tolist()) for x in lengths]
    assert any(not set(range(0, N, GRID[1])) <= s for s in starts)
    static = PatchConfig(mode="static", static_length=1.5, max_patch_length=4)
    _, lengths = generate_dpar(model, None, LABELS[:1], patch_cfg=static, uniforms=streams(0, 1))
    assert lengths == patch_lengths(torch.zeros(1, N), width=GRID[1], threshold=0.0, max_patch_length=4,
                                    mode="static", static_length=1.5)
    assert len(lengths[0]) == round(N / 1.5)


def test_dpar_needs_entropy_model(models):
    with pytest.raises(ValueError, match="needs the entropy model"):
        generate_dpar(models["dpar"]["dynamic"], None, LABELS, patch_cfg=PatchConfig(), uniforms=streams(0))
    static = dataclasses.replace(PatchConfig(), mode="static")  # needs no entropy model
    codes, lengths = generate_dpar(models["dpar"]["dynamic"], None, LABELS[:1], patch_cfg=static,
                                   uniforms=streams(0, 1))
    assert lengths == [static_lengths(GRID, 2)]


def test_sample_stream_is_the_samples_own(models):
    # Sample 1's codes with other neighbours in the batch (other ids, other classes; same batch size and row):
    # unchanged, because it reads only its own stream and every row of a fixed-shape batch is computed alike.
    ids_a, ids_b = [0, 1, 2], [7, 1, 9]
    labels_a, labels_b = LABELS, torch.tensor([4, 3, 0])
    rule = PatchConfig(threshold=models["theta"], max_patch_length=4)
    batches = ((labels_a, ids_a), (labels_b, ids_b))
    gpt = [generate_gpt(models["gpt"], lab, cfg_scale=2.0, uniforms=sample_uniforms(5, ids, N)) for lab, ids in batches]
    assert torch.equal(gpt[0][1], gpt[1][1]) and not torch.equal(gpt[0][0], gpt[1][0])
    dpar = [generate_dpar(models["dpar"]["dynamic"], models["entropy"], lab, patch_cfg=rule, cfg_scale=2.0,
                          uniforms=sample_uniforms(5, ids, N))[0] for lab, ids in batches]
    assert torch.equal(dpar[0][1], dpar[1][1]) and not torch.equal(dpar[0][0], dpar[1][0])
    # The streams themselves: row r is sample ids[r]'s, whatever else is drawn with it.
    assert torch.equal(sample_uniforms(5, [1], N)[0], sample_uniforms(5, ids_b, N)[1])
    assert not torch.equal(sample_uniforms(5, [1], N), sample_uniforms(6, [1], N))


# ---------------------------------------------------------------------------------------- tools/sample.py
def test_sample_tool(models, tmp_path, capsys):
    import json

    import numpy as np

    sample = load_tool("sample")
    paths = write_sampling_setup(tmp_path, gpt=models["gpt"], entropy=models["entropy"],
                                 dpar=models["dpar"]["dynamic"], grid=GRID, vocab=VOCAB, classes=CLASSES,
                                 theta=models["theta"])
    codes_dir = paths["codes"]

    out = tmp_path / "dpar-samples"
    assert sample.main(["--checkpoint", str(tmp_path / "dpar"), "--classes", "0,2", "--num-per-class", "3",
                        "--cfg-scale", "2.0", "--seed", "0", "--out", str(out), "--top-k", "20"]) == 0
    codes = np.load(out / "codes.npy")
    assert codes.shape == (6, *GRID) and codes.dtype == np.int64
    assert np.load(out / "labels.npy").tolist() == [0, 0, 0, 2, 2, 2]
    lengths = json.loads((out / "patch_lengths.json").read_text())
    stored = code_entropies(models["entropy"], torch.from_numpy(codes).view(6, N)).half().float()
    assert lengths["patch_lengths"] == patch_lengths(stored, width=GRID[1], threshold=models["theta"],
                                                     max_patch_length=4)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.height >= 2 * GRID[0] * 2 and grid.width > 3 * GRID[1] * 2
    assert "mean patch length" in capsys.readouterr().out

    # Same seed, uncached reference path: the same codes.
    ref = tmp_path / "dpar-ref"
    assert sample.main(["--checkpoint", str(tmp_path / "dpar"), "--classes", "0,2", "--num-per-class", "3",
                        "--cfg-scale", "2.0", "--seed", "0", "--out", str(ref), "--top-k", "20", "--no-cache"]) == 0
    assert np.array_equal(np.load(ref / "codes.npy"), codes)

    gpt_out = tmp_path / "gpt-samples"
    assert sample.main(["--checkpoint", str(tmp_path / "gpt"), "--classes", "1", "--num-per-class", "2",
                        "--seed", "1", "--out", str(gpt_out)]) == 0
    assert np.load(gpt_out / "codes.npy").shape == (2, *GRID) and not (gpt_out / "patch_lengths.json").exists()

    # Clear errors: a patch rule for a GPT, no entropy manifest, unknown class.
    assert sample.main(["--checkpoint", str(tmp_path / "gpt"), "--classes", "1", "--out", str(gpt_out),
                        "--threshold", "3"]) == 2
    assert "apply to DPAR checkpoints only" in capsys.readouterr().err
    (codes_dir / "entropy" / "manifest.json").unlink()
    assert sample.main(["--checkpoint", str(tmp_path / "dpar"), "--classes", "0", "--out", str(out)]) == 2
    assert "--entropy-checkpoint" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(tmp_path / "gpt"), "--classes", "7", "--out", str(out)]) == 2
    assert "outside the model's classes" in capsys.readouterr().err


def test_sample_tool_patch_rule_override(models, tmp_path):
    # --threshold / --max-patch-length / --patch-mode replace the checkpoint's rule at inference time; the patches
    # chosen on the fly are still the patcher's on the final codes under the overridden rule, and a higher θ
    # merges more (paper Table 6 raises θ from 7.8 to 8.1 on a model trained at 7.8).
    import json

    import numpy as np

    sample = load_tool("sample")
    write_sampling_setup(tmp_path, gpt=models["gpt"], entropy=models["entropy"], dpar=models["dpar"]["dynamic"],
                         grid=GRID, vocab=VOCAB, classes=CLASSES, theta=models["theta"])
    common = ["--checkpoint", str(tmp_path / "dpar"), "--classes", "0,1,2,3", "--num-per-class", "3",
              "--cfg-scale", "2.0", "--seed", "3"]
    codes_e = torch.randint(0, VOCAB, (16, N), generator=gen(3))
    lo, hi = (float(code_entropies(models["entropy"], codes_e).quantile(q)) for q in (0.3, 0.8))
    mean = {}
    for name, flags, rule in (("lo", ["--threshold", str(lo)], dict(threshold=lo, max_patch_length=4)),
                              ("hi", ["--threshold", str(hi)], dict(threshold=hi, max_patch_length=4)),
                              ("pmax2", ["--threshold", str(hi), "--max-patch-length", "2"],
                               dict(threshold=hi, max_patch_length=2)),
                              ("monotonic", ["--threshold", "0.05", "--patch-mode", "monotonic"],
                               dict(threshold=0.05, max_patch_length=4, mode="monotonic"))):
        out = tmp_path / name
        assert sample.main(common + ["--out", str(out)] + flags) == 0
        record = json.loads((out / "patch_lengths.json").read_text())
        assert record["patch_rule"]["threshold"] == rule["threshold"]
        codes = torch.from_numpy(np.load(out / "codes.npy")).view(-1, N)
        stored = code_entropies(models["entropy"], codes).half().float()  # training's float16 entropies
        assert record["patch_lengths"] == patch_lengths(stored, width=GRID[1], **rule), name
        mean[name] = record["mean_patch_length"]
    assert mean["hi"] > mean["lo"] + 0.3, mean
    assert 1 < mean["pmax2"] <= 2 < mean["hi"]
    static = tmp_path / "static"
    assert sample.main(common + ["--out", str(static), "--patch-mode", "static"]) == 0
    assert json.loads((static / "patch_lengths.json").read_text())["patch_lengths"] == [static_lengths(GRID, 2)] * 12
