"""Shared by the sampling tests: tiny random-weight models written as exports next to a k-means tokenizer and the
codes / entropy manifests that point the samplers at them, and loading a tool as a module."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def randomize(model, seed: int, scale: float = 0.1):
    # LlamaGen's init zeroes the output head (uniform predictions): use weights that give every path a say, at a
    # scale that keeps logits O(3) (cached and full forwards differ by float32 rounding: tests/tolerances.py).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * scale if p.dim() > 1 else 1.0 + 0.2 * noise)
    return model.eval()


def write_export(folder: Path, model, overrides: list[str]) -> Path:
    """An export folder (config.yaml + model.safetensors) that load_model_for_inference reads."""
    from safetensors.torch import save_file

    from dpar_scale.config import load_config, save_config

    folder.mkdir(parents=True)
    save_config(load_config(None, overrides), folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def write_sampling_setup(root: Path, *, gpt, entropy, dpar, grid, vocab, classes, theta, dim=64) -> dict:
    """Tokenizer, codes + entropy manifests and the three exports under `root`; returns their paths. Each
    export's config states the shape of the module it holds (depths and DPAR structure read off the modules)."""
    from dpar_scale.tokenizer.kmeans import KMeansTokenizer

    codes_dir = root / "codes"
    (codes_dir / "entropy").mkdir(parents=True)
    KMeansTokenizer(torch.rand(vocab, 3 * 2 * 2, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                    block_size=2).save(str(root / "tok.safetensors"))
    (codes_dir / "manifest.json").write_text(json.dumps({
        "tokenizer": {"name": "kmeans", "path": str(root / "tok.safetensors")},
        "classes": [f"class{i}" for i in range(classes)]}))
    shape = [f"model.dim={dim}", "model.n_heads=4", f"model.vocab_size={vocab}", f"model.grid=[{grid[0]},{grid[1]}]",
             "model.ffn_multiple_of=32", f"data.codes_dir={codes_dir}"]
    gpt_layers, entropy_layers = len(gpt.layers), len(entropy.layers)
    enc, glob, dec = len(dpar.encoder_layers), len(dpar.global_layers), len(dpar.decoder_layers)
    structure = [f"model.dpar.decoder_injection={dpar.decoder_injection}",
                 f"model.dpar.cross_attn_ffn={str(dpar.cross_attn_ffn).lower()}"]
    out = {"codes": codes_dir, "tokenizer": root / "tok.safetensors"}
    out["entropy"] = write_export(root / "entropy", entropy,
                                  shape + ["model.kind=entropy", f"model.n_layers={entropy_layers}"])
    (codes_dir / "entropy" / "manifest.json").write_text(json.dumps({
        "entropy_checkpoint": str(out["entropy"]), "dtype": "float16"}))
    out["dpar"] = write_export(root / "dpar", dpar, shape + [
        "model.kind=dpar", f"model.num_classes={classes}", f"model.n_encoder_layers={enc}",
        f"model.n_global_layers={glob}", f"model.n_decoder_layers={dec}", f"model.patch.threshold={theta}",
        *structure])
    out["gpt"] = write_export(root / "gpt", gpt, shape + ["model.kind=gpt", f"model.num_classes={classes}",
                                                         f"model.n_layers={gpt_layers}"])
    return out


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
