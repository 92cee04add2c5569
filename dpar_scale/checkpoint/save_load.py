"""Checkpoints: one folder per step, sharded by torch.distributed.checkpoint (DCP), complete or invisible.

Layout of `<run>/checkpoints/step-000123/` (the same for one process and for any parallel layout):
  model/              DCP folder: the weights, each rank writing its own shards (no rank gathers the model)
  ema/                DCP folder: the EMA weights, when train.ema > 0
  optimizer/          DCP folder: the optimizer state, keyed by parameter name (loadable on another layout)
  deepspeed/          instead of model/ and optimizer/ under the DeepSpeed engine: DeepSpeed's own checkpoint
  rng/rank-00003.pt   each rank's python / numpy / torch RNG states
  train_state.pt      LR scheduler, TrainState (step, samples seen = the global data cursor, codes seen, wandb run
                      id) and the layout that wrote it (engine, world size, dp/tp degrees, batch size)
  config.yaml         the resolved config of the run
  data.json           which data trained it (folders and fingerprints), checked on resume
  complete.json       written last: the size and sha256 of every file above
Every rank writes into `step-000123.tmp`; after a barrier rank 0 writes complete.json and renames the folder, so a
crash or kill at any point of a save leaves the previous checkpoint as the newest loadable one, and
`list_checkpoints` only lists folders that carry complete.json. With `checkpoint.async_save` the shards are
copied to CPU memory at the step and written by background threads; the same barrier + marker + rename happens
when the trainer finishes the save: at the first step boundary at which every rank's writes are done (the
trainer's ranks agree on it), at the latest at the next save or at the end of the run.

Nothing here unpickles objects: train_state.pt and the RNG files hold tensors and plain Python values only
(`torch.load(weights_only=True)`); DCP stores tensors and its own metadata.
`tools/export.py` turns a checkpoint into one consolidated safetensors file (see dpar_scale/checkpoint/export.py).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dpar_scale.checkpoint.rng import reseed, rng_state, set_rng_state
from dpar_scale.config import Config, save_config
from dpar_scale.errors import DparError, MissingFileError
from dpar_scale.integrity import sha256_file
from dpar_scale.parallel.process_group import barrier, get_rank, get_world_size

STEP_DIR = re.compile(r"^step-(\d{6,})$")
DATA_FILE = "data.json"
MARKER = "complete.json"


class CheckpointError(DparError, RuntimeError):
    """A checkpoint file that cannot be read (corrupt / truncated); the message names the file and older ones."""


@dataclass
class TrainState:
    """Everything about progress that is not a tensor of the model or optimizer."""

    step: int = 0
    samples_seen: int = 0  # the global data cursor (see dpar_scale.data.loader)
    codes_seen: int = 0
    global_positions_seen: int = 0
    train_flops: float = 0.0  # analytic training FLOPs of every step so far (all ranks): eval's x-axis
    wandb_id: str = ""
    extra: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------- folders
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_folder(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` of the run in `output_dir` lives (complete once it holds its marker)."""
    return checkpoint_root(output_dir) / f"step-{step:06d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def is_complete(path: Path) -> bool:
    return Path(path).is_dir() and STEP_DIR.match(Path(path).name) is not None and (Path(path) / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they carry complete.json), oldest first. Temporary folders of interrupted saves
    (`step-N.tmp`) are never listed."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_of)


def find_resume_checkpoint(output_dir, resume: str) -> Path | None:
    """`resume=auto`: the newest complete checkpoint of the run (None when there is none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise MissingFileError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder (no {MARKER}: "
                                f"not a checkpoint, or its save was interrupted); use checkpoint.resume=auto to take "
                                f"the newest complete one")
    return path


def write_data_info(folder: Path, data_info: dict | None) -> None:
    if data_info:
        (Path(folder) / DATA_FILE).write_text(json.dumps(data_info, indent=2) + "\n")


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder (relative, sorted), the marker excepted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def shared_checksums(folder: Path, files: list[str]) -> dict[str, str]:
    """sha256 of `files`, rank r hashing every world-size-th one; every rank gets the whole table (collective)."""
    rank, world = get_rank(), get_world_size()
    mine = {name: sha256_file(Path(folder) / name) for name in files[rank::world]}
    if world == 1:
        return mine
    tables: list = [None] * world
    dist.all_gather_object(tables, mine)
    return {name: digest for table in tables for name, digest in table.items()}


def write_marker(folder: Path, info: dict, checksums: dict[str, str] | None = None) -> None:
    """complete.json, the last file of a save: size (and sha256) of every other file, checked on resume."""
    folder = Path(folder)
    files = {name: {"bytes": (folder / name).stat().st_size, **({"sha256": checksums[name]} if checksums else {})}
             for name in checkpoint_files(folder)}
    (folder / MARKER).write_text(json.dumps({**info, "files": files}, indent=1) + "\n")


def publish_checkpoint(tmp: Path, final: Path, output_dir, keep_last: int = 0, protect: Path | None = None) -> None:
    """Makes a fully written temporary folder the checkpoint `final` (one rename), then applies `keep_last`
    retention, never deleting `protect` (the checkpoint the run resumed from)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old, ignore_errors=True)


def _remove_interrupted_saves(output_dir) -> None:
    root = checkpoint_root(output_dir)
    for tmp in root.glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- save / load
@dataclass
class PendingCheckpoint:
    """A save whose shards are still being written by background threads (`checkpoint.async_save`)."""

    tmp: Path
    final: Path
    futures: list
    info: dict
    checksums: bool
    output_dir: Path
    keep_last: int
    protect: Path | None

    def written(self) -> bool:
        """This rank's background writes have finished (successfully or not: `finish_checkpoint` re-raises)."""
        return all(future.done() for future in self.futures)


def save_checkpoint(output_dir, cfg: Config, engine, scheduler, state: TrainState, layout: dict, ema=None,
                    keep_last: int = 0, protect: Path | None = None, data_info: dict | None = None,
                    background: bool = False, text_tokenizer=None) -> Path | PendingCheckpoint:
    """Collective (every rank calls it): engine state as shards, then rank 0 writes the small files, complete.json
    and renames. `layout` describes the process layout (recorded, compared on resume); `text_tokenizer`: a text
    model's tokenizer, carried inside the checkpoint (dpar_scale.checkpoint.text_model). `background`: the
    shards are written by threads and a PendingCheckpoint is returned; `finish_checkpoint` (collective) waits
    for them and publishes."""
    rank = get_rank()
    final = step_folder(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        _remove_interrupted_saves(output_dir)
        tmp.mkdir(parents=True)
        (tmp / "rng").mkdir()
    barrier()
    futures = engine.save_state(tmp, ema, client_state=asdict(state), background=background)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "train_state": asdict(state), "engine": engine.name,
                    "layout": layout}, tmp / "train_state.pt")
        save_config(cfg, tmp / "config.yaml")
        write_data_info(tmp, data_info)
        if text_tokenizer is not None:
            from dpar_scale.checkpoint.text_model import write_text_tokenizer

            write_text_tokenizer(tmp, text_tokenizer)
    pending = PendingCheckpoint(tmp, final, futures, {"step": state.step, "engine": engine.name,
                                                      "world_size": get_world_size()},
                                cfg.checkpoint.checksums, Path(output_dir), keep_last, protect)
    return pending if background else finish_checkpoint(pending)


def finish_checkpoint(pending: PendingCheckpoint) -> Path:
    """Collective: waits for this rank's shard writes, then (all on disk) checksums, complete.json, rename."""
    for future in pending.futures:
        future.result()
    barrier()  # every file of the checkpoint is on disk
    checksums = shared_checksums(pending.tmp, checkpoint_files(pending.tmp)) if pending.checksums else None
    if get_rank() == 0:
        write_marker(pending.tmp, pending.info, checksums)
        publish_checkpoint(pending.tmp, pending.final, pending.output_dir, pending.keep_last, pending.protect)
    barrier()
    return pending.final


def read_checkpoint_file(file: Path, reader, what: str = "") -> object:
    """`reader(file)`, turning a read failure (truncated / corrupt file) into a CheckpointError naming the file
    and the older checkpoints to resume from. Never falls back on its own."""
    file = Path(file)
    try:
        return reader(file)
    except Exception as e:  # safetensors, zip, DCP and unpickling errors have no common base class
        folder = next((p for p in file.parents if STEP_DIR.match(p.name)), file.parent)
        raise CheckpointError(f"checkpoint file {file} cannot be read{what} ({type(e).__name__}: {e}); it is "
                              f"corrupt or truncated (e.g. an interrupted copy or a full disk). "
                              f"{older_hint(folder)}") from e


def older_hint(path: Path) -> str:
    """Names the complete checkpoints older than `path` in its run (what to resume from instead)."""
    path = Path(path)
    older = []
    if STEP_DIR.match(path.name):
        older = [p for p in list_checkpoints(path.parent.parent) if step_of(p) < step_of(path)]
    if not older:
        return "there is no older complete checkpoint in this run; start a new run (new run.output_dir)"
    return (f"resume from an older one with checkpoint.resume={older[-1]} (complete older checkpoints: "
            f"{', '.join(p.name for p in reversed(older))})")


def read_train_state(path: Path) -> dict:
    return read_checkpoint_file(Path(path) / "train_state.pt",
                                lambda f: torch.load(f, map_location="cpu", weights_only=True))


def load_checkpoint(path: Path, engine, scheduler, layout: dict, ema=None, seed: int = 0,
                    say=print) -> TrainState:
    """Collective. Restores engine state (resharded onto this layout by DCP / DeepSpeed), scheduler, TrainState
    and RNG (each rank its own when the layout is unchanged; re-derived otherwise, said in the log)."""
    from dpar_scale.config import ConfigError

    path = Path(path)
    blob = read_train_state(path)
    written_by = blob.get("engine", "?")
    if written_by != engine.name:
        raise ConfigError(f"checkpoint {path} was written by the {written_by!r} engine; this run uses "
                          f"{engine.name!r}. Resume it with the same engine, or export its weights "
                          f"(python tools/export.py {path}) and start a new run from them")
    saved_layout = blob.get("layout", {})
    engine.load_state(path, ema, saved_layout)
    restore_schedule(scheduler, blob["scheduler"]["last_epoch"])
    state = TrainState(**blob["train_state"])
    rank = get_rank()
    same_processes = {k: saved_layout.get(k) for k in PROCESS_KEYS} == {k: layout.get(k) for k in PROCESS_KEYS}
    own = path / "rng" / f"rank-{rank:05d}.pt"
    if same_processes and own.is_file():
        set_rng_state(read_checkpoint_file(own, lambda f: torch.load(f, weights_only=True)))
    else:
        reseed(seed, state.step, rank)
    if not same_processes:
        say(f"resuming a checkpoint written by {describe_layout(saved_layout)} on {describe_layout(layout)}: "
            f"weights and optimizer state resharded; per-rank RNG streams re-derived from (seed, step, rank)")
    if saved_layout.get("batch_size") not in (None, layout.get("batch_size")) or \
            saved_layout.get("tokens_per_microbatch") not in (None, layout.get("tokens_per_microbatch")):
        say(f"global batch size changed on resume: {saved_layout.get('batch_size')} -> {layout.get('batch_size')} "
            f"images per step (global_tokens_per_microbatch {saved_layout.get('tokens_per_microbatch')} -> "
            f"{layout.get('tokens_per_microbatch')}); continuing from the same sample, "
            f"{state.samples_seen} of the global order")
    return state


PROCESS_KEYS = ("world_size", "dp_replicate", "dp_shard", "tp")


def restore_schedule(scheduler, last_epoch: int) -> None:
    """Puts a LambdaLR at `last_epoch` and sets every parameter group's learning rate the way its `step()` would.
    Not `load_state_dict`: the saved `base_lrs` has one entry per parameter group of the layout that saved it,
    and the number of groups depends on the layout."""
    scheduler.last_epoch = last_epoch
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def describe_layout(layout: dict) -> str:
    if not layout:
        return "an unknown layout"
    return (f"{layout.get('world_size', '?')} process(es) (dp_replicate={layout.get('dp_replicate', '?')}, "
            f"dp_shard={layout.get('dp_shard', '?')}, tp={layout.get('tp', '?')})")
