"""Trainer set-up: everything a run needs before its first step, as one explicit sequence (`TrainerSetup.__init__`).

Process group (torchrun / DeepSpeed launcher / Slurm) -> `ParallelDims` and the device mesh -> data -> model built
on the meta device -> `parallelize` (TP/SP -> activation checkpointing -> compile -> FSDP2) -> materialise this
rank's shards and initialise them layout-independently -> optimizer + LR schedule -> engine (native, or DeepSpeed
with `deepspeed_config`) -> resume -> run folder and metrics logger. Also the process layout recorded in
checkpoints (`layout`). The loop that runs on what is built here is `dpar_scale.train.trainer.Trainer`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dpar_scale.checkpoint.resume_checks import check_resume
from dpar_scale.checkpoint.save_load import (
    PendingCheckpoint, TrainState, find_resume_checkpoint, load_checkpoint, read_train_state,
)
from dpar_scale.config import Config, ConfigError, resolve_epochs, save_config, to_dict
from dpar_scale.data.loader import BatchSource, CodeData, GlobalOrder, TextSource
from dpar_scale.parallel.dims import ParallelDims
from dpar_scale.parallel.process_group import LaunchEnv, default_device, init_process_group, work_share
from dpar_scale.train.batches import StepBatches
from dpar_scale.train.ema import EMA
from dpar_scale.train.metrics_log import MetricsLogger
from dpar_scale.train.numerics import configure_numerics
from dpar_scale.train.optim import build_optimizer, lr_lambda
from dpar_scale.train.pending import PendingSteps
from dpar_scale.train.prefetch import Prefetcher
from dpar_scale.train.training_eval import make_evaluator
from dpar_scale.train.validation import check_model_fits_data


class TrainerSetup:
    """Builds a run's processes, data, model, engine and run folder; `Trainer` adds the loop."""

    def __init__(self, cfg: Config, model: torch.nn.Module | None = None, device: str | None = None,
                 dp_rank: int = 0, dp_size: int = 1, is_main: bool = True, deepspeed_config: str | None = None):
        """`model`: use this module instead of building one (single process: as is; multi-process: parallelized
        as given). `dp_rank` / `dp_size` / `is_main` only matter for a single process that stands in for one rank
        of a bigger run; under torchrun / deepspeed they come from the launcher. `deepspeed_config`: path of a
        DeepSpeed JSON, selects the DeepSpeed engine."""
        from dpar_scale.models import resolve_model_config

        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        cfg.model = resolve_model_config(cfg.model)
        configure_numerics(cfg.train)  # before anything runs on the device (cuBLAS reads its setting once)
        ds_cfg = self._setup_processes(device, dp_rank, dp_size, is_main, deepspeed_config)
        self._setup_data()
        model = self._setup_model(model, native=ds_cfg is None)
        self._setup_engine(model, ds_cfg, deepspeed_config)
        self._setup_run_folder(ds_cfg)

    def _setup_processes(self, device, dp_rank, dp_size, is_main, deepspeed_config) -> dict | None:
        """Process group, ParallelDims and the device mesh, this rank's data-parallel coordinates, the seed.
        Returns the resolved DeepSpeed config (None for the native engine)."""
        cfg = self.cfg
        self.env = LaunchEnv.detect()
        self.device = torch.device(device) if device else default_device(self.env.local_rank)
        ds_raw = None
        if deepspeed_config:
            from dpar_scale.train.deepspeed_engine import load_deepspeed_json

            ds_raw = load_deepspeed_json(deepspeed_config)  # fail on a bad path before any process group exists
        init_process_group(self.env, self.device, force=ds_raw is not None)  # DeepSpeed always wants a group
        self.dims = ParallelDims.from_config(cfg.parallel, self.env.world_size)
        if self.env.world_size > 1:
            self.dims.build_mesh(self.device.type)
            dp_rank, dp_size, is_main = self.dims.dp_rank, self.dims.dp, self.env.rank == 0
        self.dp_rank, self.dp_size, self.is_main = dp_rank, dp_size, is_main
        self.dp_group = self.dims.dp_group()
        self.flag_group = None  # the default group when it takes CPU tensors (see _step_boundary)
        if self.env.world_size > 1 and "gloo" not in torch.distributed.get_backend():
            self.flag_group = torch.distributed.new_group(backend="gloo")
        # TP ranks of one group share a seed: replicated regions draw the same dropout masks, and sequence-parallel
        # ones draw the whole sequence's mask and keep their slice (dpar_scale.parallel.tensor_parallel).
        torch.manual_seed(cfg.train.seed + self.dp_rank)
        if ds_raw is None:
            return None
        from dpar_scale.train.deepspeed_engine import resolve_deepspeed_config

        return resolve_deepspeed_config(ds_raw, cfg, self.dp_size, source=str(deepspeed_config))

    def _setup_data(self) -> None:
        """Codes (+ entropies for DPAR), checked against the model; a resume is checked before the model is built
        or anything is loaded: same model shape, same data (unless checkpoint.allow_data_change), readable files."""
        cfg, kind = self.cfg, self.cfg.model.kind
        needs_entropy = kind == "dpar" and cfg.model.patch.mode != "static"
        # every rank opens the data: the checks are split over them (and agree on any error)
        text = cfg.model.conditioning == "text"
        self.data = CodeData.open(cfg.data.codes_dir, cfg.data.entropy_dir, need_entropy=needs_entropy,
                                  val_fraction=cfg.data.val_fraction, verify=cfg.data.verify, share=work_share(),
                                  allow_null_label=kind in ("gpt", "dpar"), captions_dir=cfg.data.captions_dir,
                                  need_captions=text)
        self.text_tokenizer = None
        if text:
            from dpar_scale.text import check_text_config, load_text_tokenizer

            self.text_tokenizer = load_text_tokenizer(cfg.model.text.tokenizer)
            check_text_config(cfg.model.text, self.text_tokenizer)
        check_model_fits_data(cfg, self.data)
        epochs_line = resolve_epochs(cfg, self.data.num_train_images)  # before config.yaml is written
        if epochs_line and self.is_main:
            print(epochs_line, flush=True)
        self.data_info = self.data.identity()
        self.resumed_from = find_resume_checkpoint(self.out, cfg.checkpoint.resume)
        if self.resumed_from is not None:
            check_resume(self.resumed_from, cfg.model, self.data_info, cfg.checkpoint.allow_data_change)
            if self.text_tokenizer is not None:  # the captions' ids must mean what they meant before the stop
                from dpar_scale.checkpoint.text_model import recorded_text_identity
                from dpar_scale.text import check_text_tokenizer

                check_text_tokenizer(recorded_text_identity(self.resumed_from), self.text_tokenizer,
                                     f"the checkpoint {self.resumed_from}")
        if cfg.data.batch_size % (cfg.train.grad_accum * self.dp_size):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by train.grad_accum × "
                              f"data-parallel ranks = {cfg.train.grad_accum} × {self.dp_size}")
        self.global_micro_batch = cfg.data.batch_size // cfg.train.grad_accum
        self.micro_batch = self.global_micro_batch // self.dp_size
        self.order = GlobalOrder(self.data.train_ids, seed=cfg.train.seed)
        text_source = (TextSource(self.text_tokenizer, cfg.model.text.max_length, cfg.train.seed)
                       if self.text_tokenizer is not None else None)
        self.source = BatchSource(self.data, cfg.model.patch if kind == "dpar" else None, text=text_source)
        self.batches = StepBatches(cfg, self.data, self.order, self.source, self.dp_rank, self.dp_size, self.device)
        self.prefetch = Prefetcher(self.batches.plan, self.batches.build, lambda p: p.cursor + len(p.step_ids),
                                   workers=cfg.data.num_workers, depth=cfg.data.prefetch_steps)
        self.pending = PendingSteps(self.dp_group)
        if cfg.data.global_tokens_per_microbatch > 0 and kind != "dpar":
            raise ConfigError("data.global_tokens_per_microbatch packs DPAR patch sequences; token-level models "
                              "take a fixed data.batch_size (set data.global_tokens_per_microbatch=0)")

    def _setup_model(self, model: torch.nn.Module | None, native: bool) -> torch.nn.Module:
        """meta -> parallelize -> materialise this rank's shards -> layout-independent init (DeepSpeed shards the
        model itself; activation checkpointing is still ours)."""
        from dpar_scale.parallel.parallelize import (
            apply_activation_checkpointing, build_parallel_model, parallelize,
        )

        cfg = self.cfg
        if model is None:
            model = build_parallel_model(cfg.model, self.dims, cfg.parallel, cfg.train.precision, self.device,
                                         seed=cfg.train.seed, apply_parallelism=native)
        else:
            model = model.to(self.device)
            if native:
                parallelize(model, self.dims, cfg.parallel, cfg.train.precision)
        if not native:
            apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
        return model

    def _setup_engine(self, model: torch.nn.Module, ds_cfg: dict | None, deepspeed_config: str | None) -> None:
        """Optimizer, LR schedule, the engine that owns backward / clip / step, EMA."""
        cfg = self.cfg
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        if ds_cfg is None:
            from dpar_scale.train.native_engine import NativeEngine

            self.engine = NativeEngine(model, optimizer, scheduler, cfg, self.dims, self.device)
        else:
            from dpar_scale.train.deepspeed_engine import DeepSpeedEngine

            resume_layout = read_train_state(self.resumed_from).get("layout", {}) if self.resumed_from else None
            self.engine = DeepSpeedEngine(model, optimizer, scheduler, cfg, self.dims, self.device, ds_cfg,
                                          str(deepspeed_config), resume_layout=resume_layout)
        self.model = self.engine.forward_module
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.scheduler
        self.ema = EMA(self.engine.model, cfg.train.ema) if cfg.train.ema > 0 else None
        if cfg.checkpoint.async_save and self.engine.name != "fsdp":
            raise ConfigError("checkpoint.async_save=true needs the FSDP2 engine (DeepSpeed writes its own "
                              "checkpoint synchronously): set checkpoint.async_save=false")

    def _setup_run_folder(self, ds_cfg: dict | None) -> None:
        """Resume (weights, optimizer, schedule, RNG, cursor), then the run folder and the metrics logger."""
        cfg = self.cfg
        self.state = TrainState()
        if self.resumed_from is not None:
            self.state = load_checkpoint(self.resumed_from, self.engine, self.scheduler, self.layout(), ema=self.ema,
                                         seed=cfg.train.seed, say=print if self.is_main else (lambda *_: None))
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
            if ds_cfg is not None:
                (self.out / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
        resumed = self.resumed_from is not None
        own_run = resumed and self.resumed_from.resolve().parent.parent == self.out.resolve()
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, wandb_cfg=cfg.wandb, run_name=cfg.run.name,
                                     config=to_dict(cfg), wandb_id=self.state.wandb_id or None,
                                     resumed_step=self.state.step if resumed else None, own_run=own_run)
        self.state.wandb_id = self.metrics.wandb_id or ""
        self.stop_requested = False  # see request_stop
        self.pending_save: PendingCheckpoint | None = None  # checkpoint.async_save: shards still being written
        self.evaluator = make_evaluator(cfg, self.device, self.engine, self.dims)  # eval.every; None when off

    def layout(self) -> dict:
        """The process layout and batch shape recorded in checkpoints (compared on resume)."""
        p = self.cfg.parallel
        return {"world_size": self.env.world_size, "dp_replicate": self.dims.dp_replicate,
                "dp_shard": self.dims.dp_shard, "tp": self.dims.tp, "engine": self.engine.name,
                "batch_size": self.cfg.data.batch_size, "grad_accum": self.cfg.train.grad_accum,
                "tokens_per_microbatch": self.cfg.data.global_tokens_per_microbatch,
                "activation_checkpoint": p.activation_checkpoint,
                "zero_stage": getattr(self.engine, "stage", None)}
