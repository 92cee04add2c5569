"""tools/import_llamagen.py: a LlamaGen c2i GPT checkpoint (random weights, LlamaGen's names and layouts) imports
into our GPT and gives the logits of an independent re-implementation of LlamaGen's forward (written here from
its math: fused qkv, 2-D RoPE as complex rotations with a zero rotation at the class position, float32 RMSNorm,
SwiGLU, causal softmax attention), in float64; our float32 path must agree to float32 rounding."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import dpar_scale
from dpar_scale.sampling.generate import gpt_logits_cached
from sampling_fixtures import load_tool
from tolerances import assert_close, model_chain

DIM, HEADS, LAYERS, VOCAB, CLASSES, GRID = 64, 4, 2, 48, 5, 4
HIDDEN = 256  # LlamaGen's rule for dim 64: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 256


def llamagen_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return 1.0 + 0.2 * torch.randn(DIM, generator=g)

    sd = {"tok_embeddings.weight": w(VOCAB, DIM, scale=1.0),
          "cls_embedding.embedding_table.weight": w(CLASSES + 1, DIM, scale=1.0),
          "norm.weight": norm(), "output.weight": w(VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd.update({p + "attention.wqkv.weight": w(3 * DIM, DIM), p + "attention.wo.weight": w(DIM, DIM),
                   p + "feed_forward.w1.weight": w(HIDDEN, DIM), p + "feed_forward.w3.weight": w(HIDDEN, DIM),
                   p + "feed_forward.w2.weight": w(DIM, HIDDEN), p + "attention_norm.weight": norm(),
                   p + "ffn_norm.weight": norm()})
    return sd


def reference_logits(sd: dict, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LlamaGen's c2i forward in eval mode, float64: input [class, x_0 .. x_{N-2}] -> logits [B, N, V]."""
    sd = {k: v.double() for k, v in sd.items()}
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][codes[:, :-1]]], dim=1)
    b, t, d = x.shape
    hd = d // HEADS
    # Rotation of each position as one complex number per channel pair: rows on the first hd/4 pairs, columns on
    # the last hd/4, frequencies 10000^(-4j/hd); the class position (0) multiplies by 0.
    inv = 10000.0 ** (-4.0 * torch.arange(hd // 4, dtype=torch.float64) / hd)
    cell = torch.arange(t) - 1
    angles = torch.cat([(cell // GRID)[:, None] * inv, (cell % GRID)[:, None] * inv], dim=1)
    rot = torch.polar(torch.ones_like(angles), angles)
    rot[0] = 0

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rotate(v):
        pairs = torch.view_as_complex(v.reshape(b, t, HEADS, hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * rot[None, :, None]).reshape(b, t, HEADS, hd)

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(d, dim=-1)
        q, k, v = rotate(q), rotate(k), v.reshape(b, t, HEADS, hd)
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhc->bqhc", att, v).reshape(b, t, d) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamagen")
    sd = llamagen_state()
    torch.save({"model": sd, "args": argparse.Namespace(gpt_model="GPT-B"), "steps": 10}, root / "c2i.pt")
    out = root / "export"
    assert load_tool("import_llamagen").main([str(root / "c2i.pt"), "--out", str(out), "--image-size",
                                              str(GRID * 16), f"model.n_heads={HEADS}"]) == 0
    return {"root": root, "sd": sd, "out": out}


def test_imported_model_gives_llamagen_logits(imported):
    model = dpar_scale.load_pretrained(imported["out"])
    assert not model.training and model.class_rope == "zero" and model.grid == (GRID, GRID)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, VOCAB, (3, GRID * GRID), generator=g)
    labels = torch.tensor([0, 4, CLASSES])  # the last row is the null class (guidance's unconditional half)
    expect = reference_logits(imported["sd"], codes, labels)
    assert expect.abs().max() > 1.0  # logits with some spread, so the comparison means something
    with torch.no_grad():
        got = model(codes, labels)
    # float32 (ours) against the reference computed independently: rounding of the whole chain only
    chain = model_chain(model, GRID * GRID)
    assert_close(got.double(), expect, **chain, msg="reference")
    # The KV-cached path the sampler uses gives the same logits.
    assert_close(gpt_logits_cached(model, codes, labels), got, **chain, msg="cached")
    # Our default (identity rotation at the class position) is measurably another model: the option is needed.
    cfg = json.loads((imported["out"] / "config.json").read_text())
    assert cfg["model"]["class_rope"] == "zero"
    model.class_rope = "identity"
    with torch.no_grad():
        assert (model(codes, labels).double() - expect).abs().max() > 1e-2


def test_the_four_layouts_import_alike(imported):
    from safetensors.torch import load_file

    sd, root = imported["sd"], imported["root"]
    layouts = {"module": {"module": {f"module.{k}": v for k, v in sd.items()}},
               "state_dict": {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
               "bare": {**sd, "freqs_cis": torch.zeros(GRID * GRID + 1, DIM // HEADS // 2, 2)}}
    ref = load_file(imported["out"] / "model.safetensors")
    tool = load_tool("import_llamagen")
    for name, obj in layouts.items():
        torch.save(obj, root / f"{name}.pt")
        out = root / f"export-{name}"
        assert tool.main([str(root / f"{name}.pt"), "--out", str(out), "--image-size", str(GRID * 16),
                          f"model.n_heads={HEADS}"]) == 0, name
        got = load_file(out / "model.safetensors")
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    assert torch.equal(ref["layers.1.attention.wk.weight"], sd["layers.1.attention.wqkv.weight"][DIM:2 * DIM])
    assert torch.equal(ref["class_embedding.weight"], sd["cls_embedding.embedding_table.weight"])


@pytest.mark.parametrize("case,overrides,match", [
    ("preset", ["model.preset=gpt-b"], "model.dim: the checkpoint has 64, the overrides / model.preset say 768"),
    ("vocab", [f"model.n_heads={HEADS}", "model.vocab_size=16384"], "model.vocab_size: the checkpoint has 48"),
    ("heads", [], "pass model.n_heads=H"),
    ("shape", [f"model.n_heads={HEADS}"], r"wrong shapes: layers.1.attention.wo.weight \(64, 32\)"),
    ("size", [f"model.n_heads={HEADS}"], "--image-size 100: must be a multiple of 16"),
    ("t2i", [f"model.n_heads={HEADS}"], "text-conditional"),
])
def test_import_errors(imported, capsys, case, overrides, match):
    sd = dict(imported["sd"])
    if case == "shape":
        sd["layers.1.attention.wo.weight"] = sd["layers.1.attention.wo.weight"][:, :32]
    if case == "t2i":
        sd["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(DIM, 8)
    path = imported["root"] / f"bad-{case}.pt"
    torch.save({"model": sd}, path)
    size = "100" if case == "size" else str(GRID * 16)
    assert load_tool("import_llamagen").main([str(path), "--out", str(imported["root"] / f"out-{case}"),
                                              "--image-size", size, *overrides]) == 2
    import re

    assert re.search(match, capsys.readouterr().err), case


def test_imported_model_samples(imported, tmp_path):
    # The export is what the samplers take (here with a k-means tokenizer of the same vocabulary).
    import numpy as np

    from dpar_scale.tokenizer.kmeans import KMeansTokenizer

    KMeansTokenizer(torch.rand(VOCAB, 12) * 2 - 1, block_size=2).save(str(tmp_path / "tok.safetensors"))
    out = tmp_path / "samples"
    assert load_tool("sample_ddp").main(["--checkpoint", str(imported["out"]), "--tokenizer-path",
                                         str(tmp_path / "tok.safetensors"), "--num-samples", "4", "--batch-size",
                                         "4", "--random-labels", "--out", str(out), "--no-progress"]) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["labels"].max() < CLASSES
