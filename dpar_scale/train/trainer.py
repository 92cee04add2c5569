"""One training loop for every model kind (baseline GPT, entropy model, DPAR).

What differs between kinds is the model and the batch (DPAR batches carry patch lengths), not the loop. All
progress lives in `TrainState` plus the optimizer/scheduler/RNG, so checkpointing only changes I/O.

Set-up is one explicit sequence (`Trainer.__init__`): process group (torchrun / DeepSpeed launcher / Slurm) ->
`ParallelDims` and the device mesh -> data -> model built on the meta device -> `parallelize` (TP/SP -> activation
checkpointing -> compile -> FSDP2) -> materialise this rank's shards and initialise them layout-independently ->
optimizer + LR schedule -> engine (native, or DeepSpeed with `deepspeed_config`) -> resume. The loop itself does
not know the layout: each data-parallel rank reads its slice of the global batch, the loss is the global mean over
real codes (per-micro-batch code sums divided by the step's global code count), the engine owns backward / clip /
step, and rank 0 alone writes metrics and the run folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dpar_scale.checkpoint.save_load import (
    PendingCheckpoint, TrainState, finish_checkpoint, find_resume_checkpoint, load_checkpoint,
    read_train_state, save_checkpoint,
)
from dpar_scale.checkpoint.resume_checks import check_resume
from dpar_scale.config import Config, ConfigError, resolve_epochs, save_config, to_dict
from dpar_scale.data.loader import Batch, BatchSource, CodeData, GlobalOrder, TextSource
from dpar_scale.flops.analytic import matmul_precision, peak_flops, train_flops
from dpar_scale.parallel.dims import ParallelDims
from dpar_scale.parallel.process_group import (
    LaunchEnv, all_reduce_sum, default_device, init_process_group, work_share,
)
from dpar_scale.train.batches import StepBatches, global_positions
from dpar_scale.train.ema import EMA
from dpar_scale.train.loss import code_loss_per_image
from dpar_scale.train.metrics_log import MetricsLogger, format_line, new_window, window_rates
from dpar_scale.train.numerics import configure_numerics
from dpar_scale.train.optim import build_optimizer, lr_lambda
from dpar_scale.train.pending import NonFiniteLossError, PendingSteps
from dpar_scale.train.prefetch import Prefetcher
from dpar_scale.train.training_eval import make_evaluator
from dpar_scale.train.validation import check_model_fits_data, held_out_loss


class Trainer:
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

    def request_stop(self) -> None:
        """Asks `fit` to stop at the next step boundary: it saves a checkpoint and returns a result with
        `preempted: True`. Safe to call from a signal handler (it only sets a flag). With several processes the
        flag is agreed on at every step boundary, so all ranks stop after the same step even if only some of them
        were signalled, or at different moments."""
        self.stop_requested = True

    def _step_boundary(self) -> bool:
        """What all ranks agree on between two steps (one all-reduce of two numbers, from this thread, on a gloo
        group): whether any rank was asked to stop, and whether every rank's background checkpoint writes
        have finished — then the pending checkpoint is published now rather than at the next save. Returns
        whether to stop."""
        pending = self.pending_save
        flags = torch.tensor([float(self.stop_requested), float(pending is not None and not pending.written())])
        if self.env.world_size > 1:  # CPU tensors over gloo: agreeing never waits for the queued GPU work
            flags = all_reduce_sum(flags, self.flag_group)
        stop, unwritten = bool(flags[0] > 0), bool(flags[1] > 0)
        if pending is not None and not unwritten:
            self.finish_pending_save()
        return stop

    # ------------------------------------------------------------------------------------------------ batches
    def model_inputs(self, batch: Batch) -> dict:
        return self.batches.model_inputs(batch, self.state.step)

    def step_batches(self) -> tuple[list[Batch], np.ndarray]:
        """This rank's micro-batches for the next optimizer step and the whole step's sample ids (StepBatches)."""
        return self.batches.for_step(self.state.samples_seen)

    def autocast(self):
        return self.engine.autocast()

    # --------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict:
        """One optimizer step. Its loss and gradient norm stay on the device (`self.pending`) until `fit` logs
        them (`flush`); the record returned has everything else."""
        self.model.train()
        plan, batches, data_wait = self.prefetch.get(self.state.samples_seen)
        step_ids = plan.step_ids
        # The loss is the mean over every real code of the global batch, whatever the layout: each micro-batch
        # contributes its code-loss *sum* divided by the step's global code count (H·W per image of the step's
        # ids, which every rank knows: no communication). Engines average gradients over the dp ranks, so the
        # backward loss is multiplied by dp_size to undo that. (A single process standing in for one rank of a
        # bigger run, dp_size > 1 without a process group, uses its own codes and FLOPs, as if alone.)
        local_codes = sum(b.num_codes for b in batches)
        reduced = self.env.world_size > 1 or self.dp_size == 1
        total_codes = len(step_ids) * self.data.grid[0] * self.data.grid[1] if reduced else local_codes
        # Analytic training FLOPs of the whole step, from the plan; fixed-size DPAR batches (other ranks' patch
        # counts unknown here) sum this rank's over the dp ranks when flushed. TP ranks share one batch.
        local_flops = None if reduced and plan.global_flops is not None else sum(
            train_flops(self.cfg.model, batch_images=len(b.codes), patch_lengths=b.patch_lengths,
                        n_codes=b.codes.shape[1], text_lengths=None if b.text_lengths is None
                        else b.text_lengths.tolist()) for b in batches)
        scale = (self.dp_size if reduced else 1) / total_codes
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            inputs = self.model_inputs(batch)
            with self.autocast():
                logits = self.model(**inputs)
            batch_sum = code_loss_per_image(logits, inputs["codes"]).sum()
            self.engine.backward(batch_sum * scale, last_micro_batch=i == len(batches) - 1)
            loss_sum += batch_sum.detach()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (both engines step our LambdaLR)
        grad_norm = self.engine.step(None)  # checked when flushed, with the loss
        if self.ema is not None:
            self.ema.update(self.engine.model)
        images = sum(len(b.codes) for b in batches)
        positions = sum(global_positions(b) for b in batches)
        self.state.step += 1
        self.state.samples_seen += len(step_ids)
        self.state.codes_seen += int(total_codes)
        self.state.global_positions_seen += positions * self.dp_size
        # The whole step's model FLOPs spread over every device (dp × tp): what MFU compares with one device's peak.
        record = {"step": self.state.step, "lr": lr, "images": images, "codes": local_codes,
                  "global_positions": positions, "data_wait_s": data_wait,
                  # condition positions among them (the class: one per image; a caption: its tokens)
                  "cond_positions": sum(len(b.codes) if b.text_lengths is None else int(b.text_lengths.sum())
                                        for b in batches),
                  "flops_per_device": (plan.global_flops if local_flops is None else local_flops) / self.env.world_size}
        if self.source.text is not None:  # captions cut to model.text.max_length over the whole step (every rank
            # knows every rank's samples and their epochs: no communication), counted, never silent
            texts = self.data.choose_captions(step_ids, self.order.epochs(plan.cursor, len(step_ids)),
                                              self.cfg.train.seed)
            record["text_truncated"] = self.text_tokenizer.encode_captions(texts, self.cfg.model.text.max_length)[1]
        if self.cfg.data.log_sample_ids:
            record["sample_ids"] = step_ids.tolist()  # the whole step's, every rank's micro-batches
        ids = np.concatenate([b.sample_ids.numpy() for b in batches])
        self.pending.add(record, loss_sum, total_codes, grad_norm, ids, reduce_flops=local_flops is not None)
        return record

    def _flush_into(self, window: dict) -> None:
        """The steps run since the last flush get their loss and gradient norm (PendingSteps.flush: one collective,
        one device→host sync; NonFiniteLossError on every rank for the first bad step); the wait for the device
        and their FLOPs count in the logging window and the run's total."""
        t0 = time.perf_counter()
        flops = sum(r["flops_per_device"] for r in self.pending.flush(self.out))
        window["flops"] += flops
        self.state.train_flops += flops * self.env.world_size  # the whole step's, as checkpointed
        window["time"] += time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------------- validate
    @torch.no_grad()
    def validate(self) -> dict:
        # The same held-out images whatever the layout: val_batches global micro-batches, split over dp ranks.
        ids = self.data.val_ids[: self.cfg.train.val_batches * self.global_micro_batch]
        if len(ids) == 0:
            return {}
        results = {"val_loss": held_out_loss(self, ids)}
        if self.ema is not None:
            with self.ema.swapped_into(self.engine.model):
                results["val_loss_ema"] = held_out_loss(self, ids)
        return results

    # ---------------------------------------------------------------------------------------------------- fit
    def layout(self) -> dict:
        """The process layout and batch shape recorded in checkpoints (compared on resume)."""
        p = self.cfg.parallel
        return {"world_size": self.env.world_size, "dp_replicate": self.dims.dp_replicate,
                "dp_shard": self.dims.dp_shard, "tp": self.dims.tp, "engine": self.engine.name,
                "batch_size": self.cfg.data.batch_size, "grad_accum": self.cfg.train.grad_accum,
                "tokens_per_microbatch": self.cfg.data.global_tokens_per_microbatch,
                "activation_checkpoint": p.activation_checkpoint,
                "zero_stage": getattr(self.engine, "stage", None)}

    def save(self, last: bool = False) -> Path:
        """Saves a checkpoint of the current state (collective). With checkpoint.async_save the shards of
        intermediate saves are written in the background and published at the first step boundary after every
        rank's writes finished (see `_step_boundary`; at the latest at the next save); the `last` save of a run
        (end, preemption) is always complete when this returns."""
        self.finish_pending_save()
        c = self.cfg.checkpoint
        result = save_checkpoint(self.out, self.cfg, self.engine, self.scheduler, self.state, self.layout(),
                                 ema=self.ema, keep_last=c.keep_last, protect=self.resumed_from,
                                 data_info=self.data_info, background=c.async_save and not last,
                                 text_tokenizer=self.text_tokenizer)
        if isinstance(result, PendingCheckpoint):
            self.pending_save = result
            return result.final
        return result

    def finish_pending_save(self) -> None:
        if self.pending_save is not None:
            pending, self.pending_save = self.pending_save, None
            finish_checkpoint(pending)

    def fit(self) -> dict:
        cfg = self.cfg
        bar = None
        if self.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.state.step, desc=f"train {cfg.model.kind}",
                       dynamic_ncols=True, leave=False)
        say = (bar.write if bar is not None else print) if self.is_main else (lambda *_: None)
        if self.resumed_from is not None:
            say(f"resumed from {self.resumed_from} at step {self.state.step} (sample {self.state.samples_seen})")
        peak = peak_flops(self.device, precision=matmul_precision(cfg.train.precision, cfg.train.tf32),
                          override=cfg.train.peak_tflops * 1e12 or None)
        window, last = new_window(), {}
        try:
            while self.state.step < cfg.train.steps:
                if self._step_boundary():
                    self._flush_into(window)  # a non-finite step is never checkpointed
                    path = self.save(last=True)
                    say(f"stop requested: saved {path} at step {self.state.step}")
                    if bar is not None:
                        bar.close()
                    self.metrics.close()
                    return {**last, "step": self.state.step, "checkpoint": str(path), "preempted": True}
                t0 = time.perf_counter()
                record = self.train_step()
                window["time"] += time.perf_counter() - t0
                window["steps"] += 1
                for key in ("images", "codes", "global_positions", "data_wait", "cond_positions"):
                    window[key] = window.get(key, 0) + record.pop("data_wait_s" if key == "data_wait" else key)
                if bar is not None:
                    bar.update(1)
                step = self.state.step
                validate = bool(cfg.train.val_every and step % cfg.train.val_every == 0 and step < cfg.train.steps)
                evaluate = self.evaluator is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps)
                save = bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.steps)
                if validate or evaluate or save or cfg.data.log_sample_ids:
                    self._flush_into(window)  # what follows needs the losses, FLOPs or finite weights
                if validate:
                    record.update(self.validate())
                if evaluate:
                    record.update(self.evaluator.run(self.engine.model, self.ema, step, self.out,
                                                     self.state.train_flops, progress=bar is not None))
                if step % cfg.train.log_every == 0 or step == cfg.train.steps or "val_loss" in record \
                        or "eval_seconds" in record:
                    self._flush_into(window)
                    record.update(window_rates(window, self.dp_size, dpar=cfg.model.kind == "dpar", peak=peak))
                    window = new_window()
                    self.metrics.log(record)
                    say(format_line(record))
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                elif cfg.data.log_sample_ids:
                    self.metrics.log(record)
                if save:
                    self.save()
                last = record
            self._flush_into(window)
        except NonFiniteLossError:  # every rank stops here; an earlier save still being written is kept
            self.finish_pending_save()
            raise
        finally:
            self.prefetch.close()
        final = self.validate()
        if final:
            self.metrics.log({"step": self.state.step, **final})
            say(format_line({"step": self.state.step, **final}))
        path = self.save(last=True)
        if bar is not None:
            bar.close()
        self.metrics.close()
        return {**last, **final, "checkpoint": str(path)}
