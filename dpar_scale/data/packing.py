"""Micro-batches that fill a budget of global-transformer positions.

DPAR's global cost per image is M_i + 1 positions (class + patches), and M_i varies with content (an image of sky
has few patches, a crowd many). A fixed image count per micro-batch therefore wastes memory on easy batches or
overflows on hard ones; instead we take images in stream order while Σ (M_i + 1), padded up to `pad_to_multiple`
(the tensor-parallel degree), stays within `budget`. The number of images per micro-batch then varies.

Greedy in stream order, no look-ahead or re-ordering: the output is a pure function of the input order, so the
data order stays a function of (seed, epoch, sample index) and resuming from a cursor reproduces the batches.
Text models: an item may carry its caption length L_i as a third element; its cost is then M_i + L_i (the caption
replaces the class position). No I/O.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np


def padded(positions: int, pad_to_multiple: int) -> int:
    return -(-positions // pad_to_multiple) * pad_to_multiple


@dataclass
class MicroBatch:
    sample_ids: list[Any] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)  # per image, its patch lengths
    positions: int = 0  # Σ (M_i + 1), without padding
    budget: int = 0
    pad_to_multiple: int = 1

    @property
    def padded_positions(self) -> int:
        """Length T of the packed global sequence this micro-batch produces."""
        return padded(self.positions, self.pad_to_multiple)

    @property
    def fill(self) -> float:
        """Fraction of the budget holding real positions (padding excluded)."""
        return self.positions / self.budget if self.budget else 0.0

    def __len__(self) -> int:
        return len(self.sample_ids)

    def layout(self, grid):
        from dpar_scale.patching.layout import PatchLayout

        return PatchLayout.from_lengths(self.lengths, grid, pad_to_multiple=self.pad_to_multiple)


def pack_microbatches(items: Iterable[tuple[Any, Sequence[int]]], budget: int, pad_to_multiple: int = 1,
                      max_images: int | None = None, drop_last: bool = False,
                      chunk: int = 1024) -> Iterator[MicroBatch]:
    """Yields MicroBatches from (sample id, patch lengths[, condition length]) items, in order, each with padded
    Σ (M_i + C_i) <= budget (C_i = 1, the class, unless the item gives a text model's caption length).

    A micro-batch is closed when the next image would not fit (or `max_images` is reached). An image that alone
    exceeds the budget is an error, not a silent drop. `drop_last` discards the final, partly filled batch.
    Items are read `chunk` at a time and packed by `pack_columns`."""
    def columns():
        items_left = iter(items)
        while True:
            part = list(itertools.islice(items_left, chunk))
            if not part:
                return
            cond = [int(x[2]) if len(x) > 2 else 1 for x in part]
            yield [x[0] for x in part], [list(x[1]) for x in part], cond

    return pack_columns(columns(), budget, pad_to_multiple, max_images, drop_last)


def pack_columns(chunks: Iterable[tuple[list, list, Sequence[int] | None]], budget: int, pad_to_multiple: int = 1,
                 max_images: int | None = None, drop_last: bool = False) -> Iterator[MicroBatch]:
    """`pack_microbatches` over a stream read in chunks of columns (sample ids, patch lengths per image,
    condition lengths or None for one class position each), vectorised within a chunk: with P the running sum of
    the costs M_i + C_i, a micro-batch starting at image s ends before the first image e with
    P[e + 1] − P[s] > ⌊budget / pad⌋ · pad (the largest padded total within the budget): one searchsorted per
    micro-batch, none per image. A micro-batch still open at the end of a chunk continues into the next."""
    if budget < 1 or pad_to_multiple < 1:
        raise ValueError(f"budget ({budget}) and pad_to_multiple ({pad_to_multiple}) must be >= 1")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    cap = budget // pad_to_multiple * pad_to_multiple  # padded(x) <= budget  <=>  x <= cap
    ids, lengths, costs = [], [], np.zeros(0, dtype=np.int64)  # the images not yet in a closed micro-batch

    def too_big(k: int):
        cost = int(costs[k])
        return ValueError(f"sample {ids[k]!r} needs {cost} global positions (padded to "
                          f"{padded(cost, pad_to_multiple)}), more than the budget of {budget}: raise "
                          f"data.global_tokens_per_microbatch")

    def batch(a: int, z: int, positions: int) -> MicroBatch:
        return MicroBatch(sample_ids=ids[a:z], lengths=lengths[a:z], positions=positions, budget=budget,
                          pad_to_multiple=pad_to_multiple)

    for chunk_ids, chunk_lengths, chunk_cond in chunks:
        counts = np.fromiter(map(len, chunk_lengths), dtype=np.int64, count=len(chunk_lengths))
        cond = np.ones_like(counts) if chunk_cond is None else np.asarray(chunk_cond, dtype=np.int64)
        ids, lengths = ids + list(chunk_ids), lengths + list(chunk_lengths)
        costs = np.concatenate([costs, counts + cond])
        total = np.concatenate([[0], np.cumsum(costs)])
        s = 0
        while True:
            e = int(np.searchsorted(total, total[s] + cap, side="right")) - 1  # images s .. e-1 fit
            if max_images is not None:
                e = min(e, s + max_images)
            if e == s:
                raise too_big(s)
            if e == len(costs):  # still open: the next chunk may add to it
                break
            if costs[e] > cap:  # the image that closes the batch is read (and refused) before the batch is out
                raise too_big(e)
            yield batch(s, e, int(total[e] - total[s]))
            s = e
        ids, lengths, costs = ids[s:], lengths[s:], costs[s:]
    if ids and not drop_last:
        yield batch(0, len(ids), int(costs.sum()))


def packing_summary(batches: Sequence[MicroBatch]) -> dict:
    """Mean / min fill, images per micro-batch and padding, for logs."""
    if not batches:
        return {"micro_batches": 0, "images": 0, "mean_fill": 0.0, "min_fill": 0.0, "padding": 0}
    fills = [b.fill for b in batches]
    return {"micro_batches": len(batches), "images": sum(len(b) for b in batches),
            "mean_fill": sum(fills) / len(fills), "min_fill": min(fills),
            "images_per_batch": (min(len(b) for b in batches), max(len(b) for b in batches)),
            "padding": sum(b.padded_positions - b.positions for b in batches)}
