"""What a resume checks before it loads anything: the model shape, the data, the files.

Each check raises a ConfigError / CheckpointError that names the mismatch and the fix, so a resume never fails
half-way through loading (or, worse, silently continues on something else).
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

from dpar_scale.checkpoint.save_load import DATA_FILE, MARKER, CheckpointError, older_hint, read_checkpoint_file
from dpar_scale.config import ConfigError

# Fields of the resolved model config that change parameter shapes or the meaning of the weights; a checkpoint
# resumes only into a model that agrees on all of them.
MODEL_SHAPE_KEYS = ("kind", "dim", "n_heads", "n_layers", "n_encoder_layers", "n_global_layers", "n_decoder_layers",
                    "ffn_multiple_of", "ffn_dim_multiplier", "vocab_size", "num_classes", "grid", "global_rope")
# DPAR's structure (which modules exist) is part of its shape too; a config saved before these keys existed
# holds the legacy structure (dpar_scale.config.with_legacy_sections).
DPAR_STRUCTURE_KEYS = ("dpar.decoder_injection", "dpar.cross_attn_ffn")
# A text model's caption embedding (a class model has none: its model.text.* shape nothing). "conditioning" itself
# is a shape key: a text checkpoint holds no class embedding, a class checkpoint no text embedding.
TEXT_SHAPE_KEYS = ("text.vocab_size",)


def check_checkpoint_files(path: Path) -> None:
    """Every file listed in complete.json exists with the size it was written with, and the sha256 recorded
    for it (rank r hashing every world-size-th file; all ranks raise the same error), and train_state.pt is a
    complete zip archive. A truncated, corrupt or partly copied checkpoint fails here, naming the file."""
    from dpar_scale.integrity import FileCheck, check_files
    from dpar_scale.parallel.process_group import work_share

    path = Path(path)
    marker = read_checkpoint_file(path / MARKER, lambda f: json.loads(f.read_text()))
    files = marker.get("files", {})
    problems = []
    for rel, record in sorted(files.items()):
        size = record["bytes"] if isinstance(record, dict) else record
        file = path / rel
        if not file.is_file():
            problems.append(f"checkpoint file {file} is missing (complete.json lists it); the checkpoint was "
                            f"partly deleted or copied")
        elif file.stat().st_size != size:
            problems.append(f"checkpoint file {file} has {file.stat().st_size} bytes but was written with {size}: "
                            f"it is corrupt or truncated (e.g. an interrupted copy or a full disk)")
    if not problems:
        hashed = sorted(rel for rel, record in files.items() if isinstance(record, dict) and "sha256" in record)
        problems = check_files([FileCheck(str(path / rel), files[rel]["sha256"], what="checkpoint file")
                                for rel in hashed], work_share())
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}. {older_hint(path)}")

    def check_zip(f: Path) -> None:
        with zipfile.ZipFile(f) as z:
            z.namelist()

    read_checkpoint_file(path / "train_state.pt", check_zip)


_MISSING = object()


def _dotted(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def check_model_matches(path: Path, model_cfg) -> None:
    """Compares the checkpoint's saved (resolved) model config with `model_cfg` (resolved); raises ConfigError
    naming every differing shape key with both values, and the overrides that resume the checkpoint."""
    import yaml

    from dpar_scale.config import to_dict, with_legacy_sections

    saved_file = Path(path) / "config.yaml"
    if not saved_file.is_file():
        return  # nothing recorded to compare with; the weights' shapes are checked when loading
    saved = read_checkpoint_file(saved_file, lambda f: yaml.safe_load(f.read_text()) or {})
    saved_model = (with_legacy_sections(saved).get("model") or {}) if isinstance(saved, dict) else {}
    current = to_dict(model_cfg)
    keys = MODEL_SHAPE_KEYS + (DPAR_STRUCTURE_KEYS if current.get("kind") == "dpar" else ()) + ("conditioning",) \
        + (TEXT_SHAPE_KEYS if current.get("conditioning") == _dotted(saved_model, "conditioning") == "text" else ())
    diffs, fixes = [], []
    for key in keys:
        a, b = _dotted(saved_model, key), _dotted(current, key)
        if a is _MISSING:
            continue
        if isinstance(a, (list, tuple)):
            a = list(a)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            diffs.append(f"model.{key}: checkpoint {_override_value(a)}, config {_override_value(b)}")
            fixes.append(f"model.{key}={_override_value(a)}")
    if diffs:
        raise ConfigError(f"checkpoint {path} does not fit the configured model: {'; '.join(diffs)} — resume with "
                          f"the checkpoint's model config (its config.yaml; here: {' '.join(fixes)}) or start a "
                          f"new run.output_dir")


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
