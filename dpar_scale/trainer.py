"""One training loop for every model kind (baseline GPT, entropy model, DPAR).

What differs between kinds is the model and the batch (DPAR batches carry patch lengths), not the loop. All
progress lives in `TrainState` plus the optimizer/scheduler/RNG, so checkpointing only changes I/O.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dpar_scale.checkpoint import (
    TrainState, find_resume_checkpoint, list_checkpoints, load_train_state, save_checkpoint,
)
from dpar_scale.config import Config, ConfigError, save_config, to_dict
from dpar_scale.data.loader import Batch, BatchSource, CodeData, GlobalOrder, rank_slice
from dpar_scale.metrics import MetricsLogger, format_line


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the message names the step and the batch's samples."""


class EMA:
    """An fp32 exponential moving average of the model's floating-point state."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Temporarily loads the EMA weights into `model` (for validation / sampling)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)


def lr_lambda(cfg: Config):
    warmup, total, schedule, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Weight decay on matrices only (LlamaGen's choice): not on norms, biases or the start/class vectors.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, foreach=True)


def check_model_fits_data(cfg: Config, data: CodeData) -> None:
    m = cfg.model
    if m.vocab_size != data.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} but the codes in {cfg.data.codes_dir} come from a "
                          f"tokenizer with {data.vocab_size} entries: set model.vocab_size={data.vocab_size}")
    if tuple(m.grid) != tuple(data.grid):
        raise ConfigError(f"model.grid={list(m.grid)} but the codes are on a {list(data.grid)} grid: "
                          f"set model.grid={list(data.grid)}")
    if m.kind != "entropy" and m.num_classes < data.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has {data.num_classes} classes: "
                          f"set model.num_classes={data.num_classes}")


def code_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean next-code cross-entropy over every code of the batch (`logits[:, t]` predicts `codes[:, t]`)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module | None = None, device: str | None = None,
                 dp_rank: int = 0, dp_size: int = 1, is_main: bool = True):
        from dpar_scale.models import build_model, resolve_model_config

        self.cfg, self.dp_rank, self.dp_size, self.is_main = cfg, dp_rank, dp_size, is_main
        self.out = Path(cfg.run.output_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.train.seed)
        cfg.model = resolve_model_config(cfg.model)
        kind = cfg.model.kind
        needs_entropy = kind == "dpar" and cfg.model.patch.mode != "static"
        self.data = CodeData.open(cfg.data.codes_dir, cfg.data.entropy_dir, need_entropy=needs_entropy,
                                  val_fraction=cfg.data.val_fraction)
        check_model_fits_data(cfg, self.data)
        micro_total = cfg.data.batch_size // cfg.train.grad_accum
        if cfg.data.batch_size % (cfg.train.grad_accum * dp_size):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by train.grad_accum × "
                              f"data-parallel ranks = {cfg.train.grad_accum} × {dp_size}")
        self.micro_batch = micro_total // dp_size
        self.order = GlobalOrder(self.data.train_ids, seed=cfg.train.seed)
        self.source = BatchSource(self.data, cfg.model.patch if kind == "dpar" else None)

        self.model = (model or build_model(cfg.model)).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.state = TrainState()
        self.resumed_from = find_resume_checkpoint(self.out, cfg.checkpoint.resume)
        if self.resumed_from is not None:
            self.state = load_train_state(self.resumed_from, self.model, self.optimizer, self.scheduler, self.ema)
        if is_main:
            save_config(cfg, self.out / "config.yaml")
        self.metrics = MetricsLogger(self.out, enabled=is_main, wandb_cfg=cfg.wandb, run_name=cfg.run.name,
                                     config=to_dict(cfg), wandb_id=self.state.wandb_id or None)
        self.state.wandb_id = self.metrics.wandb_id or ""

    # ------------------------------------------------------------------------------------------------ batches
    def model_inputs(self, batch: Batch) -> dict:
        inputs = {"codes": batch.codes.to(self.device), "labels": batch.labels.to(self.device)}
        if batch.patch_lengths is not None:
            from dpar_scale.layout import PatchLayout

            inputs["layout"] = PatchLayout.from_lengths(batch.patch_lengths, grid=self.data.grid,
                                                        pad_to_multiple=self.cfg.parallel.tp).to(self.device)
        return inputs

    def step_batches(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step (the cursor is advanced by the caller)."""
        global_ids = self.order.ids(self.state.samples_seen, self.cfg.data.batch_size)
        micro_ids = global_ids.reshape(self.cfg.train.grad_accum, -1)
        return [self.source.make(rank_slice(ids, self.dp_rank, self.dp_size)) for ids in micro_ids]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    # --------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict:
        self.model.train()
        batches = self.step_batches()
        total_loss = 0.0
        for batch in batches:
            with self.autocast():
                logits = self.model(**self.model_inputs(batch))
            loss = code_loss(logits, batch.codes.to(self.device))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self._nonfinite_message("loss", loss.item(), batches))
            (loss / len(batches)).backward()
            total_loss += loss.item() / len(batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(self._nonfinite_message("gradient norm", grad_norm.item(), batches))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        images = sum(len(b.codes) for b in batches)
        positions = sum(self.global_positions(b) for b in batches)
        self.state.step += 1
        self.state.samples_seen += self.cfg.data.batch_size
        self.state.codes_seen += sum(b.num_codes for b in batches) * self.dp_size
        self.state.global_positions_seen += positions * self.dp_size
        record = {"step": self.state.step, "loss": total_loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "images": images, "codes": sum(b.num_codes for b in batches), "global_positions": positions}
        if self.cfg.data.log_sample_ids:
            record["sample_ids"] = torch.cat([b.sample_ids for b in batches]).tolist()
        return record

    def global_positions(self, batch: Batch) -> int:
        """Positions the big transformer runs over: codes for token models, Σ (M_i + 1) for DPAR."""
        if batch.patch_lengths is None:
            return batch.num_codes
        return batch.num_patches + len(batch.patch_lengths)

    def _nonfinite_message(self, what: str, value: float, batches: list[Batch]) -> str:
        ids = torch.cat([b.sample_ids for b in batches]).tolist()
        last = list_checkpoints(self.out)
        keep = f"the last checkpoint ({last[-1]}) is untouched" if last else "no checkpoint was written yet"
        return (f"{what} is {value} at step {self.state.step + 1}; batch sample ids {ids[:64]}"
                f"{' …' if len(ids) > 64 else ''}; {keep}. Lower optim.lr, check those samples, or use "
                f"train.precision=fp32, then resume with checkpoint.resume=auto")

    # ----------------------------------------------------------------------------------------------- validate
    @torch.no_grad()
    def validate(self) -> dict:
        ids = self.data.val_ids[: self.cfg.train.val_batches * self.micro_batch]
        if len(ids) == 0:
            return {}
        results = {"val_loss": self._val_loss(ids)}
        if self.ema is not None:
            with self.ema.swapped_into(self.model):
                results["val_loss_ema"] = self._val_loss(ids)
        return results

    def _val_loss(self, ids) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(ids), self.micro_batch):
            batch = self.source.make(ids[start:start + self.micro_batch])
            with self.autocast():
                logits = self.model(**self.model_inputs(batch))
            total += code_loss(logits, batch.codes.to(self.device)).item() * batch.num_codes
            count += batch.num_codes
        return total / count

    # ---------------------------------------------------------------------------------------------------- fit
    def save(self) -> Path:
        return save_checkpoint(self.out, self.cfg, self.model, self.optimizer, self.scheduler, self.state,
                               ema=self.ema, keep_last=self.cfg.checkpoint.keep_last, protect=self.resumed_from)

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
        window = {"images": 0, "codes": 0, "global_positions": 0, "time": 0.0, "steps": 0}
        last: dict = {}
        while self.state.step < cfg.train.steps:
            t0 = time.perf_counter()
            record = self.train_step()
            window["time"] += time.perf_counter() - t0
            window["steps"] += 1
            for key in ("images", "codes", "global_positions"):
                window[key] += record.pop(key)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            step = self.state.step
            if cfg.train.val_every and step % cfg.train.val_every == 0 and step < cfg.train.steps:
                record.update(self.validate())
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or "val_loss" in record:
                seconds = max(window["time"], 1e-9)
                record.update({
                    "images_per_s": window["images"] * self.dp_size / seconds,
                    "codes_per_s": window["codes"] * self.dp_size / seconds,
                    "global_positions_per_s": window["global_positions"] * self.dp_size / seconds,
                    "mean_patch_length": window["codes"] / max(1, window["global_positions"] - window["images"])
                    if cfg.model.kind == "dpar" else 1.0,
                    "step_time_s": seconds / window["steps"],
                })
                window = {"images": 0, "codes": 0, "global_positions": 0, "time": 0.0, "steps": 0}
                self.metrics.log(record)
                say(format_line(record))
            elif cfg.data.log_sample_ids:
                self.metrics.log(record)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.steps:
                self.save()
            last = record
        final = self.validate()
        if final:
            self.metrics.log({"step": self.state.step, **final})
            say(format_line({"step": self.state.step, **final}))
        path = self.save()
        if bar is not None:
            bar.close()
        self.metrics.close()
        return {**last, **final, "checkpoint": str(path)}
