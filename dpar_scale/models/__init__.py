"""Models: the GPT baseline, the entropy model (an unconditional GPT) and DPAR, built from a ModelConfig.

`resolve_model_config` fills a config's zero shape fields from its preset (explicit non-zero fields win), so the
config saved next to a checkpoint states the real shape; `build_model` builds from it. Build on the meta device
(`with torch.device("meta"): build_model(cfg)`) to size big models for free; after `to_empty(device=...)` call
`model.init_weights()`.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from dpar_scale.config import DECODER_INJECTIONS, ConfigError, ModelConfig

from .attention import AttentionMask, attend, compile_flex, flex_available
from .dpar import DPAR
from .gpt import GPT
from .presets import PRESETS, count_params, param_breakdown

__all__ = ["AttentionMask", "DPAR", "GPT", "PRESETS", "attend", "build_model", "compile_flex", "count_params",
           "flex_available", "param_breakdown", "resolve_model_config"]

_SHAPE_FIELDS = ("dim", "n_heads", "n_layers", "n_encoder_layers", "n_global_layers", "n_decoder_layers")
_TOKEN_KINDS = ("gpt", "entropy")


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` with the preset's shape filled into the fields left at 0 (and num_classes=0 for the
    entropy model). A gpt-shaped preset serves kind gpt or entropy (entropy-b == gpt-b unconditional); a dpar
    preset only kind dpar."""
    values = {}
    if not cfg.kind and not cfg.preset:
        raise ConfigError("model.kind is not set and there is no model.preset to take it from: set model.kind "
                          "(gpt | entropy | dpar) or model.preset (e.g. dpar-b)")
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(sorted(PRESETS))})")
        preset = PRESETS[cfg.preset]
        if preset.get("conditioning") == "text":  # a *-text preset is a text model
            cfg = dataclasses.replace(cfg, conditioning="text")
        if not cfg.kind:
            cfg = dataclasses.replace(cfg, kind=preset["kind"])
        same_family = (preset["kind"] == cfg.kind) or (preset["kind"] in _TOKEN_KINDS and cfg.kind in _TOKEN_KINDS)
        if not same_family:
            raise ConfigError(f"model.kind={cfg.kind!r} does not fit model.preset={cfg.preset!r} (a "
                              f"{preset['kind']} shape): set model.kind={preset['kind']} or pick a "
                              f"{cfg.kind}-* preset")
        values = {k: v for k, v in preset.items() if k not in ("kind", "conditioning") and not getattr(cfg, k)}
    out = dataclasses.replace(cfg, **values)
    if out.kind == "entropy":
        out = dataclasses.replace(out, num_classes=0)
    _check(out)
    return out


def _check(cfg: ModelConfig) -> None:
    if cfg.kind not in ("gpt", "entropy", "dpar"):
        raise ConfigError(f"model.kind: {cfg.kind!r} is not one of gpt, entropy, dpar")
    if cfg.conditioning == "text":
        if cfg.kind == "entropy":
            raise ConfigError("model.conditioning=text: the entropy model is unconditional (patch boundaries "
                              "depend on the image, not on the prompt); set model.conditioning=class for it")
        if cfg.text.vocab_size < 1:
            raise ConfigError("model.conditioning=text needs model.text.vocab_size >= 1: the text embedding's "
                              "rows, at least the text tokenizer's vocabulary (tools/train_text_tokenizer.py "
                              "prints it)")
    need = ("n_encoder_layers", "n_global_layers", "n_decoder_layers") if cfg.kind == "dpar" else ("n_layers",)
    for key in ("dim", "n_heads") + need:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1 for kind={cfg.kind} (set it or pick a model.preset)")
    if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 4:
        raise ConfigError(f"model.dim={cfg.dim} / n_heads={cfg.n_heads} must give a head dim divisible by 4 "
                          f"(2-D RoPE splits the rotary pairs between rows and columns)")
    if cfg.kind == "gpt" and cfg.num_classes < 1 and cfg.conditioning != "text":
        raise ConfigError("model.num_classes must be >= 1 for kind=gpt (kind=entropy is the unconditional model)")
    if cfg.kind == "dpar" and cfg.class_rope != "identity":
        raise ConfigError("model.class_rope applies to gpt/entropy models (LlamaGen imports); DPAR's class "
                          "position always uses the identity rotation")
    if cfg.kind == "dpar" and cfg.num_classes < 1 and cfg.conditioning != "text":
        raise ConfigError("model.num_classes must be >= 1 for kind=dpar")
    if cfg.kind == "dpar" and cfg.dpar.decoder_injection not in DECODER_INJECTIONS:
        raise ConfigError(f"model.dpar.decoder_injection: {cfg.dpar.decoder_injection!r} is not one of "
                          f"{', '.join(DECODER_INJECTIONS)}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """GPT / entropy GPT / DPAR from a ModelConfig (preset filled in first, explicit non-zero fields override)."""
    cfg = resolve_model_config(cfg)
    common = dict(dim=cfg.dim, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size, grid=tuple(cfg.grid),
                  multiple_of=cfg.ffn_multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier or None,
                  dropout=cfg.dropout, class_dropout=cfg.class_dropout, rope_base=cfg.rope_base,
                  norm_eps=cfg.norm_eps, attention_backend=cfg.attention_backend,
                  text_vocab_size=cfg.text.vocab_size if cfg.conditioning == "text" else 0,
                  text_dropout=cfg.text.dropout)
    if cfg.kind == "dpar":
        return DPAR(n_encoder_layers=cfg.n_encoder_layers, n_global_layers=cfg.n_global_layers,
                    n_decoder_layers=cfg.n_decoder_layers, num_classes=cfg.num_classes,
                    global_rope=cfg.global_rope, decoder_injection=cfg.dpar.decoder_injection,
                    cross_attn_ffn=cfg.dpar.cross_attn_ffn, **common)
    return GPT(n_layers=cfg.n_layers, num_classes=cfg.num_classes if cfg.kind == "gpt" else 0,
               class_rope=cfg.class_rope, **common)
