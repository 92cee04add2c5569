"""Preset sizes against LlamaGen's and the DPAR paper's parameter counts (built on the meta device: free)."""
import pytest
import torch

from dpar_scale.config import ConfigError, ModelConfig
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.models import DPAR, GPT, PRESETS, build_model, count_params, param_breakdown, resolve_model_config




def meta_count(name: str) -> int:
    with torch.device("meta"):
        model = build_model(ModelConfig(kind=PRESETS[name]["kind"], preset=name))
    assert next(model.parameters()).is_meta
    return count_params(model)


@pytest.mark.parametrize("name,low,high", [
    ("gpt-b", 111e6 * 0.97, 111e6 * 1.03),
    ("gpt-l", 343e6 * 0.97, 343e6 * 1.03),
    ("gpt-xl", 775e6 * 0.97, 775e6 * 1.03),
    ("gpt-xxl", 1.4e9 * 0.97, 1.4e9 * 1.03),
    ("dpar-b", 120e6 * 0.92, 120e6 * 1.08),
    ("dpar-xl", 789e6, 853e6),
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
