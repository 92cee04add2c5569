"""Entropy-driven patching: which codes start a patch.

Index convention: `entropy[:, j]` is the entropy (nats) of the entropy model's prediction of code j
from the start token and codes < j. With N = H·W codes in raster order and grid width W:

* codes 0 and 1 always start a patch;
* for k >= 2, code k starts a patch when the boundary signal at k fires, or when k % W == 0 (row reset: a patch
  never crosses a row; `row_reset=False` drops this, the paper's "no row reset" ablation);
* every run longer than P_max is cut into floor(L / P_max) patches of P_max and one of L mod P_max (if non-zero);
  P_max >= H·W never cuts (the paper's "entropy only" ablation: no maximum length and no row reset).

The boundary signal, by alignment:

* `reference` (the authors' code, the default): uses e[k-1]. A hard-to-predict code *closes* its patch.
* `blt` (BLT's byte rule): uses e[k]. A hard-to-predict code *opens* a new patch.

and by mode, with s the aligned entropy and s_prev the one before it:

* `global`: s > θ;
* `monotonic`: s - s_prev > θ (BLT's approximate monotonic rule);
* `global+monotonic`: s > θ or s - s_prev > θ_rel (either signal opens a patch);
* `static`: no entropy at all, the same layout for every image (the paper's ablation baseline). A whole
  `static_length` L gives runs of L restarting at every row (the last of a row shorter; without row reset, runs
  of L over the raster order). A fractional L (the paper's static baseline has length 1.81, the mean of its
  dynamic layout, which no single whole length gives) means round(H·W / L) patches per image, dealt to the rows
  in turn, each row cut into near-equal runs (lengths differ by at most one; codes 0 and 1 start patches, row
  reset and P_max hold: `lengths_with_mean`), so the static model runs as many global positions as the dynamic one.
  At 16x16 and L = 1.81: 141 patches of lengths 1 and 2, mean 1.816.

Comparisons are strict and done in float32, like the authors' code, so a stored float16 entropy that equals θ
exactly does not start a patch. Both alignments are causal: whether code k starts a patch depends on codes < k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dpar_scale.config import PATCH_ALIGNMENTS as ALIGNMENTS
from dpar_scale.config import PATCH_MODES as MODES
from dpar_scale.config import PatchConfig, validate_patch
from dpar_scale.patching.layout import lengths_with_mean

# The paper's θ per image size (LlamaGen VQ-16 codes, 16x16 at 256 px, 24x24 at 384 px) and the mean patch length
# it reports for that θ with P_max 4 and row reset on ImageNet (the global-position reduction: 1.81x / 2.06x).
PAPER_THRESHOLD = {256: 7.8, 384: 7.9}
PAPER_MEAN_PATCH_LENGTH = {256: 1.81, 384: 2.06}


def patch_kwargs(rule: PatchConfig) -> dict:
    """The keywords of `patch_starts` / `patch_lengths` (all but `width`) for the rule a PatchConfig
    (`model.patch`) describes, after checking it. The one way from a config to the rule: training batches,
    sampling, calibration and FLOP counting all go through here, so they cannot apply different rules."""
    validate_patch(rule)
    return dict(threshold=rule.threshold, max_patch_length=rule.max_patch_length, mode=rule.mode,
                alignment=rule.alignment, static_length=rule.static_length, row_reset=rule.row_reset,
                relative_threshold=rule.relative_threshold if rule.mode == "global+monotonic" else None)


def patch_rule(rule: PatchConfig, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`entropy [B, N] -> starts [B, N]` for a grid of width `width` under `rule` (see `patch_kwargs`)."""
    kwargs = patch_kwargs(rule)
    return lambda entropy: patch_starts(entropy, width=width, **kwargs)


def patch_starts(
    entropy: torch.Tensor,
    *,
    width: int,
    threshold: float,
    max_patch_length: int,
    mode: str = "global",
    alignment: str = "reference",
    static_length: float = 2,
    relative_threshold: float | None = None,
    row_reset: bool = True,
) -> torch.Tensor:
    """Bool tensor [B, N]: True where a code starts a patch (after row reset and P_max splitting)."""
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be [B, H*W], got shape {tuple(entropy.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment {alignment!r} is not one of {ALIGNMENTS}")
    if max_patch_length < 1:
        raise ValueError(f"max_patch_length must be >= 1, got {max_patch_length}")
    batch, n = entropy.shape
    if width < 1 or n % width != 0:
        raise ValueError(f"grid width {width} does not divide the {n} codes per image")
    device = entropy.device
    k = torch.arange(n, device=device)
    column = k % width

    if mode == "static":
        starts = _static_starts(n, width, static_length, max_patch_length, row_reset, device).expand(batch, n).clone()
    else:
        e = entropy.to(torch.float32)
        theta = torch.tensor(threshold, dtype=torch.float32, device=device)
        # s[:, k] is the entropy that decides whether code k starts a patch.
        if alignment == "reference":
            s = torch.cat([e.new_zeros(batch, 1), e[:, :-1]], dim=1)
        else:
            s = e
        s_prev = torch.cat([s[:, :1], s[:, :-1]], dim=1)
        rising = (s - s_prev) if mode != "global" else None
        if mode == "global":
            signal = s > theta
        elif mode == "monotonic":
            signal = rising > theta
        else:
            if relative_threshold is None:
                raise ValueError("mode 'global+monotonic' needs relative_threshold (θ_rel for e_k - e_(k-1) > θ_rel)")
            rel = torch.tensor(relative_threshold, dtype=torch.float32, device=device)
            signal = (s > theta) | (rising > rel)
        starts = signal | (column == 0) if row_reset else signal
        starts[:, : min(2, n)] = True  # codes 0 and 1: no entropy (or only e[0]) to decide with
    return _split_long_runs(starts, max_patch_length)


def _static_starts(n: int, width: int, length: float, max_patch_length: int, row_reset: bool,
                   device) -> torch.Tensor:
    """[N] bool: the static layout's patch starts (see the module docstring)."""
    if length < 1:
        raise ValueError(f"static_length must be >= 1, got {length}")
    k = torch.arange(n, device=device)
    if float(length).is_integer():
        return ((k % width) if row_reset else k) % int(length) == 0
    if not row_reset:
        raise ValueError(f"a fractional static_length ({length}) spreads patches over rows and needs row_reset; "
                         f"use a whole static_length without row reset")
    lengths = lengths_with_mean((n // width, width), length, max_patch_length)[0]
    starts = torch.zeros(n, dtype=torch.bool, device=device)
    starts[torch.tensor([0] + lengths[:-1], device=device).cumsum(0)] = True
    return starts


def _split_long_runs(starts: torch.Tensor, max_patch_length: int) -> torch.Tensor:
    """Within each run (a start and the codes up to the next start), start a new patch every P_max codes.

    That is exactly floor(L / P_max) patches of P_max followed by one of L mod P_max.
    """
    n = starts.shape[1]
    k = torch.arange(n, device=starts.device, dtype=torch.int32)  # int32 and a product: half the time of a where
    run_start = (starts * k).cummax(dim=1).values  # the latest start at or before each code
    return (k - run_start) % max_patch_length == 0


def starts_to_patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """Long tensor [B, N]: the index (within its image) of the patch each code belongs to."""
    return starts.long().cumsum(dim=1) - 1


def starts_to_lengths(starts: torch.Tensor) -> list[list[int]]:
    """Per image, the list of patch lengths (sums to N when code 0 starts a patch). Vectorised over the batch:
    a patch runs from its start to the next start of its row, or to the row's end."""
    b, n = starts.shape
    pos = np.flatnonzero(starts.cpu().numpy().reshape(-1))
    row_end = (pos // n + 1) * n
    lengths = (np.minimum(np.append(pos[1:], b * n), row_end) - pos).tolist()
    cut = np.bincount(pos // n, minlength=b).cumsum().tolist()
    return [lengths[a:z] for a, z in zip([0] + cut[:-1], cut)]


def patch_lengths(
    entropy: torch.Tensor,
    *,
    width: int,
    threshold: float,
    max_patch_length: int,
    mode: str = "global",
    alignment: str = "reference",
    static_length: float = 2,
    relative_threshold: float | None = None,
    row_reset: bool = True,
) -> list[list[int]]:
    """Per image, the patch lengths given by the rule in this module's docstring (each list sums to H·W)."""
    starts = patch_starts(
        entropy, width=width, threshold=threshold, max_patch_length=max_patch_length, mode=mode,
        alignment=alignment, static_length=static_length, relative_threshold=relative_threshold,
        row_reset=row_reset,
    )
    return starts_to_lengths(starts)


# ------------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    threshold: float
    mean_patch_length: float  # codes / patches over the whole set (= the global-position reduction factor)
    target: float
    histogram: dict[int, int]  # patch length -> number of patches
    num_images: int


def mean_patch_length(starts: torch.Tensor) -> float:
    return starts.numel() / max(int(starts.sum()), 1)


def length_histogram(starts: torch.Tensor) -> dict[int, int]:
    counts: dict[int, int] = {}
    for lengths in starts_to_lengths(starts):
        for length in lengths:
            counts[length] = counts.get(length, 0) + 1
    return dict(sorted(counts.items()))


def calibrate_threshold(
    entropy: torch.Tensor,
    rule: PatchConfig,
    *,
    width: int,
    target_mean_length: float,
    iterations: int = 40,
) -> Calibration:
    """Finds θ (`rule.threshold`; the rest of `rule` stays as given) whose mean patch length over `entropy`
    [B, N] is closest to the target, by bisection.

    The mean length is non-decreasing in θ (a larger θ fires fewer boundaries; under global+monotonic the rise
    signal with its fixed θ_rel fires regardless), so bisection applies. With ties in the entropies an exact hit
    may not exist; the closest achieved value is returned and reported.
    """
    if rule.mode == "static":
        raise ValueError("a static layout has no threshold to calibrate; set model.patch.static_length instead")
    e = entropy.to(torch.float32)
    kwargs = patch_kwargs(rule)
    del kwargs["threshold"]
    # θ compares entropies (global, global+monotonic) or rises between neighbours (monotonic).
    signal = e if rule.mode != "monotonic" else e[:, 1:] - e[:, :-1]
    low, high = float(signal.min()) - 1.0, float(signal.max()) + 1.0
    ceiling = mean_patch_length(patch_starts(e, width=width, threshold=high, **kwargs))
    if target_mean_length > ceiling + 1e-9:
        forced = f"row resets, P_max={rule.max_patch_length}" + (
            f", rises > θ_rel={rule.relative_threshold}" if rule.mode == "global+monotonic" else "")
        raise ValueError(
            f"target mean patch length {target_mean_length} is unreachable: with only forced starts ({forced}) "
            f"the mean is {ceiling:.3f}; lower the target or raise max_patch_length"
        )
    best = (float("inf"), high)
    for _ in range(iterations):
        mid = (low + high) / 2
        achieved = mean_patch_length(patch_starts(e, width=width, threshold=mid, **kwargs))
        best = min(best, (abs(achieved - target_mean_length), mid))
        if achieved < target_mean_length:
            low = mid
        else:
            high = mid
    theta = best[1]
    starts = patch_starts(e, width=width, threshold=theta, **kwargs)
    return Calibration(
        threshold=theta, mean_patch_length=mean_patch_length(starts), target=target_mean_length,
        histogram=length_histogram(starts), num_images=e.shape[0],
    )


def synthetic_patch_lengths(batch: int, grid: int, *, mean_length: float = 1.81, max_patch_length: int = 4,
                            vocab: int = 512, seed: int = 0) -> list[list[int]]:
    """Per-image patch lengths of `batch` grid x grid images from uniform random entropies (in [0, ln vocab))
    with θ calibrated to `mean_length`: the ragged layouts benchmarks and tests use when no real entropies are
    at hand (patch counts vary from image to image as an entropy layout's do)."""
    import math

    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(batch, grid * grid, generator=g) * math.log(vocab)
    theta = calibrate_threshold(entropy, PatchConfig(max_patch_length=max_patch_length), width=grid,
                                target_mean_length=mean_length).threshold
    return starts_to_lengths(patch_rule(PatchConfig(threshold=theta, max_patch_length=max_patch_length),
                                        grid)(entropy))
