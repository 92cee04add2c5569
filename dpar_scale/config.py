"""Typed run configuration: nested dataclasses, loaded from YAML, overridden with dotted `key=value` pairs.

Every entry point (train.py, the tools, the launchers) builds a `Config` the same way:
`load_config(path, overrides)`. Unknown keys and values of the wrong type are rejected with the dotted key in
the message, so a typo in a 48-hour Slurm job fails in the first second instead of being silently ignored.

A YAML file may start from others: `include: base.yaml` (or a list, paths relative to the including file) reads
those first, in order, and the file's own keys then override theirs (mappings merge key by key; lists and scalars
are replaced). Dotted overrides apply last. `configs/paper/` is built this way: one recipe, one file per
resolution, one small file per run.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from dpar_scale.errors import DparError


class ConfigError(DparError, ValueError):
    """A config file or override that cannot be applied; the message names the dotted key."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    name: str = ""  # wandb run name; defaults to the output folder's name


@dataclass
class DataConfig:
    codes_dir: str = ""  # folder written by tools/extract_codes.py (manifest.json + shards)
    entropy_dir: str = ""  # folder written by tools/compute_entropy.py; "" = <codes_dir>/entropy
    val_fraction: float = 0.02  # held-out images (by index) for the validation loss
    batch_size: int = 32  # images per optimizer step, summed over data-parallel ranks (global batch)
    # DPAR: fill each micro-batch up to this many global positions Σ (M_i + 1) instead of a fixed image count
    # (data.batch_size is then unused: a step is grad_accum x data-parallel micro-batches); 0 = off
    global_tokens_per_microbatch: int = 0
    # DPAR packing: at most this many images per micro-batch (encoder/decoder activations and the [B, N, V] logits
    # grow with images, not global positions); 0 = only the position budget limits them
    max_images_per_microbatch: int = 0
    # background threads building the next steps' batches (gather, patch rule, packing, layouts; pinned on CUDA)
    # while the current step runs; 0 = built in the training loop. Same batches either way.
    num_workers: int = 0
    prefetch_steps: int = 2  # with num_workers > 0: steps built ahead of the one training
    log_sample_ids: bool = False
    # checked when the data is opened (values always, chunked over the memory maps): full = sizes + sha256 of every
    # shard against its manifest; size = sizes only. Verified files are cached per user (~/.cache/dpar_scale)
    verify: str = "full"
    # model.conditioning=text: caption shards written by tools/extract_codes.py --captions; "" = <codes_dir>/captions
    captions_dir: str = ""


@dataclass
class PatchConfig:
    mode: str = "global"  # global | monotonic | global+monotonic | static
    alignment: str = "reference"  # reference (e[k-1] > θ starts code k) | blt (e[k] > θ)
    threshold: float = 7.8  # θ in nats (mode=monotonic: the rise e_k - e_(k-1) that starts a patch); ignored by static
    max_patch_length: int = 4  # P_max; >= H·W never splits a run (no maximum length)
    # patch length for mode=static; fractional (e.g. 1.81) = that mean length, see dpar_scale/patching/rule.py
    static_length: float = 2
    row_reset: bool = True  # every row starts a patch (false: the paper's "no row reset" ablation)
    relative_threshold: float = 0.0  # θ_rel of mode=global+monotonic (e_k - e_(k-1) > θ_rel); 0 = unset


@dataclass
class DPARConfig:
    """Which DPAR structure to build. The defaults are the authors' model code; the other values are today's
    ablations (a checkpoint's config.yaml records which one it holds, and resumes only into the same one)."""

    # every: before each decoder layer every code adds its patch's global state through that layer's own
    # RMSNorm + Linear (the authors' one-key cross-attention); first: once, before the first decoder layer
    decoder_injection: str = "every"
    cross_attn_ffn: bool = False  # a SwiGLU FFN after the encoder's patch cross-attention (not in the authors' code)


@dataclass
class TextConfig:
    """Text conditioning (model.conditioning=text): the caption's sentencepiece tokens prefix each image."""

    tokenizer: str = ""  # a sentencepiece .model: tools/train_text_tokenizer.py, or e.g. T5's spiece.model
    # rows of the text embedding: >= the tokenizer's vocabulary (extra rows, e.g. padding to a multiple of the
    # tensor-parallel degree, are never produced by it)
    vocab_size: int = 0
    max_length: int = 64  # tokens per caption, eos included; longer captions are truncated (and counted)
    dropout: float = 0.1  # probability of training on the empty caption instead (classifier-free guidance)


# What a run config saved before `model.dpar` existed describes: the only DPAR structure there was then.
LEGACY_DPAR = {"decoder_injection": "first", "cross_attn_ffn": True}


@dataclass
class ModelConfig:
    kind: str = ""  # gpt | entropy | dpar; "" = the preset's kind
    preset: str = ""  # e.g. gpt-b, dpar-xl, dpar-tiny; explicit fields below override the preset
    dim: int = 0
    n_heads: int = 0
    n_layers: int = 0  # gpt/entropy depth
    n_encoder_layers: int = 0  # dpar local encoder
    n_global_layers: int = 0  # dpar global transformer
    n_decoder_layers: int = 0  # dpar local decoder
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: float = 0.0  # 0 = LLaMA's 8/3 rule
    vocab_size: int = 16384
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    dropout: float = 0.1
    class_dropout: float = 0.1  # probability of replacing the label by the null class (CFG)
    rope_base: float = 10000.0
    global_rope: str = "dynamic"  # dynamic | 1d
    # gpt/entropy: rotation of the condition position. identity: cos 1, sin 0 (its q/k keep their content);
    # zero: cos = sin = 0, which zeroes the class token's q and k, as LlamaGen's table does (imported LlamaGen
    # checkpoints need it to give LlamaGen's logits)
    class_rope: str = "identity"
    norm_eps: float = 1e-5
    # auto (varlen on CUDA in bf16/fp16, else sdpa) | sdpa (documents grouped by length) | flex | varlen (CUDA)
    attention_backend: str = "auto"
    # class: the label conditions the image (class_dropout for CFG); text: the caption does (model.text)
    conditioning: str = "class"
    patch: PatchConfig = field(default_factory=PatchConfig)
    dpar: DPARConfig = field(default_factory=DPARConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    steps: int = 1000
    # > 0: the run is this many epochs and train.steps is derived from the data at start (see `resolve_epochs`;
    # one epoch = every training source image once, whatever the number of augmented views per image)
    epochs: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # 0 = only at the end
    val_batches: int = 8
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    ema: float = 0.0  # 0 = off; else the EMA decay, e.g. 0.9999
    progress_bar: bool = True
    # device dense peak for MFU, of the precision the matmuls use (bf16, or TF32 / fp32 for train.precision=fp32);
    # 0 = look the GPU up in dpar_scale.flops.analytic's table
    peak_tflops: float = 0.0
    # CUDA: fp32 matmuls (train.precision=fp32) run on TF32 tensor cores; false = full fp32 (slower, exact fp32)
    tf32: bool = True
    # deterministic kernels where torch has them (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace);
    # torch warns, naming the op, where it has none (see the README's "Checkpoints and resume")
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only the final one
    resume: str = ""  # "" | auto | path to a checkpoint folder
    keep_last: int = 3
    # resume on codes / entropies other than the ones the checkpoint was trained on (a warning instead of an error)
    allow_data_change: bool = False
    # sha256 of every checkpoint file in complete.json, hashed and verified with the work spread over the ranks
    # (catches a corrupt shard, not only a truncated one); false records sizes only
    checksums: bool = True
    # write the shards in a background thread (FSDP2 engine): the step waits only for the copy to CPU memory; the
    # checkpoint becomes visible (complete.json, rename) at the first step boundary after every rank's writes
    # finished (at the latest at the next save or at the end of the run)
    async_save: bool = False
    # DeepSpeed checkpoint resumed on another process count: worker processes of its universal conversion (rank 0
    # converts while the other ranks wait); 0 = one per CPU core of rank 0's node, at most 8
    universal_workers: int = 0
    # how long the other ranks wait for that conversion; 0 = derived from the checkpoint's size (see
    # dpar_scale.train.deepspeed_engine.universal_timeout)
    universal_timeout_min: float = 0.0


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 = the rest of the world
    tp: int = 1
    activation_checkpoint: str = "none"  # none | full | selective
    compile: bool = False
    # with compile, the packed global length is padded to a multiple of this, so a run sees a handful of shapes
    compile_bucket: int = 128


@dataclass
class SampleConfig:
    """How a trained model is sampled for evaluation: tools/sample.py and tools/sample_ddp.py use these when
    --cfg-scale / --resize are not given (the run's config.yaml carries them into its checkpoints)."""

    cfg_scale: float = 2.0  # classifier-free guidance (LlamaGen / DPAR: 2.0 for B and L, 1.75 for XL and XXL)
    resize: int = 0  # bicubic resize to R x R before uint8 (384-px models are evaluated at 256); 0 = off


@dataclass
class EvalConfig:
    """Evaluation during training (dpar_scale/sampling/training_eval.py): every `every` steps the trainer samples
    `num_samples` images (balanced labels, sample i's randomness a function of (seed, i), so the set does not depend
    on the world size) with the KV-cached sampler on all ranks, with the EMA weights when train.ema > 0, and logs
    the metrics of tools/evaluate.py (fid_domain or fid, precision, recall, class_accuracy) with train_flops."""

    every: int = 0  # steps between evaluations; 0 = off
    num_samples: int = 100
    cfg_scale: float = 0.0  # classifier-free guidance scale; 0 = sample.cfg_scale
    detector: str = ""  # domain:PATH (tools/fit_evaluator.py) or inception:PATH (a bare path: Inception TorchScript)
    reference: str = ""  # what tools/evaluate.py --reference takes: ImageFolder of real images or an npz
    batch_size: int = 32  # samples generated together (fixed chunks: the floats do not depend on the world size)
    detector_batch_size: int = 64
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cache_dir: str = ""  # where reference statistics are cached (default: beside the reference)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "dpar-scale"
    mode: str = "offline"  # offline unless the user has logged in and sets online


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# --------------------------------------------------------------------------------------------------- coercion
def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Returns `value` converted to `annotation`, or raises ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {annotation}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r} "
            f"(valid keys at {where}: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parses the right-hand side of an override with YAML rules (so 1e-4, true, [16,16] work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings to a nested dict (validated later against the dataclasses)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. model.dim=64)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return values


def _read_mapping(path: str | Path, included_by: Path | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        where = f" (included by {str(included_by)!r})" if included_by else ""
        raise ConfigError(f"config file {str(path)!r} does not exist{where}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


INCLUDE_KEY = "include"


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The values of a YAML config with its `include:` files merged in (see the module docstring)."""
    path, here = Path(path), Path(path).resolve()
    if here in _chain:
        raise ConfigError("config include cycle: " + " -> ".join(str(p) for p in _chain + (here,)))
    values = _read_mapping(path, _chain[-1] if _chain else None)
    includes = values.pop(INCLUDE_KEY, [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY} must be a file name or a list of file names (relative to "
                          f"{path.parent}), got {includes!r}")
    merged: dict = {}
    for name in includes:
        merged = _deep_merge(merged, read_config_file(here.parent / name, _chain + (here,)))
    return _deep_merge(merged, values)


def _from_values(values: dict, overrides: list[str], cls: type) -> Any:
    # Start from the defaults so that overrides can name keys the file does not mention.
    merged = apply_overrides(_deep_merge(to_dict(cls()), values), overrides)
    cfg = _build(cls, merged)
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Reads YAML (optional), applies dotted overrides, validates types and keys, and checks values."""
    return _from_values(read_config_file(path) if path else {}, overrides or [], cls)


def with_legacy_sections(values: dict) -> dict:
    """A saved config's values (parsed YAML / JSON) with the sections that did not exist when it was written
    filled in with what the run then used: a model config without `dpar` gets LEGACY_DPAR."""
    model = values.get("model") if isinstance(values, dict) else None
    if isinstance(model, dict) and "dpar" not in model:
        values = {**values, "model": {**model, "dpar": dict(LEGACY_DPAR)}}
    return values


def load_saved_config(path: str | Path) -> Config:
    """The config a run saved (a checkpoint's config.yaml, an export's config.json): `load_config`, except that a
    file written before a section existed means that section's legacy values (see `with_legacy_sections`), so
    an old checkpoint is rebuilt as the model it holds."""
    return _from_values(with_legacy_sections(_read_mapping(path)), [], Config)


def override(cfg: Any, overrides: list[str]) -> Any:
    """A validated copy of a loaded `cfg` with dotted overrides applied (e.g. an inference-time patch rule)."""
    out = _build(type(cfg), apply_overrides(to_dict(cfg), list(overrides)))
    if isinstance(out, Config):
        validate(out)
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


DECODER_INJECTIONS = ("every", "first")
CONDITIONINGS = ("class", "text")


def parse_dpar_structure(text: str) -> DPARConfig:
    """The tools' `--dpar INJECTION,FFN` (e.g. every,false: the authors' structure; first,true: the legacy one)."""
    injection, _, ffn = text.partition(",")
    if injection not in DECODER_INJECTIONS or ffn not in ("true", "false"):
        raise ConfigError(f"--dpar {text!r}: expected INJECTION,FFN with INJECTION one of "
                          f"{', '.join(DECODER_INJECTIONS)} (model.dpar.decoder_injection) and FFN true or false "
                          f"(model.dpar.cross_attn_ffn), e.g. --dpar first,true")
    return DPARConfig(injection, ffn == "true")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")


PATCH_MODES = ("global", "monotonic", "global+monotonic", "static")
PATCH_ALIGNMENTS = ("reference", "blt")


def validate_patch(patch: PatchConfig, key: str = "model.patch") -> None:
    """Checks a patch rule on its own (tools build one from their flags): every field the mode reads is usable."""
    _choice(f"{key}.mode", patch.mode, PATCH_MODES)
    _choice(f"{key}.alignment", patch.alignment, PATCH_ALIGNMENTS)
    for name in ("max_patch_length", "static_length"):
        if getattr(patch, name) < 1:
            raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(patch, name)}")
    rel = patch.relative_threshold
    if patch.mode == "global+monotonic" and not rel > 0:
        raise ConfigError(f"{key}.mode=global+monotonic needs {key}.relative_threshold > 0 (θ_rel: a rise "
                          f"e_k - e_(k-1) > θ_rel starts a patch, besides e_k > {key}.threshold), got {rel}")
    if patch.mode != "global+monotonic" and rel != 0:
        raise ConfigError(f"{key}.relative_threshold={rel} is read only by {key}.mode=global+monotonic, not by "
                          f"mode={patch.mode}" + (f" (whose rise threshold is {key}.threshold)"
                                                  if patch.mode == "monotonic" else "") + f"; remove it or set "
                          f"{key}.mode=global+monotonic")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    _choice("model.kind", cfg.model.kind, ("", "gpt", "entropy", "dpar"))
    _choice("model.global_rope", cfg.model.global_rope, ("dynamic", "1d"))
    _choice("model.class_rope", cfg.model.class_rope, ("identity", "zero"))
    _choice("model.attention_backend", cfg.model.attention_backend, ("auto", "sdpa", "flex", "varlen"))
    validate_patch(cfg.model.patch)
    _choice("model.dpar.decoder_injection", cfg.model.dpar.decoder_injection, DECODER_INJECTIONS)
    _choice("optim.schedule", cfg.optim.schedule, ("constant", "cosine"))
    _choice("train.precision", cfg.train.precision, ("fp32", "bf16"))
    _choice("parallel.activation_checkpoint", cfg.parallel.activation_checkpoint, ("none", "full", "selective"))
    _choice("wandb.mode", cfg.wandb.mode, ("offline", "online", "disabled"))
    _choice("data.verify", cfg.data.verify, ("full", "size"))
    for key, value in (("train.steps", cfg.train.steps), ("train.grad_accum", cfg.train.grad_accum),
                       ("train.log_every", cfg.train.log_every), ("data.batch_size", cfg.data.batch_size),
                       ("parallel.tp", cfg.parallel.tp), ("parallel.dp_replicate", cfg.parallel.dp_replicate),
                       ("parallel.compile_bucket", cfg.parallel.compile_bucket)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest), got {cfg.parallel.dp_shard}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema must be in [0, 1), got {cfg.train.ema}")
    for key, value in (("checkpoint.universal_workers", cfg.checkpoint.universal_workers),
                       ("checkpoint.universal_timeout_min", cfg.checkpoint.universal_timeout_min)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = automatic), got {value}")
    for key, value, zero in (("data.num_workers", cfg.data.num_workers, "batches built in the training loop"),
                             ("data.max_images_per_microbatch", cfg.data.max_images_per_microbatch, "no cap")):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = {zero}), got {value}")
    if cfg.data.prefetch_steps < 1:
        raise ConfigError(f"data.prefetch_steps must be >= 1 (steps built ahead), got {cfg.data.prefetch_steps}")
    if cfg.train.epochs < 0:
        raise ConfigError(f"train.epochs must be >= 0 (0 = train.steps decides), got {cfg.train.epochs}")
    if cfg.train.epochs > 0 and cfg.data.global_tokens_per_microbatch > 0:
        raise ConfigError("train.epochs counts images per step from data.batch_size, but "
                          "data.global_tokens_per_microbatch packs a varying number of images: set train.steps "
                          "instead of train.epochs, or data.global_tokens_per_microbatch=0")
    if cfg.sample.resize < 0:
        raise ConfigError(f"sample.resize must be >= 0 (0 = off), got {cfg.sample.resize}")
    validate_eval(cfg)
    _validate_text(cfg.model)


def validate_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.every < 0:
        raise ConfigError(f"eval.every must be >= 0 (0 = off), got {e.every}")
    if e.every == 0:
        return
    if cfg.model.kind not in ("gpt", "dpar"):
        raise ConfigError(f"eval.every={e.every}: evaluation during training samples class-conditional gpt / dpar "
                          f"models, not {cfg.model.kind!r}; set eval.every=0")
    if not e.detector or not e.reference:
        raise ConfigError("eval.every > 0 needs eval.detector (domain:PATH from tools/fit_evaluator.py, or "
                          "inception:PATH) and eval.reference (the real images' ImageFolder or a reference npz)")
    kind = e.detector.partition(":")[0] if ":" in e.detector else "inception"
    if kind not in ("domain", "inception"):
        raise ConfigError(f"eval.detector={e.detector!r}: expected domain:PATH or inception:PATH")
    for key in ("num_samples", "batch_size", "detector_batch_size"):
        if getattr(e, key) < 1:
            raise ConfigError(f"eval.{key} must be >= 1, got {getattr(e, key)}")
    if e.num_samples < 4:
        raise ConfigError(f"eval.num_samples={e.num_samples}: precision / recall need more than 3 samples")
    if e.seed < 0 or e.top_k < 0 or not 0.0 < e.top_p <= 1.0 or e.cfg_scale < 0:
        raise ConfigError("eval.seed and eval.top_k must be >= 0, eval.top_p in (0, 1], eval.cfg_scale >= 0 "
                          "(0 = sample.cfg_scale)")


def _validate_text(model: ModelConfig) -> None:
    _choice("model.conditioning", model.conditioning, CONDITIONINGS)
    text = model.text
    if text.max_length < 2:
        raise ConfigError(f"model.text.max_length must be >= 2 (at least one caption token and the eos that ends "
                          f"every caption), got {text.max_length}")
    if not 0.0 <= text.dropout < 1.0:
        raise ConfigError(f"model.text.dropout must be in [0, 1), got {text.dropout}")
    if text.vocab_size < 0:
        raise ConfigError(f"model.text.vocab_size must be >= 0, got {text.vocab_size}")
    if model.preset.endswith("-text") and model.conditioning != "text":
        raise ConfigError(f"model.preset={model.preset} is a text-to-image model: set model.conditioning=text (and "
                          f"model.text.tokenizer / model.text.vocab_size), or pick {model.preset[:-5]} for classes")
    if model.conditioning != "text":
        return
    if model.kind == "entropy":
        raise ConfigError("model.conditioning=text: the entropy model is unconditional (patch boundaries depend "
                          "on the image, not on the prompt); set model.conditioning=class for kind=entropy")
    if not text.tokenizer:
        raise ConfigError("model.conditioning=text needs model.text.tokenizer: a sentencepiece .model (train one "
                          "with tools/train_text_tokenizer.py --captions CAPTIONS.jsonl --vocab-size V --out "
                          "text.model, or give an existing one such as T5's spiece.model)")
    if text.vocab_size < 1:
        raise ConfigError("model.conditioning=text needs model.text.vocab_size: the text embedding's rows, at "
                          "least the tokenizer's vocabulary (tools/train_text_tokenizer.py prints it)")


def steps_for_epochs(epochs: float, num_train_images: int, batch_size: int) -> int:
    """Optimizer steps that show `epochs` x `num_train_images` samples at `batch_size` images per step (rounded
    up, exactly: 300 epochs of ImageNet's 1,281,167 images at batch 256 is 1,501,368 steps).

    One epoch is every *source image* once, as in LlamaGen's training: its ten-crop code set has one item per image
    holding the image's ten views, and each time the item is drawn one view is picked at random. Here every view
    is a row of the global order, so `epochs` epochs are epochs / views passes over the rows: each image is still
    seen `epochs` times (exactly, when epochs is a multiple of the views per image), each time in one of its views.
    LlamaGen drops the last incomplete batch of each epoch (300 x floor(1,281,167 / 256) = 1,501,200 steps);
    the cursor here runs on across epochs, so nothing is dropped."""
    if num_train_images < 1 or batch_size < 1:
        raise ConfigError(f"train.epochs needs training images and a batch size, got {num_train_images} images "
                          f"and data.batch_size={batch_size}")
    return max(1, math.ceil(Fraction(epochs) * num_train_images / batch_size))


def resolve_epochs(cfg: Config, num_train_images: int) -> str | None:
    """With train.epochs > 0, sets cfg.train.steps from the data's size and returns the line that says so;
    None (and nothing changed) when the run is counted in steps."""
    if cfg.train.epochs <= 0:
        return None
    cfg.train.steps = steps_for_epochs(cfg.train.epochs, num_train_images, cfg.data.batch_size)
    return (f"train.epochs={cfg.train.epochs:g} x {num_train_images:,} training images / data.batch_size="
            f"{cfg.data.batch_size} -> train.steps={cfg.train.steps:,}")


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes the resolved config as YAML (the run folder's `config.yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
