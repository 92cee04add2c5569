"""From a training checkpoint to weights one process can sample with.

A checkpoint folder holds the weights in shards (DCP `model/` + `ema/`, or DeepSpeed's `deepspeed/`); an exported
model is one `model.safetensors` (fp32, full tensors, clean parameter names) next to `config.json` (the resolved
run config). `load_model_for_inference` reads either, so `tools/sample.py` and `tools/compute_entropy.py` take a
checkpoint folder or an export.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dpar_scale.checkpoint.save_load import MARKER, CheckpointError, read_checkpoint_file
from dpar_scale.config import Config, load_saved_config, to_dict
from dpar_scale.errors import MissingFileError

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def _config_of(path: Path) -> Config:
    """The run config saved with a checkpoint or an export; one written before model.dpar existed describes the
    legacy DPAR structure and is read as such (`load_saved_config`)."""
    for name in (EXPORT_CONFIG, "config.yaml"):
        if (path / name).is_file():
            return read_checkpoint_file(path / name, load_saved_config)  # JSON is YAML
    raise MissingFileError(f"{path} has no config.json / config.yaml: it is not a dpar-scale checkpoint or export")


def _from_dcp(folder: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from a DCP folder, read in this one process (no process group needed)."""
    from dpar_scale.checkpoint.dcp_io import dcp_load
    from dpar_scale.models import build_model

    with torch.device("cpu"):
        model = build_model(cfg.model)
    state = {k: v.float() for k, v in model.state_dict().items()}
    dcp_load(state, folder, no_dist=True)
    return state


def _from_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from DeepSpeed's ZeRO partitions, through DeepSpeed's Python API. (DeepSpeed's reader
    unpickles its own files: only read DeepSpeed checkpoints you trust.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dpar_scale.parallel.init import clean_name

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="state")
    except Exception as e:  # DeepSpeed raises ValueError / FileNotFoundError / KeyError depending on the damage
        raise CheckpointError(f"cannot consolidate the DeepSpeed checkpoint {folder} ({type(e).__name__}: {e}); "
                              f"ZeRO stages 1-3 are supported") from e
    return {clean_name(k): v.detach().float().contiguous() for k, v in state.items()}


def consolidated_weights(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], Config, str]:
    """(full fp32 weights, resolved config, which weights) of a checkpoint folder or an export (a folder, or
    its model.safetensors file). EMA weights are taken when present and `use_ema`."""
    from safetensors.torch import load_file

    from dpar_scale.models import resolve_model_config

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        cfg = _config_of(path.parent)
        cfg.model = resolve_model_config(cfg.model)
        return read_checkpoint_file(path, load_file), cfg, path.name
    if not path.is_dir():
        raise MissingFileError(f"{path} does not exist; pass a checkpoint folder (e.g. "
                                f"runs/demo/dpar/checkpoints/step-000300) or an export from tools/export.py")
    exported = (path / EXPORT_WEIGHTS).is_file() and not (path / MARKER).is_file()
    if not exported and not (path / MARKER).is_file():
        raise MissingFileError(f"{path} is neither a complete checkpoint (no {MARKER}: its save was interrupted, "
                                f"or it is not a checkpoint) nor an export ({EXPORT_WEIGHTS} + {EXPORT_CONFIG})")
    cfg = _config_of(path)
    cfg.model = resolve_model_config(cfg.model)
    if exported:
        return read_checkpoint_file(path / EXPORT_WEIGHTS, load_file), cfg, EXPORT_WEIGHTS
    if (path / "deepspeed").is_dir():
        return _from_deepspeed(path / "deepspeed"), cfg, "deepspeed"
    which = "ema" if use_ema and (path / "ema").is_dir() else "model"
    return _from_dcp(path / which, cfg), cfg, which


def load_model_for_inference(path: str | Path, use_ema: bool = True, device: str = "cpu"):
    """(model in eval mode on `device`, its Config) from a checkpoint folder or an export."""
    from dpar_scale.models import build_model

    weights, cfg, _ = consolidated_weights(path, use_ema)
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg


def write_export(weights: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path, metadata: dict,
                 text_tokenizer=None) -> dict:
    """Writes `out_dir/model.safetensors` (atomically) + `out_dir/config.json` (+ a text model's tokenizer);
    returns a summary."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (EXPORT_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
              metadata={k: str(v) for k, v in {**metadata, "kind": cfg.model.kind}.items()})
    tmp.replace(out_dir / EXPORT_WEIGHTS)
    (out_dir / EXPORT_CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    if text_tokenizer is not None:
        from dpar_scale.checkpoint.text_model import write_text_tokenizer

        write_text_tokenizer(out_dir, text_tokenizer)
    return {**metadata, "out": str(out_dir / EXPORT_WEIGHTS), "config": str(out_dir / EXPORT_CONFIG),
            "tensors": len(weights), "parameters": sum(v.numel() for v in weights.values()), "kind": cfg.model.kind}


def export_checkpoint(path: str | Path, out_dir: str | Path, use_ema: bool = True) -> dict:
    """Writes `out_dir/model.safetensors` + `out_dir/config.json`; returns a summary."""
    weights, cfg, which = consolidated_weights(path, use_ema)
    text_tokenizer = None
    if cfg.model.conditioning == "text":  # the export carries it too, checked against the checkpoint's record
        from dpar_scale.checkpoint.text_model import read_text_tokenizer

        text_tokenizer = read_text_tokenizer(path)
    return write_export(weights, cfg, out_dir, {"source": str(path), "weights": which}, text_tokenizer)
