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
from dpar_scale.errors import MissingFileError


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
                 ds_config: dict, config_path: str, resume_layout: dict | None = None):
        """`resume_layout`: the layout of the checkpoint this run will resume (None for a new run); another
        process count means loading DeepSpeed's universal form of it (see `load_state`)."""
        import deepspeed
        import torch.distributed as dist
        from deepspeed.checkpoint import constants

        _quiet_deepspeed()
        _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.cfg, self.dims, self.device, self.config_path = cfg, dims, device, config_path
        self.stage = ds_config["zero_optimization"]["stage"]
        self.universal = False
        if resume_layout is not None and resume_layout.get("engine") == "deepspeed":
            saved_stage = resume_layout.get("zero_stage", self.stage)
            if saved_stage != self.stage:
                raise ConfigError(f"the checkpoint was written with ZeRO stage {saved_stage}; {config_path} sets "
                                  f"stage {self.stage}. DeepSpeed resumes only on the stage that saved: use a JSON "
                                  f"with \"stage\": {saved_stage}")
            if resume_layout.get("world_size", dist.get_world_size()) != dist.get_world_size():
                if self.stage == 0:
                    raise ConfigError(f"a ZeRO stage 0 checkpoint of {resume_layout.get('world_size')} processes "
                                      f"cannot be resumed on {dist.get_world_size()} (DeepSpeed's universal "
                                      f"checkpoints need ZeRO 1-3); resume on {resume_layout.get('world_size')}")
                self.universal = True
                ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self.ds_config = ds_config
        # Recorded in every checkpoint so DeepSpeed's universal conversion accepts ZeRO 1/2 checkpoints as they are.
        setattr(model, constants.UNIVERSAL_CHECKPOINT_INFO,
                {constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE})
        # Our parameter groups' hyperparameters (weight decay on matrices only, ...), put back after every load.
        self.group_hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
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

    def step(self, check=None) -> float | None:
        """DeepSpeed clips ("gradient_clipping") and steps in one call, so the norm is checked afterwards
        (`check(norm)`, may raise; None: the caller checks it later). Returns the norm, None when none was computed."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed micro-step count is out of sync with train.grad_accum")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None:  # None: DeepSpeed did not compute one (e.g. clipping off): nothing to check
            norm = float(norm)
            if check is not None:
                check(norm)
        self.scheduler.step()
        return norm

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_state(self, folder: Path, ema=None, client_state: dict | None = None, background: bool = False):
        """Collective: DeepSpeed's own checkpoint (each rank its ZeRO partitions of weights and optimizer); our
        TrainState also goes in as client state (train_state.pt stays the one we read: no unpickling). Always
        synchronous (the trainer refuses checkpoint.async_save with this engine); returns no futures."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    client_state={"dpar_train_state": client_state or {}})
        return []

    def load_state(self, folder: Path, ema=None, saved_layout: dict | None = None) -> None:
        """Collective. Same process count: DeepSpeed's checkpoint as saved. Another one: its universal form,
        converted once by rank 0 (kept in the checkpoint, with its own completion marker, for later resumes;
        `tools/export.py --universal` does the same ahead of time) while the other ranks wait for that marker."""
        tag = "state"
        if self.universal:
            prepare_universal(folder, self.cfg.checkpoint.universal_workers,
                              self.cfg.checkpoint.universal_timeout_min)
            tag = UNIVERSAL_TAG
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise MissingFileError(f"no DeepSpeed checkpoint under {folder / 'deepspeed'}")
        repair_loaded_optimizer(self.optimizer, self.group_hyperparameters)


def repair_loaded_optimizer(optimizer, group_hyperparameters: list[dict]) -> None:
    """After DeepSpeed loaded a checkpoint: our parameter groups' hyperparameters (they come from our config, as
    with the native engine; the learning rate is then set from the schedule), and one step counter per optimizer
    state. Both matter: DeepSpeed 0.19's ZeRO-3 universal load copies the first group's hyperparameters into every
    group (weight decay on norms and start vectors), and gives every sub-group the same `step` tensor, which
    AdamW then advances once per sub-group per step (the second group's bias correction a step ahead)."""
    for group, ours in zip(optimizer.param_groups, group_hyperparameters, strict=True):
        group.update(ours)
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client torch optimizer
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# --------------------------------------------------------------------------------- universal checkpoints
# deepspeed/state_universal/ is derived data inside a published checkpoint, outside its complete.json; it is used
# only when deepspeed/state_universal.complete.json (written last, with every file's size) matches it, so an
# interrupted or damaged conversion is redone, never loaded.
UNIVERSAL_TAG = "state_universal"
UNIVERSAL_MARKER = UNIVERSAL_TAG + ".complete.json"
UNIVERSAL_FAILED = UNIVERSAL_TAG + ".failed"


def universal_ready(checkpoint: Path) -> bool:
    """The universal form of `checkpoint` is complete: its marker exists and every file it lists has its size."""
    root = Path(checkpoint) / "deepspeed"
    try:
        files = json.loads((root / UNIVERSAL_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in files.items())


def universal_workers(requested: int = 0) -> int:
    """Processes of the conversion: `checkpoint.universal_workers`, or one per CPU core of this node, at most 8."""
    return requested or max(1, min(8, os.cpu_count() or 1))


def universal_timeout(checkpoint: Path, minutes: float = 0) -> float:
    """Seconds the other ranks wait for rank 0's conversion: `checkpoint.universal_timeout_min`, else 30 min plus
    1 s per 5 MB of the DeepSpeed checkpoint (the conversion reads every shard once and writes about as much
    again; 5 MB/s end to end is far below any cluster filesystem, so only a dead rank 0 ever reaches it)."""
    if minutes:
        return minutes * 60
    state = Path(checkpoint) / "deepspeed" / "state"
    size = sum(p.stat().st_size for p in state.rglob("*") if p.is_file()) if state.is_dir() else 0
    return 1800 + size / 5e6


def prepare_universal(checkpoint: Path, workers: int = 0, timeout_min: float = 0, poll_s: float = 0.5) -> None:
    """Collective. Rank 0 converts `checkpoint` unless its universal form is complete; the other ranks wait for
    the marker by polling the (shared) filesystem, not in a collective, so the wait is as long as
    `universal_timeout` says whatever the process group's timeout; a conversion that fails on rank 0 fails every
    rank at once (rank 0 leaves the error in deepspeed/state_universal.failed)."""
    import time

    import torch.distributed as dist

    from dpar_scale.checkpoint.save_load import CheckpointError

    root = Path(checkpoint) / "deepspeed"
    rank = dist.get_rank()
    if rank == 0 and not universal_ready(checkpoint):
        (root / UNIVERSAL_FAILED).unlink(missing_ok=True)  # before the barrier: nobody may read a stale one
        (root / UNIVERSAL_MARKER).unlink(missing_ok=True)
    dist.barrier()
    if rank == 0:
        try:
            make_universal(checkpoint, workers)
        except Exception as e:
            (root / UNIVERSAL_FAILED).write_text(f"{type(e).__name__}: {e}\n")
            raise
    else:
        deadline = time.monotonic() + universal_timeout(checkpoint, timeout_min)
        while not universal_ready(checkpoint):
            if (root / UNIVERSAL_FAILED).is_file():
                raise CheckpointError(f"rank 0 could not convert {checkpoint} to DeepSpeed's universal form: "
                                      f"{(root / UNIVERSAL_FAILED).read_text().strip()}")
            if time.monotonic() > deadline:
                raise CheckpointError(f"rank 0 did not finish the universal conversion of {checkpoint} within "
                                      f"{universal_timeout(checkpoint, timeout_min) / 60:.0f} min (is it alive?); "
                                      f"convert ahead of time with python tools/export.py {checkpoint} --universal, "
                                      f"or raise checkpoint.universal_timeout_min")
            time.sleep(poll_s)
    dist.barrier()


def make_universal(checkpoint: Path, workers: int = 0) -> Path:
    """DeepSpeed's universal checkpoint (loadable on any number of processes) of `checkpoint/deepspeed/state`,
    written to `checkpoint/deepspeed/state_universal` through a temporary folder by `universal_workers(workers)`
    extracting processes (half as many merging: the merge holds whole parameters); a no-op when a complete one
    exists (`universal_ready`), redone when one exists without its marker."""
    import argparse
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = Path(checkpoint) / "deepspeed"
    target = root / UNIVERSAL_TAG
    if universal_ready(checkpoint):
        return target
    if not (root / "state").is_dir():
        raise MissingFileError(f"{checkpoint} has no DeepSpeed checkpoint (deepspeed/state); only DeepSpeed "
                                f"checkpoints need a universal conversion")
    (root / UNIVERSAL_MARKER).unlink(missing_ok=True)
    tmp = root / (UNIVERSAL_TAG + ".tmp")
    for stale in (tmp, target):
        shutil.rmtree(stale, ignore_errors=True)
    n = universal_workers(workers)
    ds_to_universal(argparse.Namespace(input_folder=str(root / "state"), output_folder=str(tmp),
                                       num_extract_workers=n, num_merge_workers=max(1, n // 2),
                                       keep_temp_folder=False, strict=True, inject_missing_state=True))
    tmp.rename(target)
    (root / "latest_universal").write_text(UNIVERSAL_TAG)  # the converter named the temporary folder
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    files["latest_universal"] = (root / "latest_universal").stat().st_size
    marker = root / UNIVERSAL_MARKER
    marker.with_suffix(".tmp").write_text(json.dumps({"workers": n, "files": files}, indent=1) + "\n")
    marker.with_suffix(".tmp").replace(marker)
    return target
