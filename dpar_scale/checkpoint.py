"""Single-process checkpoints: one folder per step, written atomically, loaded without unpickling objects.

Layout of `<run>/checkpoints/step-000123/`:
  model.safetensors      weights (what sampling and export need)
  ema.safetensors        EMA weights, when EMA is on
  train_state.pt         optimizer, scheduler, TrainState, RNG states (tensors and plain Python values only,
                         so `torch.load(weights_only=True)` reads it)
  config.yaml            the resolved config of the run
The folder is written under a temporary name and renamed when complete, so a crash during a save leaves the
previous checkpoint as the newest loadable one.
"""
from __future__ import annotations

import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpar_scale.config import Config, load_config, save_config

STEP_DIR = re.compile(r"^step-(\d{6,})$")


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


def save_checkpoint(output_dir, cfg: Config, model, optimizer, scheduler, state: TrainState, ema=None,
                    keep_last: int = 0, protect: Path | None = None) -> Path:
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
    model.load_state_dict(load_file(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    blob = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
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
