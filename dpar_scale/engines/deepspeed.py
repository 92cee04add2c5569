"""The DeepSpeed engine: the same trainer, model and data through `deepspeed.initialize` (ZeRO stage 0-3).

`deepspeed --num_gpus N train.py --deepspeed_config configs/deepspeed/zero3.json --config PATH [overrides]`

What comes from where:
* the JSON decides how DeepSpeed runs: ZeRO stage, CPU offload, bucket sizes, communication details;
* our config decides what is trained: batch size, gradient accumulation, clipping, precision, optimizer (our
  AdamW with our parameter groups, passed to DeepSpeed as the client optimizer) and LR schedule (our LambdaLR,
  stepped by us at each optimizer step).
The keys both describe must agree: "auto" (or leaving the key out) takes our value; any other value that differs
is a ConfigError naming both sides and the fix. An "optimizer" or "scheduler" section in the JSON is refused
(ours would be silently replaced).

On CPU, DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op the first time a process group is
wrapped (~45 s); training over gloo never uses it (it serves DeepSpeed's inference all-reduce), so on CPU we skip
building it unless DPAR_DEEPSPEED_SHM=1.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from dpar_scale.config import ConfigError


def load_deepspeed_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {str(path)!r} does not exist (shipped: configs/deepspeed/zero1.json, "
                          f"zero2.json, zero3.json, zero3_offload.json)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--deepspeed_config {str(path)!r} must hold a JSON object")
    return values


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def resolve_deepspeed_config(raw: dict, cfg, dp_size: int, source: str = "the DeepSpeed JSON") -> dict:
    """Our config + the JSON -> the dict handed to deepspeed.initialize; ConfigError on any disagreement."""
    p = cfg.parallel
    if p.tp > 1:
        raise ConfigError(f"parallel.tp={p.tp} is not supported with the DeepSpeed engine (it runs ZeRO data "
                          f"parallelism only): set parallel.tp=1, or use the default FSDP2 engine (torchrun) for TP")
    if p.dp_replicate > 1:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate} is an FSDP2 (HSDP) setting; with DeepSpeed set "
                          f"parallel.dp_replicate=1 and choose the ZeRO stage in {source}")
    if p.compile:
        raise ConfigError("parallel.compile=true is not supported with the DeepSpeed engine: set "
                          "parallel.compile=false (or use the FSDP2 engine)")
    if cfg.train.ema > 0:
        raise ConfigError(f"train.ema={cfg.train.ema} is not supported with the DeepSpeed engine (ZeRO partitions "
                          f"the weights the EMA would track): set train.ema=0 or use the FSDP2 engine")
    for section in ("optimizer", "scheduler"):
        if section in raw:
            raise ConfigError(f"{source} has an \"{section}\" section; dpar-scale passes its own AdamW (optim.*) "
                              f"and LR schedule (optim.schedule, optim.warmup_steps): delete the section and set "
                              f"those in our config")
    if raw.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError(f"{source} enables fp16; dpar-scale trains in fp32 or bf16: remove the fp16 section and "
                          f"use \"bf16\": {{\"enabled\": true}} with train.precision=bf16")
    ds = copy.deepcopy(raw)
    ds.pop("fp16", None)
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum
    if batch % (accum * dp_size):
        raise ConfigError(f"data.batch_size={batch} must be divisible by train.grad_accum × data-parallel ranks = "
                          f"{accum} × {dp_size}")
    ours = {  # key: (our value, where it comes from, the override that would make ours match the JSON)
        "train_batch_size": (batch, "data.batch_size", lambda v: f"data.batch_size={v}"),
        "gradient_accumulation_steps": (accum, "train.grad_accum", lambda v: f"train.grad_accum={v}"),
        "train_micro_batch_size_per_gpu": (batch // (accum * dp_size),
                                           f"data.batch_size / (train.grad_accum × {dp_size} ranks)",
                                           lambda v: f"data.batch_size={int(float(v)) * accum * dp_size}"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip", lambda v: f"optim.grad_clip={v}"),
    }
    for key, (value, what, fix) in ours.items():
        theirs = ds.get(key, "auto")
        if theirs == "auto":
            ds[key] = value
        elif not _same(theirs, value):
            raise ConfigError(f"{source} sets \"{key}\": {theirs} but our {what} = {value}; they must agree: set "
                              f"{fix(theirs)} or write \"{key}\": \"auto\" in the JSON")
    bf16 = ds.setdefault("bf16", {})
    want = cfg.train.precision == "bf16"
    enabled = bf16.get("enabled", "auto")
    if enabled == "auto":
        bf16["enabled"] = want
    elif bool(enabled) != want:
        raise ConfigError(f"{source} sets \"bf16\": {{\"enabled\": {str(bool(enabled)).lower()}}} but "
                          f"train.precision={cfg.train.precision}: set train.precision="
                          f"{'bf16' if enabled else 'fp32'} or \"enabled\": \"auto\"")
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    zero = ds["zero_optimization"]
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        # Our client optimizer is torch AdamW, not DeepSpeedCPUAdam (whose JIT build takes minutes on CPU).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _skip_cpu_shm_op() -> None:
    """See the module docstring: no shm op build on CPU (DPAR_DEEPSPEED_SHM=1 keeps DeepSpeed's default)."""
    if torch.cuda.is_available() or os.environ.get("DPAR_DEEPSPEED_SHM") == "1":
        return
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch` (PyTorch).
    backend_module = importlib.import_module("deepspeed.comm.torch")
    backend_module.build_shm_op = lambda: None


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg, dims, device,
                 ds_config: dict, config_path: str):
        import deepspeed

        _quiet_deepspeed()
        _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.cfg, self.dims, self.device, self.config_path = cfg, dims, device, config_path
        self.ds_config = ds_config
        self.stage = ds_config["zero_optimization"]["stage"]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                                 dist_init_required=False)
        self.scheduler = scheduler  # built on the client AdamW: DeepSpeed keeps its param_group dicts (and lr)

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.engine

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # bf16 is DeepSpeed's (the JSON's "bf16" section)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # Our loss is already this micro-batch's share of the step's mean (times the dp size, which DeepSpeed's
        # gradient averaging divides back out), so no extra 1/gradient_accumulation_steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro_batch:
            self.engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step

    def step(self, check) -> float:
        """DeepSpeed clips ("gradient_clipping") and steps in one call, so the norm is checked afterwards."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed micro-step count is out of sync with train.grad_accum")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # DeepSpeed did not compute one (e.g. clipping off): nothing to check
            norm = float("nan")
        else:
            norm = float(norm)
            check(norm)
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self, folder: Path) -> dict | None:
        import torch.distributed as dist

        target = folder / "deepspeed"
        self.engine.save_checkpoint(str(target), tag="state")
        dist.barrier()
        if dist.get_rank() != 0:
            return None
        from dpar_scale.parallel.init import clean_name  # names without activation-checkpoint wrapper parts

        if self.stage == 0:
            state = self.engine.module.state_dict()
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(target), tag="state")
        return {clean_name(k): v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder / 'deepspeed'}")
