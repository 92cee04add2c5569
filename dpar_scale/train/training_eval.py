"""Evaluation during training (config `eval`): every `eval.every` steps, sample a balanced set with the KV-cached
sampler on all ranks and log the metrics tools/evaluate.py computes.

How, and why so:
* The weights sampled are a plain, unsharded replica of the model (EMA weights when train.ema > 0), loaded from
  the full state dict every rank gathers (`get_model_state_dict(full_state_dict=True)`, a collective every rank
  runs once). Sampling then runs no collective inside the model, so ranks may run different numbers of forward
  calls (DPAR's global model runs only when a patch closes, a number that depends on the samples): the FSDP2
  requirement that all ranks run the same forwards does not arise. DeepSpeed ZeRO-3 and tensor parallelism are
  refused (ConfigError): the gather is not wired (and not tested) for them.
* The set is `dpar_scale.sampling.chunked.sample_to_folder`'s: sample i's randomness and label are functions of
  (eval.seed, i, eval.num_samples), fixed chunks of eval.batch_size are generated together, so 1 and N ranks make
  the same images; the chunks go to RUN/eval/step_NNNNNNN/ (a crash during an evaluation resumes them).
* The metrics are `dpar_scale.evaluation.evaluate_samples` against eval.reference with eval.detector (feature
  extraction split over the ranks, reference statistics cached): fid_domain (domain detector) or fid (Inception),
  precision, recall, class_accuracy (domain detector), plus train_flops (TrainState.train_flops, checkpointed).
* The tokenizer and, for DPAR, the entropy model and patch rule come from the run's config and its codes /
  entropy manifests, found as tools/sample_ddp.py finds them.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from dpar_scale.config import Config, ConfigError

__all__ = ["EVAL_DIR", "TrainingEvaluator", "make_evaluator"]

EVAL_DIR = "eval"


def _detector_spec(spec: str) -> str:
    return spec if spec.partition(":")[0] in ("domain", "inception") and ":" in spec else f"inception:{spec}"


class TrainingEvaluator:
    """Built once by the trainer (loads the tokenizer, entropy model and detector); `run(...)` is collective."""

    def __init__(self, cfg: Config, device: torch.device, engine_name: str, zero_stage: int | None, tp: int):
        from dpar_scale.checkpoint.sampling_inputs import (
            SamplingInputError, _load_entropy_model, _read_json, _resolve_entropy, _resolve_tokenizer, resolve_dir,
        )
        from dpar_scale.evaluation import load_detector
        from dpar_scale.models import build_model
        from dpar_scale.tokenizer import load_tokenizer

        if engine_name == "deepspeed" and (zero_stage or 0) >= 3:
            raise ConfigError("eval.every > 0 with DeepSpeed ZeRO-3: the sampler needs the full weights, which "
                              "ZeRO-3 partitions; evaluate checkpoints with tools/sample_ddp.py --evaluate instead, "
                              "or set eval.every=0")
        if tp > 1:
            raise ConfigError("eval.every > 0 with tensor parallelism (parallel.tp > 1) is not supported: evaluate "
                              "checkpoints with tools/sample_ddp.py --evaluate instead, or set eval.every=0")
        self.cfg, self.device = cfg, device
        self.detector_spec = _detector_spec(cfg.eval.detector)
        self.detector = load_detector(self.detector_spec, device)  # a bad file fails at start, not at step N
        codes_dir = resolve_dir(cfg.data.codes_dir)
        manifest_path = codes_dir / "manifest.json" if codes_dir else None
        try:
            tok_name, tok_path = _resolve_tokenizer("", "", _read_json(manifest_path), manifest_path)
            self.tokenizer = load_tokenizer(tok_name, tok_path, device=device)
        except (SamplingInputError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"eval.every > 0 needs the tokenizer to decode samples: {e}") from None
        self.tokenizer_name, self.tokenizer_path = tok_name, tok_path
        self.replica = build_model(cfg.model).to(device).eval()
        self.entropy_model, self.entropy_dtype, self.entropy_checkpoint = None, torch.float32, ""
        if cfg.model.kind == "dpar" and cfg.model.patch.mode != "static":
            try:
                path, self.entropy_dtype, _ = _resolve_entropy("", cfg, codes_dir)
                self.entropy_model = _load_entropy_model(path, self.replica, device)
            except SamplingInputError as e:
                raise ConfigError(f"eval.every > 0 for DPAR needs its entropy model: {e}") from None
            self.entropy_checkpoint = path

    def _load_weights(self, model: torch.nn.Module, ema) -> None:
        """The full (EMA) state dict of the training model into the replica (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        # copied into the replica inside the swap: without sharding the state dict holds views of the live
        # parameters, which the swap's exit restores to the training weights
        with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
            self.replica.load_state_dict(get_model_state_dict(model, options=options))
        self.replica.eval()

    def run(self, model: torch.nn.Module, ema, step: int, out_dir: Path, train_flops: float,
            progress: bool = False) -> dict:
        """Collective on every rank: the metrics record for metrics.jsonl (the same on every rank)."""
        from dpar_scale.checkpoint.sampling_inputs import SamplingInputs
        from dpar_scale.evaluation import evaluate_samples
        from dpar_scale.sampling.chunked import SampleSettings, sample_to_folder

        started = time.perf_counter()
        e, cfg = self.cfg.eval, self.cfg
        self._load_weights(model, ema)
        inputs = SamplingInputs(model=self.replica, cfg=cfg, tokenizer=self.tokenizer,
                                tokenizer_name=self.tokenizer_name, tokenizer_path=self.tokenizer_path,
                                entropy_model=self.entropy_model, entropy_dtype=self.entropy_dtype,
                                entropy_checkpoint=self.entropy_checkpoint,
                                sources={"training_step": step, "ema": ema is not None})
        settings = SampleSettings(num_samples=e.num_samples, seed=e.seed,
                                  cfg_scale=e.cfg_scale or cfg.sample.cfg_scale, temperature=e.temperature,
                                  top_k=e.top_k, top_p=e.top_p, batch_size=e.batch_size, labels="balanced",
                                  resize=cfg.sample.resize)
        folder = Path(out_dir) / EVAL_DIR / f"step_{step:07d}"
        with torch.no_grad():
            result = sample_to_folder(inputs, settings, folder, device=self.device, progress=progress)
        metrics = evaluate_samples(result.samples_path, e.reference, self.detector,
                                   batch_size=e.detector_batch_size, device=self.device,
                                   cache_dir=e.cache_dir or None, progress=progress)
        record = {"step": step, "train_flops": float(train_flops)}
        for key in ("fid_domain", "fid", "precision", "recall", "class_accuracy", "inception_score"):
            if key in metrics:
                record[key] = metrics[key]
        record.update(eval_samples=e.num_samples, eval_ema=ema is not None,
                      eval_seconds=round(time.perf_counter() - started, 3))
        return record


def make_evaluator(cfg: Config, device: torch.device, engine, dims) -> TrainingEvaluator | None:
    """The trainer's evaluator when eval.every > 0 (None when off)."""
    if not cfg.eval.every:
        return None
    return TrainingEvaluator(cfg, device, engine.name, getattr(engine, "stage", None), dims.tp)
