"""LlamaGen's class-conditional GPT checkpoints (FoundationVision/LlamaGen, `autoregressive/models/gpt.py`) as
exports of our GPT, with LlamaGen's own logits.

What was checked against LlamaGen's code, and how each maps:
* layouts: `{"model": sd}` (their DDP saves, the released c2i files), `{"module": sd}` (DeepSpeed),
  `{"state_dict": sd}`, or the bare state dict (their FSDP saves); `module.` / `_orig_mod.` prefixes are stripped;
  a stored `freqs_cis` table and KV-cache buffers are ignored (recomputed);
* `cls_embedding.embedding_table` [num_classes + 1, dim] -> `class_embedding` (row num_classes = the null class
  for guidance in both); `tok_embeddings`, `norm`, `output` (no bias, not tied) keep their names;
* attention: fused `wqkv` [(H + 2·H_kv)·head_dim, dim] split as [q | k | v] into wq, wk, wv (grouped-query
  checkpoints, H_kv < H, are refused); `wo`; no biases; SDPA scale 1/sqrt(head_dim);
* RMSNorm in float32, eps 1e-5, weight after the cast back; SwiGLU w2(silu(w1 x) * w3 x) with hidden =
  multiple_of-rounded int(2·4·dim/3) (same rule as ours, multiple_of 256); pre-norm blocks;
* input [class, x_0 .. x_{N-2}], logits at position k predict x_k (their training keeps all positions for one
  class token);
* 2-D RoPE: adjacent channel pairs (2i, 2i+1); head_dim/4 frequencies base^(-4j/head_dim); the first half of
  the pairs rotate by the row of the code's cell, the second half by its column (as `rope.rope_grid`); input
  position p >= 1 gets cell p - 1. The class position holds cos = sin = 0, which zeroes the class token's q and
  k: imported models set `model.class_rope=zero` (our default is the identity rotation there).
The number of heads is not in the weights: it comes from `model.preset` / `model.n_heads`, else from LlamaGen's
own size table (dim 768 -> 12 heads, 1024 -> 16, 1280 -> 20, 1536 -> 24, ...).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from dpar_scale.checkpoint.export import write_export
from dpar_scale.config import Config, ConfigError, apply_overrides, load_config
from dpar_scale.errors import DparError, MissingFileError

__all__ = ["LlamaGenImportError", "read_llamagen_state", "llamagen_config", "convert_llamagen_state",
           "import_llamagen"]

DOWNSAMPLE = 16  # LlamaGen's class-conditional models are trained on VQ-16 codes
HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2560: 40, 2048: 32, 3200: 32, 4096: 32}  # GPT-B .. GPT-7B
_IGNORED = re.compile(r"(^|\.)freqs_cis$|\.kv_cache\.|(^|\.)causal_mask$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class LlamaGenImportError(DparError, ValueError):
    """A checkpoint that is not a LlamaGen c2i GPT, or does not fit the requested shape."""


def read_llamagen_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The GPT weights of a LlamaGen checkpoint file, whatever of the four layouts it uses, with prefixes and
    recomputed buffers removed. Loaded weights-only (argparse.Namespace, which their training saves as `args`, is
    allowed); `trust_pickle` loads arbitrary pickles (only for files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LlamaGen checkpoint {path} not found (e.g. c2i_B_256.pt from the LlamaGen "
                                f"release; nothing is downloaded)")
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LlamaGenImportError(f"{path} pickles more than tensors, so weights-only loading refused it; if you "
                                  f"trust the file pass --trust-pickle ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise LlamaGenImportError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = next((obj[k] for k in ("model", "module", "state_dict") if isinstance(obj.get(k), dict)), obj)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise LlamaGenImportError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor (expected "
                                      f"a GPT state dict, or one under 'model' / 'module' / 'state_dict')")
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if not _IGNORED.search(key):
            out[key] = value
    if "tok_embeddings.weight" not in out:
        raise LlamaGenImportError(f"{path} has no tok_embeddings.weight: not a LlamaGen GPT checkpoint (keys: "
                                  f"{', '.join(list(out)[:5])} ...)")
    if any(k.startswith("cls_embedding.cap_proj") for k in out):
        raise LlamaGenImportError(f"{path} is a text-conditional (t2i) LlamaGen model; only c2i models import")
    return out


def llamagen_config(state: dict[str, torch.Tensor], image_size: int, overrides: list[str] | None = None) -> Config:
    """Our config for a LlamaGen state dict: the shape read from the weights, checked against what the overrides
    (e.g. model.preset=gpt-b) say, class_rope=zero, grid image_size / 16."""
    from dpar_scale.models import PRESETS, resolve_model_config
    from dpar_scale.models.layers import ffn_hidden_dim

    overrides = list(overrides or [])
    if image_size < DOWNSAMPLE or image_size % DOWNSAMPLE:
        raise LlamaGenImportError(f"--image-size {image_size}: must be a multiple of {DOWNSAMPLE} (VQ-16 codes), "
                                  f"e.g. 256 or 384")
    vocab, dim = state["tok_embeddings.weight"].shape
    if "cls_embedding.embedding_table.weight" not in state:
        raise LlamaGenImportError("no cls_embedding.embedding_table.weight: not a class-conditional LlamaGen GPT")
    layers = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    inferred = {"dim": dim, "n_layers": layers, "vocab_size": vocab,
                "num_classes": state["cls_embedding.embedding_table.weight"].shape[0] - 1}
    grid = image_size // DOWNSAMPLE
    try:
        cfg = load_config(None, ["model.kind=gpt", "model.class_rope=zero", f"model.grid=[{grid},{grid}]"]
                          + overrides)
    except ConfigError as e:
        raise LlamaGenImportError(str(e)) from None
    said = dict(apply_overrides({}, overrides).get("model", {}))
    if cfg.model.preset:
        if cfg.model.preset not in PRESETS:
            raise LlamaGenImportError(f"model.preset={cfg.model.preset!r} is unknown (gpt-b, gpt-l, gpt-xl, gpt-xxl)")
        said = {**{k: v for k, v in PRESETS[cfg.model.preset].items() if k != "kind"}, **said}
    for key, value in inferred.items():
        if key in said and said[key] != value:
            raise LlamaGenImportError(f"model.{key}: the checkpoint has {value}, the overrides / model.preset say "
                                      f"{said[key]}")
        setattr(cfg.model, key, value)
    heads = said.get("n_heads") or HEADS_BY_DIM.get(dim)
    if not heads:
        raise LlamaGenImportError(f"dim {dim} is not one of LlamaGen's sizes: pass model.n_heads=H (the weights do "
                                  f"not say how many heads)")
    cfg.model.n_heads = heads
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0] if layers else 0
    expect = ffn_hidden_dim(dim, cfg.model.ffn_multiple_of, cfg.model.ffn_dim_multiplier or None)
    if layers and hidden != expect:
        raise LlamaGenImportError(f"feed-forward width {hidden} != {expect} from model.ffn_multiple_of="
                                  f"{cfg.model.ffn_multiple_of} / ffn_dim_multiplier={cfg.model.ffn_dim_multiplier}: "
                                  f"set those overrides to the checkpoint's")
    try:
        cfg.model = resolve_model_config(cfg.model)
    except ConfigError as e:
        raise LlamaGenImportError(str(e)) from None
    return cfg


def convert_llamagen_state(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """LlamaGen names -> ours (wqkv split into wq, wk, wv), float32, checked against the model `cfg` builds."""
    from dpar_scale.models import build_model

    dim = cfg.model.dim
    out = {}
    for key, value in state.items():
        value = value.float()
        if key.endswith("attention.wqkv.weight"):
            if value.shape[0] != 3 * dim:
                raise LlamaGenImportError(f"{key}: {tuple(value.shape)}; expected [{3 * dim}, {dim}] (grouped-query "
                                          f"attention with fewer key/value heads is not supported)")
            base = key[: -len("wqkv.weight")]
            for name, part in zip(("wq", "wk", "wv"), value.split(dim, dim=0)):
                out[f"{base}{name}.weight"] = part.contiguous()
        elif key == "cls_embedding.embedding_table.weight":
            out["class_embedding.weight"] = value
        else:
            out[key] = value
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg.model).state_dict().items()}
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    wrong = [f"{k} {tuple(out[k].shape)} (expected {expected[k]})" for k in expected
             if k in out and tuple(out[k].shape) != expected[k]]
    problems = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
                if items]
    if problems:
        raise LlamaGenImportError("the checkpoint does not fit a LlamaGen c2i GPT of this shape: "
                                  + "; ".join(problems))
    return out


def import_llamagen(checkpoint: str | Path, out_dir: str | Path, image_size: int,
                    overrides: list[str] | None = None, trust_pickle: bool = False) -> dict:
    """Reads a LlamaGen c2i checkpoint and writes our export (model.safetensors + config.json) to `out_dir`."""
    state = read_llamagen_state(checkpoint, trust_pickle)
    cfg = llamagen_config(state, image_size, overrides)
    weights = convert_llamagen_state(state, cfg)
    summary = write_export(weights, cfg, out_dir, {"source": str(checkpoint), "weights": "llamagen"})
    summary.update(dim=cfg.model.dim, n_layers=cfg.model.n_layers, n_heads=cfg.model.n_heads,
                   vocab_size=cfg.model.vocab_size, num_classes=cfg.model.num_classes, grid=list(cfg.model.grid))
    return summary
