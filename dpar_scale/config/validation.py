"""Checks of values that types alone cannot express (choices, ranges, combinations of sections), and values
resolved from the data (train.epochs -> train.steps)."""
from __future__ import annotations

import math
from fractions import Fraction

from dpar_scale.config.sections import (
    CONDITIONINGS, DECODER_INJECTIONS, PATCH_ALIGNMENTS, PATCH_MODES, Config, ConfigError, DPARConfig, ModelConfig,
    PatchConfig,
)


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
