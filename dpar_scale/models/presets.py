"""Model size presets and parameter counting.

LlamaGen's GPT sizes and the DPAR sizes of equal total depth (encoder + global + decoder layers). A preset fixes
only the shape (kind, width, heads, depths); vocabulary, classes, grid, dropout and the rest come from the config.
Head dim is 64 everywhere, so dynamic RoPE's four column groups get 4 rotary pairs each.
"""
from __future__ import annotations

from torch import nn

_GPT = {"b": (768, 12, 12), "l": (1024, 16, 24), "xl": (1280, 20, 36), "xxl": (1536, 24, 48)}  # dim, heads, depth
_DPAR = {"b": (768, 12, (1, 8, 3)), "l": (1024, 16, (1, 19, 4)), "xl": (1280, 20, (1, 30, 5)),
         "xxl": (1536, 24, (1, 41, 6))}


def _gpt(kind: str, dim: int, heads: int, depth: int) -> dict:
    return {"kind": kind, "dim": dim, "n_heads": heads, "n_layers": depth}


def _dpar(dim: int, heads: int, depths: tuple[int, int, int]) -> dict:
    enc, glob, dec = depths
    return {"kind": "dpar", "dim": dim, "n_heads": heads, "n_encoder_layers": enc, "n_global_layers": glob,
            "n_decoder_layers": dec}


PRESETS: dict[str, dict] = {}
for _size, (_dim, _heads, _depth) in _GPT.items():
    PRESETS[f"gpt-{_size}"] = _gpt("gpt", _dim, _heads, _depth)
    PRESETS[f"entropy-{_size}"] = _gpt("entropy", _dim, _heads, _depth)
for _size, (_dim, _heads, _depths) in _DPAR.items():
    PRESETS[f"dpar-{_size}"] = _dpar(_dim, _heads, _depths)
# Tiny models for tests and the CPU demo: same total depth (4) for the token model and DPAR (1+2+1).
PRESETS["gpt-tiny"] = _gpt("gpt", 128, 4, 4)
PRESETS["entropy-tiny"] = _gpt("entropy", 128, 4, 4)
PRESETS["dpar-tiny"] = _dpar(128, 4, (1, 2, 1))
# Text-to-image: the same shapes with model.conditioning=text (the caption's tokens replace the class position; the
# text embedding has model.text.vocab_size rows, which the config gives).
for _name in [n for n in PRESETS if n.startswith(("gpt-", "dpar-"))]:
    PRESETS[f"{_name}-text"] = {**PRESETS[_name], "conditioning": "text"}

# Reported sizes in millions of parameters, for tools/count_params.py: "paper" is LlamaGen's paper for the GPTs and
# the DPAR paper for DPAR (≈120M for B, 789M for XL); "authors_code" is the DPAR authors' public model code
# instantiated with 16,384 codes and 1,000 classes (the structure the DPAR presets build by default).
REPORTED_M = {"gpt-b": {"paper": 111}, "gpt-l": {"paper": 343}, "gpt-xl": {"paper": 775},
              "gpt-xxl": {"paper": 1400}, "dpar-b": {"paper": 120, "authors_code": 115.0},
              "dpar-xl": {"paper": 789, "authors_code": 789.5}}


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device; shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per group (embeddings / encoder / global / decoder / head) from the model's PARAM_GROUPS."""
    groups = getattr(model, "PARAM_GROUPS", {})
    out = {"embeddings": 0, "encoder": 0, "global": 0, "decoder": 0, "head": 0, "other": 0}
    for name, p in model.named_parameters():
        out[groups.get(name.split(".")[0], "other")] += p.numel()
    out["total"] = count_params(model)
    return out
