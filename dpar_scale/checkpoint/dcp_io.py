"""Reading and writing torch.distributed.checkpoint (DCP) folders, with one process or many.

Every rank writes its own shards and reads the pieces of its own shards, so a folder written by one layout loads
into any other. A damaged folder becomes a CheckpointError naming it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from dpar_scale.checkpoint.save_load import read_checkpoint_file

# One process without a process group is a normal case here (DCP's single-process mode), and DCP warns on every
# such call — also from the writer threads of a background save, where a local catch_warnings cannot reach.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _single_process() -> bool:
    """No process group: DCP's single-process mode."""
    import torch.distributed as dist

    return not dist.is_initialized()


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder), no_dist=_single_process())


def dcp_save_async(state: dict, folder: Path, group):
    """Copies `state` to CPU memory now; a thread writes it. Returns the future of the write."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(state, checkpoint_id=str(folder), process_group=group, no_dist=_single_process())


def dcp_load(state: dict, folder: Path, no_dist: bool = False) -> None:
    """Loads `folder` in place into the tensors of `state`; a damaged folder becomes a CheckpointError.
    `no_dist`: read everything in this process even when a process group exists (export / sampling)."""
    import torch.distributed.checkpoint as dcp

    def read(path: Path) -> None:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist or _single_process())

    read_checkpoint_file(folder, read)
