"""Micro-batches that fill a budget of global-transformer positions.

DPAR's global cost per image is M_i + 1 positions (class + patches), and M_i varies with content (an image of sky
has few patches, a crowd many). A fixed image count per micro-batch therefore wastes memory on easy batches or
overflows on hard ones; instead we take images in stream order while Σ (M_i + 1), padded up to `pad_to_multiple`
(the tensor-parallel degree), stays within `budget`. The number of images per micro-batch then varies.

Greedy in stream order, no look-ahead or re-ordering: the output is a pure function of the input order, so the
data order stays a function of (seed, epoch, sample index) and resuming from a cursor reproduces the batches.
Text models: an item may carry its caption length L_i as a third element; its cost is then M_i + L_i (the caption
replaces the class position). Pure Python; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence


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
                      max_images: int | None = None, drop_last: bool = False) -> Iterator[MicroBatch]:
    """Yields MicroBatches from (sample id, patch lengths[, condition length]) items, in order, each with padded
    Σ (M_i + C_i) <= budget (C_i = 1, the class, unless the item gives a text model's caption length).

    A micro-batch is closed when the next image would not fit (or `max_images` is reached). An image that alone
    exceeds the budget is an error, not a silent drop. `drop_last` discards the final, partly filled batch.
    """
    if budget < 1 or pad_to_multiple < 1:
        raise ValueError(f"budget ({budget}) and pad_to_multiple ({pad_to_multiple}) must be >= 1")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    current = MicroBatch(budget=budget, pad_to_multiple=pad_to_multiple)
    for item in items:
        sample_id, lengths = item[0], item[1]
        cost = len(lengths) + (int(item[2]) if len(item) > 2 else 1)
        if padded(cost, pad_to_multiple) > budget:
            raise ValueError(f"sample {sample_id!r} needs {cost} global positions (padded to "
                             f"{padded(cost, pad_to_multiple)}), more than the budget of {budget}: raise "
                             f"data.global_tokens_per_microbatch")
        full = max_images is not None and len(current) >= max_images
        if current.sample_ids and (full or padded(current.positions + cost, pad_to_multiple) > budget):
            yield current
            current = MicroBatch(budget=budget, pad_to_multiple=pad_to_multiple)
        current.sample_ids.append(sample_id)
        current.lengths.append(list(lengths))
        current.positions += cost
    if current.sample_ids and not drop_last:
        yield current


def packing_summary(batches: Sequence[MicroBatch]) -> dict:
    """Mean / min fill, images per micro-batch and padding, for logs."""
    if not batches:
        return {"micro_batches": 0, "images": 0, "mean_fill": 0.0, "min_fill": 0.0, "padding": 0}
    fills = [b.fill for b in batches]
    return {"micro_batches": len(batches), "images": sum(len(b) for b in batches),
            "mean_fill": sum(fills) / len(fills), "min_fill": min(fills),
            "images_per_batch": (min(len(b) for b in batches), max(len(b) for b in batches)),
            "padding": sum(b.padded_positions - b.positions for b in batches)}
