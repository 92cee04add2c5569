"""Preset sizes against LlamaGen's and the DPAR paper's parameter counts (built on the meta device: free)."""
import math

import pytest
import torch

from dpar_scale.config import ConfigError, DPARConfig, ModelConfig
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.models import DPAR, GPT, PRESETS, build_model, count_params, param_breakdown, resolve_model_config




def meta_model(name: str, dpar: DPARConfig | None = None):
    with torch.device("meta"):
        model = build_model(ModelConfig(kind=PRESETS[name]["kind"], preset=name, dpar=dpar or DPARConfig()))
    assert next(model.parameters()).is_meta
    return model


def meta_count(name: str, dpar: DPARConfig | None = None) -> int:
    return count_params(meta_model(name, dpar))


def dpar_count_by_hand(dim, enc, glob, dec, *, every=True, ffn=False, vocab=16384, classes=1000) -> dict[str, int]:
    """DPAR's parameters from its structure, written out here (not read from the model): LLaMA blocks of 4·d²
    attention + 3·d·h SwiGLU (h = 8d/3 rounded up to 256) + 2 norms; the patch cross-attention wq/wk/wv/wo and
    its query and key/value norms (+ a SwiGLU and its norm with `ffn`); per decoder layer (`every`) or once
    RMSNorm + Linear(d, d) for the global state; the decoder's start vector; the final norm; no biases."""
    hidden = 256 * math.ceil(int(8 * dim / 3) / 256)
    swiglu = 3 * dim * hidden + dim
    block = 4 * dim * dim + 2 * dim + 3 * dim * hidden
    injection = dim * dim + dim
    return {"embeddings": vocab * dim + (classes + 1) * dim,
            "encoder": enc * block + 4 * dim * dim + 2 * dim + (swiglu if ffn else 0),
            "global": glob * block,
            "decoder": dec * block + (dec if every else 1) * injection + dim,
            "head": dim + dim * vocab}


# (dim, encoder, global, decoder layers) of the paper's sizes
DPAR_SHAPES = {"dpar-b": (768, 1, 8, 3), "dpar-l": (1024, 1, 19, 4), "dpar-xl": (1280, 1, 30, 5),
               "dpar-xxl": (1536, 1, 41, 6)}


# every size in the authors' and the legacy structure; the two other combinations of the options at B
STRUCTURE_CASES = [(n, every, ffn) for n in DPAR_SHAPES for every, ffn in ((True, False), (False, True))]
STRUCTURE_CASES += [("dpar-b", True, True), ("dpar-b", False, False)]


@pytest.mark.parametrize("name,every,ffn", STRUCTURE_CASES)
def test_dpar_parameters_follow_the_structure(name, every, ffn):
    by_hand = dpar_count_by_hand(*DPAR_SHAPES[name], every=every, ffn=ffn)
    parts = param_breakdown(meta_model(name, DPARConfig("every" if every else "first", ffn)))
    assert {k: parts[k] for k in by_hand} == by_hand and parts["total"] == sum(by_hand.values())


def test_dpar_defaults_are_the_authors_code():
    # The authors' code (vocab 16,384, 1,000 classes): DPAR-B 115.0M = encoder 9.44M + global 56.64M + decoder
    # 23.01M + embeddings + head; DPAR-XL 789.5M (the paper reports 789M). The legacy structure (one injection,
    # FFN after the cross-attention) has 118.6M and 796.7M.
    b = param_breakdown(meta_model("dpar-b"))
    assert round(b["total"] / 1e6, 1) == 115.0
    assert [round(b[k] / 1e6, 2) for k in ("encoder", "global", "decoder")] == [9.44, 56.64, 23.01]
    assert round(meta_count("dpar-xl") / 1e6, 1) == 789.5
    legacy = DPARConfig(decoder_injection="first", cross_attn_ffn=True)
    assert round(meta_count("dpar-b", legacy) / 1e6, 1) == 118.6
    assert round(meta_count("dpar-xl", legacy) / 1e6, 1) == 796.7
    for name, shape in DPAR_SHAPES.items():
        print(f"{name}: {sum(dpar_count_by_hand(*shape).values()) / 1e6:.2f}M")


@pytest.mark.parametrize("name,low,high", [
    ("gpt-b", 111e6 * 0.97, 111e6 * 1.03),
    ("gpt-l", 343e6 * 0.97, 343e6 * 1.03),
    ("gpt-xl", 775e6 * 0.97, 775e6 * 1.03),
    ("gpt-xxl", 1.4e9 * 0.97, 1.4e9 * 1.03),
    ("dpar-b", 120e6 * 0.95, 120e6 * 1.0),  # the paper: ≈120M
    ("dpar-xl", 789e6 * 0.999, 789e6 * 1.001),  # the paper: 789M
])
def test_preset_sizes(name, low, high):
    n = meta_count(name)
    print(f"{name}: {n / 1e6:.2f}M")
    assert low <= n <= high, f"{name} has {n / 1e6:.2f}M parameters, expected {low / 1e6:.0f}-{high / 1e6:.0f}M"


def test_dpar_matches_gpt_depth_and_breakdown():
    for size in ("b", "l", "xl", "xxl"):
        g, d = PRESETS[f"gpt-{size}"], PRESETS[f"dpar-{size}"]
        assert g["dim"] == d["dim"] and g["n_heads"] == d["n_heads"]
        assert g["n_layers"] == d["n_encoder_layers"] + d["n_global_layers"] + d["n_decoder_layers"]
    with torch.device("meta"):
        parts = param_breakdown(build_model(ModelConfig(kind="dpar", preset="dpar-b")))
    print(parts)
    assert parts["other"] == 0
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]


def test_build_model_overrides_and_kinds():
    cfg = resolve_model_config(ModelConfig(kind="dpar", preset="dpar-b", dim=256, n_heads=4, n_global_layers=2))
    assert (cfg.dim, cfg.n_heads, cfg.n_encoder_layers, cfg.n_global_layers, cfg.n_decoder_layers) == (256, 4, 1, 2, 3)
    with torch.device("meta"):
        assert isinstance(build_model(ModelConfig(kind="gpt", preset="gpt-tiny")), GPT)
        ent = build_model(ModelConfig(kind="entropy", preset="gpt-b", num_classes=1000))  # forced unconditional
        assert isinstance(ent, GPT) and not ent.conditional and not hasattr(ent, "class_embedding")
        assert isinstance(build_model(ModelConfig(kind="dpar", preset="dpar-xxl")), DPAR)
    assert resolve_model_config(ModelConfig(kind="entropy", preset="entropy-b")).num_classes == 0
    with pytest.raises(ConfigError, match="preset"):
        resolve_model_config(ModelConfig(kind="dpar", preset="gpt-b"))
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_model_config(ModelConfig(kind="gpt", preset="gpt-huge"))
    with pytest.raises(ConfigError, match="must be >= 1"):
        resolve_model_config(ModelConfig(kind="gpt"))


def test_tiny_presets_run_and_materialise_from_meta():
    layout = PatchLayout.static(2, (4, 4), 2)
    codes = torch.randint(0, 64, (2, 16))
    for name in ("gpt-tiny", "entropy-tiny", "dpar-tiny"):
        cfg = ModelConfig(kind=PRESETS[name]["kind"], preset=name, vocab_size=64, num_classes=10, grid=(4, 4))
        with torch.device("meta"):
            model = build_model(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        torch.manual_seed(0)
        reference = build_model(cfg)
        for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert a.shape == b.shape and torch.isfinite(a).all(), k
        out = model(codes, torch.tensor([1, 2]), layout)
        assert out.shape == (2, 16, 64) and torch.isfinite(out).all()


def test_count_params_tool(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "count_params_tool", Path(__file__).resolve().parent.parent / "tools" / "count_params.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for structure, every, ffn in (("every,false", True, False), ("first,true", False, True)):
        out = tmp_path / f"{structure}.json"
        assert tool.main(["--presets", "dpar-b", "gpt-b", "--dpar", structure, "--json", str(out)]) == 0
        counts = json.loads(out.read_text())
        assert counts["dpar-b"]["total"] == sum(dpar_count_by_hand(*DPAR_SHAPES["dpar-b"], every=every,
                                                                   ffn=ffn).values())
    printed = capsys.readouterr().out
    assert "paper 120M, code 115.0M" in printed and "paper 111M" in printed
    assert tool.main(["--dpar", "every"]) == 2  # a user error: one line, exit 2
    assert "expected INJECTION,FFN" in capsys.readouterr().err


# Text presets at T5's vocabulary (32,000 pieces): printed by tools/count_params.py (README "Text-to-image models").
TEXT_TOTALS = {"dpar-b-text": 138_829_056, "dpar-l-text": 383_049_728, "dpar-xl-text": 829_134_080,
               "dpar-xxl-text": 1_482_193_920, "gpt-b-text": 134_695_680, "gpt-l-text": 374_653_952,
               "gpt-xl-text": 814_378_240, "gpt-xxl-text": 1_458_587_136}


def test_text_presets_swap_the_class_embedding_for_a_text_embedding(tmp_path):
    """Every *-text preset is its class preset with the (1,000 + 1)-row class table replaced by a 32,000-row text
    table (derived here), and the tool prints the pinned totals."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "count_params_tool", Path(__file__).resolve().parent.parent / "tools" / "count_params.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "text.json"
    names = list(TEXT_TOTALS) + ["dpar-tiny-text", "gpt-tiny-text"]
    assert tool.main(["--presets", *names, *[n[:-5] for n in names], "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    for name in names:
        dim = PRESETS[name]["dim"]
        assert counts[name]["total"] == counts[name[:-5]]["total"] - 1001 * dim + 32000 * dim, name
        assert counts[name]["embeddings"] == counts[name[:-5]]["embeddings"] - 1001 * dim + 32000 * dim, name
    assert {n: counts[n]["total"] for n in TEXT_TOTALS} == TEXT_TOTALS
