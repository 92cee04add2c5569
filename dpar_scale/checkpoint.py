"""Single-process checkpoints: one folder per step, written atomically, loaded without unpickling objects.

Layout of `<run>/checkpoints/step-000123/`:
  model.safetensors      weights (what sampling and export need)
  ema.safetensors        EMA weights, when EMA is on
  train_state.pt         optimizer, scheduler, TrainState, RNG states (tensors and plain Python values only,
                         so `torch.load(weights_only=True)` reads it)
  config.yaml            the resolved config of the run
  data.json              which data trained it (codes / entropy folders and fingerprints), checked on resume
The folder is written under a temporary name and renamed when complete, so a crash during a save leaves the
previous checkpoint as the newest loadable one.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpar_scale.config import Config, ConfigError, load_config, save_config

STEP_DIR = re.compile(r"^step-(\d{6,})$")
DATA_FILE = "data.json"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (corrupt / truncated); the message names the file and older ones."""


@dataclass
class TrainState:
    """Everything about progress that is not a tensor of the model or optimizer."""

    step: int = 0
    samples_seen: int = 0  # the global data cursor (see dpar_scale.data.loader)
    codes_seen: int = 0
    global_positions_seen: int = 0
    wandb_id: str = ""
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "train_state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def write_data_info(folder: Path, data_info: dict | None) -> None:
    if data_info:
        (Path(folder) / DATA_FILE).write_text(json.dumps(data_info, indent=2) + "\n")


def save_checkpoint(output_dir, cfg: Config, model, optimizer, scheduler, state: TrainState, ema=None,
                    keep_last: int = 0, protect: Path | None = None, data_info: dict | None = None) -> Path:
    final = checkpoint_root(output_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "train_state": asdict(state), "rng": rng_state()}, tmp / "train_state.pt")
    save_config(cfg, tmp / "config.yaml")
    write_data_info(tmp, data_info)
    publish_checkpoint(tmp, final, output_dir, keep_last, protect)
    return final


def publish_checkpoint(tmp: Path, final: Path, output_dir, keep_last: int = 0, protect: Path | None = None) -> None:
    """Makes a fully written temporary folder the checkpoint `final` (one rename), then applies `keep_last`
    retention, never deleting `protect` (the checkpoint the run resumed from)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(output_dir, resume: str) -> Path | None:
    """`resume=auto`: the newest complete checkpoint of the run (None when there is none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "train_state.pt").is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder "
                                f"(no train_state.pt); use checkpoint.resume=auto to take the newest one")
    return path


def load_train_state(path: Path, model, optimizer, scheduler, ema=None) -> TrainState:
    model.load_state_dict(read_checkpoint_file(path / "model.safetensors", load_file))
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(read_checkpoint_file(path / "ema.safetensors", load_file))
    blob = read_train_state(path)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["train_state"])


def load_model_for_inference(path: str | Path, use_ema: bool = True, device: str = "cpu"):
    """(model in eval mode, its Config) from a checkpoint folder, preferring EMA weights when present."""
    from dpar_scale.models import build_model

    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a dpar-scale checkpoint folder (needs config.yaml and "
                                f"model.safetensors); pass e.g. runs/demo/dpar/checkpoints/step-000300")
    cfg = load_config(path / "config.yaml")
    model = build_model(cfg.model)
    weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else "model.safetensors")
    model.load_state_dict(load_file(weights, device=device))
    return model.to(device).eval(), cfg


# ------------------------------------------------------------------------------------------ resume checks
# Fields of the resolved model config that change parameter shapes or the meaning of the weights; a checkpoint
# resumes only into a model that agrees on all of them.
MODEL_SHAPE_KEYS = ("kind", "dim", "n_heads", "n_layers", "n_encoder_layers", "n_global_layers", "n_decoder_layers",
                    "ffn_multiple_of", "ffn_dim_multiplier", "vocab_size", "num_classes", "grid", "global_rope")


def _older_hint(path: Path) -> str:
    """Names the complete checkpoints older than `path` in its run (what to resume from instead)."""
    path = Path(path)
    match = STEP_DIR.match(path.name)
    older = []
    if match:
        older = [p for p in list_checkpoints(path.parent.parent)
                 if int(STEP_DIR.match(p.name).group(1)) < int(match.group(1))]
    if not older:
        return "there is no older complete checkpoint in this run; start a new run (new run.output_dir)"
    return (f"resume from an older one with checkpoint.resume={older[-1]} (complete older checkpoints: "
            f"{', '.join(p.name for p in reversed(older))})")


def read_checkpoint_file(file: Path, reader, what: str = "") -> object:
    """`reader(file)`, turning a read failure (truncated / corrupt file) into a CheckpointError naming the file
    and the older checkpoints to resume from. Never falls back on its own."""
    file = Path(file)
    try:
        return reader(file)
    except Exception as e:  # safetensors, zip and unpickling errors have no common base class
        raise CheckpointError(f"checkpoint file {file} cannot be read{what} ({type(e).__name__}: {e}); it is "
                              f"corrupt or truncated (e.g. an interrupted copy or a full disk). "
                              f"{_older_hint(file.parent)}") from e


def read_train_state(path: Path) -> dict:
    return read_checkpoint_file(Path(path) / "train_state.pt",
                                lambda f: torch.load(f, map_location="cpu", weights_only=True))


def check_checkpoint_files(path: Path) -> None:
    """Cheap integrity check of a checkpoint's files before anything is loaded: the safetensors headers must
    match the file sizes and train_state.pt must be a complete zip archive (truncation breaks both)."""
    from safetensors import safe_open

    path = Path(path)

    def check_safetensors(f: Path) -> None:
        with safe_open(str(f), framework="pt") as handle:
            handle.keys()

    def check_zip(f: Path) -> None:
        with zipfile.ZipFile(f) as z:
            z.namelist()

    for name in ("model.safetensors", "ema.safetensors"):
        if (path / name).is_file() or name == "model.safetensors":
            read_checkpoint_file(path / name, check_safetensors)
    read_checkpoint_file(path / "train_state.pt", check_zip)


def check_model_matches(path: Path, model_cfg) -> None:
    """Compares the checkpoint's saved (resolved) model config with `model_cfg` (resolved); raises ConfigError
    naming every differing shape key with both values."""
    import yaml

    from dpar_scale.config import to_dict

    saved_file = Path(path) / "config.yaml"
    if not saved_file.is_file():
        return  # nothing recorded to compare with; the weights' shapes are checked when loading
    saved = read_checkpoint_file(saved_file, lambda f: yaml.safe_load(f.read_text()) or {})
    saved_model = (saved.get("model") or {}) if isinstance(saved, dict) else {}
    current = to_dict(model_cfg)
    diffs = []
    for key in MODEL_SHAPE_KEYS:
        if key not in saved_model:
            continue
        a, b = saved_model[key], current.get(key)
        if isinstance(a, (list, tuple)):
            a = list(a)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            diffs.append(f"model.{key}: checkpoint {a}, config {b}")
    if diffs:
        raise ConfigError(f"checkpoint {path} does not fit the configured model: {'; '.join(diffs)} — resume with "
                          f"the checkpoint's model config (its config.yaml) or start a new run.output_dir")


def check_data_matches(path: Path, data_info: dict, allow_change: bool = False) -> None:
    """Compares the data a checkpoint was trained on (its data.json) with `data_info`; raises ConfigError on
    different codes / entropies unless `allow_change` (then warns). Checkpoints without data.json pass."""
    data_file = Path(path) / DATA_FILE
    if not data_file.is_file() or not data_info:
        return
    saved = read_checkpoint_file(data_file, lambda f: json.loads(f.read_text()))
    problems = []
    if saved.get("codes_fingerprint") and saved["codes_fingerprint"] != data_info.get("codes_fingerprint"):
        problems.append(f"the checkpoint was trained on codes {saved.get('codes_dir')} (fingerprint "
                        f"{saved['codes_fingerprint'][:16]}…); data.codes_dir now points to different codes "
                        f"{data_info.get('codes_dir')} (fingerprint {str(data_info.get('codes_fingerprint'))[:16]}…)")
    if (saved.get("entropy_fingerprint") and data_info.get("entropy_fingerprint")
            and saved["entropy_fingerprint"] != data_info["entropy_fingerprint"]):
        problems.append(f"the checkpoint was trained with entropies {saved.get('entropy_dir')} (fingerprint "
                        f"{saved['entropy_fingerprint'][:16]}…); the entropies now at {data_info.get('entropy_dir')} "
                        f"differ (fingerprint {data_info['entropy_fingerprint'][:16]}…), so the patch layouts change")
    if not problems:
        return
    text = "; ".join(problems)
    if allow_change:
        warnings.warn(f"checkpoint.allow_data_change=true: continuing {path} on different data: {text}",
                      stacklevel=2)
        return
    raise ConfigError(f"{text}. Point data.codes_dir / data.entropy_dir back at the original data, or set "
                      f"checkpoint.allow_data_change=true to continue on the new data deliberately (the sample "
                      f"cursor then indexes the new data)")


def check_resume(path: Path, model_cfg, data_info: dict | None, allow_data_change: bool = False) -> None:
    """Everything checked before a resume loads anything: model shape, data identity, file integrity."""
    check_model_matches(path, model_cfg)
    check_data_matches(path, data_info or {}, allow_data_change)
    check_checkpoint_files(path)
