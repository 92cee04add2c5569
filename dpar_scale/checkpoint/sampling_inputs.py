"""Everything sampling a checkpoint needs, found from the checkpoint itself: the model, the tokenizer its data
manifest names, and for DPAR the entropy model and the patch rule (the trained one, or an inference-time
override of it).

Where things come from:
* the model and its config: `load_model_for_inference(checkpoint)`: a training checkpoint folder (sharded DCP or
  DeepSpeed; EMA weights when it has them) or an export (model.safetensors + config.json);
* the tokenizer: `tokenizer_path`, else the one recorded in `<data.codes_dir>/manifest.json` (its name too; with
  only a path and no manifest the name is `tokenizer_name`, or guessed from the suffix: .safetensors = kmeans,
  .pt/.pth = llamagen-vq16);
* DPAR's entropy model: `entropy_checkpoint`, else `entropy_checkpoint` in the entropy manifest
  (`<data.entropy_dir or data.codes_dir/entropy>/manifest.json`, written by tools/compute_entropy.py). Entropies
  are rounded to the dtype the manifest says training read them in (float16), so the boundaries follow
  training's rule exactly; mode=static needs no entropy model;
* a text model's text tokenizer: the one the checkpoint / export carries (dpar_scale.checkpoint.text_model), or
  `text_tokenizer_path`, which must be that same model;
* the patch rule: the checkpoint's `model.patch`, with `patch_overrides` (dotted `model.patch.*=value` strings)
  applied on top; only DPAR has one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpar_scale.checkpoint.export import load_model_for_inference
from dpar_scale.checkpoint.save_load import CheckpointError
from dpar_scale.config import Config, ConfigError, PatchConfig, override
from dpar_scale.errors import DparError

__all__ = ["SamplingInputError", "SamplingInputs", "load_sampling_inputs", "resolve_dir", "describe_rule"]

SUFFIX_TOKENIZER = {".safetensors": "kmeans", ".pt": "llamagen-vq16", ".pth": "llamagen-vq16"}
_REPO = Path(__file__).resolve().parents[2]


class SamplingInputError(DparError, ValueError):
    """A problem with what sampling was pointed at, reported as one clear line."""


@dataclass
class SamplingInputs:
    model: torch.nn.Module
    cfg: Config  # the checkpoint's config, with the patch rule overrides applied
    tokenizer: torch.nn.Module
    tokenizer_name: str
    tokenizer_path: str
    entropy_model: torch.nn.Module | None = None
    entropy_dtype: torch.dtype = torch.float32
    entropy_checkpoint: str = ""
    manifest: dict | None = None  # the codes manifest (class names), when there is one
    text_tokenizer: object | None = None  # a text model's TextTokenizer (prompts -> ids)
    prompts: list | None = None  # a text model's caption set to sample (tools/sample_ddp.py --captions)
    sources: dict = field(default_factory=dict)  # where each piece came from, for logs and meta files

    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    @property
    def patch_cfg(self) -> PatchConfig | None:
        return self.cfg.model.patch if self.kind == "dpar" else None


def resolve_dir(path: str) -> Path | None:
    """A config path as the run saw it: absolute, or relative to the working directory or the repository."""
    if not path:
        return None
    for candidate in (Path(path), _REPO / path):
        if candidate.is_dir():
            return candidate.resolve()
    return Path(path)


def _read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _resolve_tokenizer(tokenizer_path: str, tokenizer_name: str, manifest: dict | None,
                       manifest_path: Path | None) -> tuple[str, str]:
    recorded = (manifest or {}).get("tokenizer") or {}
    path = tokenizer_path or recorded.get("path", "")
    if not path:
        where = f"{manifest_path} has no tokenizer" if manifest else \
            f"no codes manifest at {manifest_path or '(data.codes_dir is empty)'}"
        raise SamplingInputError(f"no tokenizer to decode with: {where}; pass --tokenizer-path PATH")
    name = tokenizer_name or recorded.get("name") or SUFFIX_TOKENIZER.get(Path(path).suffix, "")
    if not name:
        raise SamplingInputError(f"cannot tell which tokenizer {path!r} is; pass --tokenizer kmeans|llamagen-vq16")
    return name, path


def _resolve_entropy(entropy_checkpoint: str, cfg: Config, codes_dir: Path | None) -> tuple[str, torch.dtype, str]:
    """(entropy checkpoint, dtype training read the entropies in, where it came from)."""
    entropy_dir = resolve_dir(cfg.data.entropy_dir) if cfg.data.entropy_dir else (
        codes_dir / "entropy" if codes_dir else None)
    manifest_path = entropy_dir / "manifest.json" if entropy_dir else None
    manifest = _read_json(manifest_path)
    dtype = getattr(torch, (manifest or {}).get("dtype", "float32"), torch.float32)
    if entropy_checkpoint:
        return entropy_checkpoint, dtype, "--entropy-checkpoint"
    if manifest is None:
        raise SamplingInputError(
            f"DPAR with patch mode {cfg.model.patch.mode!r} needs its entropy model: no entropy manifest at "
            f"{manifest_path or '(data.codes_dir is empty)'}; pass --entropy-checkpoint")
    if not manifest.get("entropy_checkpoint"):
        raise SamplingInputError(f"{manifest_path} records no entropy_checkpoint; pass --entropy-checkpoint")
    return manifest["entropy_checkpoint"], dtype, str(manifest_path)


def _load_entropy_model(path: str, model, device):
    try:
        entropy_model, ecfg = load_model_for_inference(path, device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise SamplingInputError(f"entropy model: {e}") from None
    if getattr(entropy_model, "num_classes", 1) != 0:
        raise SamplingInputError(f"{path} is a {ecfg.model.kind} checkpoint, not the unconditional entropy model")
    if tuple(entropy_model.grid) != tuple(model.grid) or entropy_model.vocab_size != model.vocab_size:
        raise SamplingInputError(
            f"entropy model {path} (grid {entropy_model.grid}, vocab {entropy_model.vocab_size}) does not match the "
            f"DPAR model (grid {model.grid}, vocab {model.vocab_size})")
    return entropy_model


def describe_rule(patch_cfg: PatchConfig) -> str:
    text = (f"mode={patch_cfg.mode} alignment={patch_cfg.alignment} θ={patch_cfg.threshold:g} "
            f"P_max={patch_cfg.max_patch_length}" + ("" if patch_cfg.row_reset else " row_reset=false"))
    return text + (f" static_length={patch_cfg.static_length:g}" if patch_cfg.mode == "static" else "") + (
        f" θ_rel={patch_cfg.relative_threshold:g}" if patch_cfg.mode == "global+monotonic" else "")


def load_sampling_inputs(checkpoint: str, *, device: str | torch.device = "cpu", tokenizer_path: str = "",
                         tokenizer_name: str = "", entropy_checkpoint: str = "",
                         patch_overrides: list[str] | None = None, text_tokenizer_path: str = "") -> SamplingInputs:
    """Loads and checks everything before a (long) generation starts; SamplingInputError says what is missing."""
    try:
        model, cfg = load_model_for_inference(checkpoint, device=str(device))
    except (FileNotFoundError, CheckpointError) as e:
        raise SamplingInputError(str(e)) from None
    kind = cfg.model.kind
    if kind not in ("gpt", "dpar"):
        raise SamplingInputError(f"{checkpoint} is a {kind!r} model; sampling takes class- or text-conditional gpt "
                                 f"or dpar checkpoints")
    text_tokenizer = None
    if cfg.model.conditioning == "text":
        from dpar_scale.checkpoint.text_model import read_text_tokenizer
        from dpar_scale.text import TextTokenizerError

        try:
            text_tokenizer = read_text_tokenizer(checkpoint, text_tokenizer_path)
        except (FileNotFoundError, TextTokenizerError) as e:
            raise SamplingInputError(f"text tokenizer: {e}") from None
    elif text_tokenizer_path:
        raise SamplingInputError(f"{checkpoint} is class-conditional: a text tokenizer applies to text models only")
    trained_rule = cfg.model.patch
    if patch_overrides:
        if kind != "dpar":
            raise SamplingInputError(f"{checkpoint} is a {kind} model: --threshold / --max-patch-length / "
                                     f"--patch-mode apply to DPAR checkpoints only")
        try:
            cfg = override(cfg, patch_overrides)
        except ConfigError as e:
            raise SamplingInputError(f"patch rule override: {e}") from None
    codes_dir = resolve_dir(cfg.data.codes_dir)
    manifest_path = codes_dir / "manifest.json" if codes_dir else None
    manifest = _read_json(manifest_path)

    from dpar_scale.tokenizer import load_tokenizer

    tok_name, tok_path = _resolve_tokenizer(tokenizer_path, tokenizer_name, manifest, manifest_path)
    try:
        tokenizer = load_tokenizer(tok_name, tok_path, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise SamplingInputError(f"tokenizer: {e}") from None
    if getattr(tokenizer, "vocab_size", model.vocab_size) != model.vocab_size:
        raise SamplingInputError(f"tokenizer {tok_path} has {tokenizer.vocab_size} codes, the model "
                                 f"{model.vocab_size}")
    inputs = SamplingInputs(model=model, cfg=cfg, tokenizer=tokenizer, tokenizer_name=tok_name,
                            tokenizer_path=tok_path, manifest=manifest, text_tokenizer=text_tokenizer,
                            sources={"checkpoint": str(checkpoint), "tokenizer": tok_path})
    if kind == "dpar":
        inputs.sources["trained_patch_rule"] = describe_rule(trained_rule)
        if cfg.model.patch.mode != "static":
            path, inputs.entropy_dtype, source = _resolve_entropy(entropy_checkpoint, cfg, codes_dir)
            inputs.entropy_model = _load_entropy_model(path, model, device)
            inputs.entropy_checkpoint = path
            inputs.sources["entropy_checkpoint"] = f"{path} (from {source})"
    return inputs
