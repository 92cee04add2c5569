"""One training loop for every model kind (baseline GPT, entropy model, DPAR).

What differs between kinds is the model and the batch (DPAR batches carry patch lengths), not the loop. All
progress lives in `TrainState` plus the optimizer/scheduler/RNG, so checkpointing only changes I/O.

Set-up (process group, mesh, data, model, engine, resume, run folder) is `dpar_scale.train.trainer_setup`, which
`Trainer` extends with the loop: steps, validation, checkpoints and stopping. The loop itself does
not know the layout: each data-parallel rank reads its slice of the global batch, the loss is the global mean over
real codes (per-micro-batch code sums divided by the step's global code count), the engine owns backward / clip /
step, and rank 0 alone writes metrics and the run folder.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dpar_scale.checkpoint.save_load import PendingCheckpoint, finish_checkpoint, save_checkpoint
from dpar_scale.data.loader import Batch
from dpar_scale.flops.analytic import matmul_precision, peak_flops, train_flops
from dpar_scale.parallel.process_group import all_reduce_sum
from dpar_scale.train.batches import global_positions
from dpar_scale.train.loss import code_loss_per_image
from dpar_scale.train.metrics_log import format_line, new_window, window_rates
from dpar_scale.train.pending import NonFiniteLossError
from dpar_scale.train.trainer_setup import TrainerSetup
from dpar_scale.train.validation import held_out_loss


class Trainer(TrainerSetup):
    """`TrainerSetup` builds the run (constructor arguments there); `fit` trains it."""

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
            text_ids, record["text_truncated"] = self.text_tokenizer.encode_captions(texts, self.cfg.model.text.max_length)
            # and their characters the text tokenizer cannot spell (each run of them one unk piece), counted too
            record["text_unknown"] = self.text_tokenizer.count_unknown(text_ids)
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
