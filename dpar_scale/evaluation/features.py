"""Batched feature extraction, on one process or split over the ranks of a process group.

Batch k always holds images [k*B, (k+1)*B) of the source (B = batch_size, not set by the world size); rank r runs
batches r, r+W, r+2W, ... and every rank receives all rows back in file order. So the features, and everything
computed from them, do not depend on how many processes ran. The detector runs in full float32 (autocast off,
TF32 off) because the metrics are compared across runs and papers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dpar_scale.parallel import process_group as pg

from .detectors import FeatureDetector
from .sources import ImageSource

__all__ = ["Features", "extract_features", "full_fp32", "group_rank"]


@dataclass
class Features:
    features: np.ndarray             # float32 [N, F], file order
    probs: np.ndarray | None = None  # float32 [N, C] class probabilities, or None


def group_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one: torchrun's environment alone, with no
    group to gather over, must not make a process evaluate only its share."""
    return (dist.get_rank(), dist.get_world_size()) if pg.is_initialized() else (0, 1)


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """No autocast and no TF32 inside (restored on exit): a metric must not depend on the caller's precision."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _collective_device() -> torch.device:
    """Where tensors must live for the default group's collectives (gloo: CPU; nccl: the rank's current GPU)."""
    backend = str(dist.get_backend())
    return torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())


def _gather_batches(local: list[torch.Tensor], num_batches: int) -> torch.Tensor:
    """Concatenate every rank's round-robin batches back in batch order (identity without a process group)."""
    if not pg.is_initialized():
        return torch.cat(local)
    world = dist.get_world_size()
    shapes = pg.all_gather_object(([b.shape[0] for b in local], local[0].shape[1] if local else 0))
    counts = [c for c, _ in shapes]  # rows of each rank's batches, in its order
    width = max(w for _, w in shapes)
    rows = max(sum(c) for c in counts)
    cdev = _collective_device()
    mine = torch.zeros(rows, width, dtype=torch.float32, device=cdev)
    if local:
        stacked = torch.cat(local).to(cdev)
        mine[: stacked.shape[0]] = stacked
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    pieces = [rank_rows.split(c + [rows - sum(c)])[: len(c)] for rank_rows, c in zip(everyone, counts)]
    ordered = [pieces[k % world][k // world] for k in range(num_batches)]
    return torch.cat(ordered).cpu()


def extract_features(source: ImageSource, detector: FeatureDetector, batch_size: int = 64,
                     device: torch.device | str = "cpu", need_probs: bool = True, progress: bool = True,
                     desc: str = "features") -> Features:
    """Features (and class probabilities when `need_probs`) of every image of `source`, in file order."""
    device = torch.device(device)
    n = len(source)
    num_batches = -(-n // batch_size)
    rank, world = group_rank()
    mine = list(range(rank, num_batches, world))
    feats, probs = [], []
    bar = tqdm(total=sum(min(batch_size, n - k * batch_size) for k in mine), desc=desc, unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True)
    with full_fp32(device):
        for k in mine:
            images = source.read(k * batch_size, min(n, (k + 1) * batch_size))
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()
            f, p = detector(batch, need_probs=need_probs)
            feats.append(f.cpu())
            if need_probs:
                probs.append(p.cpu())
            bar.update(batch.shape[0])
    bar.close()
    all_feats = _gather_batches(feats, num_batches).numpy()
    all_probs = _gather_batches(probs, num_batches).numpy() if need_probs else None
    return Features(all_feats, all_probs)
