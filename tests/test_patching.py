"""The patch rule (dpar_scale.patching.rule), checked by hand-worked examples, a loop-by-loop reference, and properties."""
import math

import pytest
import torch

from dpar_scale.config import ConfigError, PatchConfig, load_config
from dpar_scale.patching.rule import (
    calibrate_threshold, patch_kwargs, patch_lengths, patch_rule, patch_starts, starts_to_lengths, starts_to_patch_ids,
)


def reference_lengths_any_rule(e, width, theta, pmax, mode, alignment, row_reset, relative):
    """The module docstring's rule for one image, code by code in float32, every mode but static."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    n, theta, relative = len(e), f32(theta), f32(relative) if relative is not None else None
    aligned = [0.0] + [f32(x) for x in e[:-1]] if alignment == "reference" else [f32(x) for x in e]
    starts = []
    for k in range(n):
        s, s_prev = aligned[k], aligned[max(k - 1, 0)]
        rise = f32(s - s_prev)  # the vectorised rule subtracts in float32
        signal = {"global": s > theta, "monotonic": rise > theta,
                  "global+monotonic": s > theta or (relative is not None and rise > relative)}[mode]
        if k < 2 or (row_reset and k % width == 0) or signal:
            starts.append(k)
    lengths = []
    for a, b in zip(starts, starts[1:] + [n]):
        run = b - a
        lengths += [pmax] * (run // pmax) + ([run % pmax] if run % pmax else [])
    return lengths


def reference_lengths(e, width, theta, pmax, alignment="reference"):
    """The default rule (global threshold, rows reset) by the code-by-code reference."""
    return reference_lengths_any_rule(e, width, theta, pmax, "global", alignment, True, None)


def test_hand_worked_reference_alignment():
    # One row of 8 codes, θ = 5. e[2] = 9 > θ makes code 3 start a patch (the hard code 2 closes its patch).
    e = torch.tensor([[9.0, 1.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert patch_lengths(e, width=8, threshold=5.0, max_patch_length=8) == [[1, 2, 5]]
    # The same with P_max = 2: the run of 5 becomes 2, 2, 1.
    assert patch_lengths(e, width=8, threshold=5.0, max_patch_length=2) == [[1, 2, 2, 2, 1]]
    # e[0] never matters: code 1 always starts anyway. e[N-1] never matters: nothing follows it.
    e2 = e.clone()
    e2[0, 0], e2[0, 7] = -3.0, 99.0
    assert patch_lengths(e2, width=8, threshold=5.0, max_patch_length=8) == [[1, 2, 5]]


def test_hand_worked_blt_alignment():
    e = torch.tensor([[9.0, 1.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    # Under BLT's alignment the hard code 2 opens its own patch.
    assert patch_lengths(e, width=8, threshold=5.0, max_patch_length=8, alignment="blt") == [[1, 1, 6]]


def test_row_reset_two_rows():
    # 2 rows of 4, all entropies low: codes 0 and 1 start, then code 4 (row start).
    e = torch.zeros(1, 8)
    assert patch_lengths(e, width=4, threshold=1.0, max_patch_length=4) == [[1, 3, 4]]
    assert patch_lengths(e, width=4, threshold=1.0, max_patch_length=2) == [[1, 2, 1, 2, 2]]


def test_threshold_is_strict_and_float32():
    theta = 7.8
    e = torch.full((1, 6), 0.0)
    e[0, 2] = torch.tensor(theta, dtype=torch.float32)  # equal in float32: not above
    assert patch_lengths(e, width=6, threshold=theta, max_patch_length=6) == [[1, 5]]
    e[0, 2] = torch.nextafter(torch.tensor(theta, dtype=torch.float32), torch.tensor(9.0))
    assert patch_lengths(e, width=6, threshold=theta, max_patch_length=6) == [[1, 2, 3]]
    # float16 storage: the stored value rounded to 7.80078125 > 7.8
    e16 = e.clone()
    e16[0, 2] = 7.8
    assert patch_lengths(e16.half(), width=6, threshold=theta, max_patch_length=6) == [[1, 2, 3]]


def test_monotonic_modes():
    e = torch.tensor([[0.0, 1.0, 4.0, 4.5, 4.6, 1.0, 8.0, 8.0]])
    # reference alignment: code k uses e[k-1] - e[k-2]; rises > 2 at e[2]-e[1]=3 (k=3) and e[6]-e[5]=7 (k=7).
    assert patch_lengths(e, width=8, threshold=2.0, max_patch_length=8, mode="monotonic") == [[1, 2, 4, 1]]
    # global+monotonic: either e > 6 (k=7, k=8 n/a) or rise > 2 (k=3, k=7).
    lengths = patch_lengths(e, width=8, threshold=6.0, max_patch_length=8, mode="global+monotonic",
                            relative_threshold=2.0)
    assert lengths == [[1, 2, 4, 1]]
    with pytest.raises(ValueError, match=r"mode 'global\+monotonic' needs relative_threshold"):
        patch_lengths(e, width=8, threshold=6.0, max_patch_length=8, mode="global+monotonic")
    # the same rule from its config, through the one adapter every user of the rule calls
    rule = PatchConfig(mode="global+monotonic", threshold=6.0, max_patch_length=8, relative_threshold=2.0)
    assert starts_to_lengths(patch_rule(rule, 8)(e)) == [[1, 2, 4, 1]]
    assert patch_lengths(e, width=8, **patch_kwargs(rule)) == [[1, 2, 4, 1]]


def test_patch_config_to_rule():
    g = torch.Generator().manual_seed(5)
    e = torch.rand(4, 48, generator=g) * 9.7
    for fields in (dict(), dict(mode="monotonic", threshold=1.5, alignment="blt"), dict(mode="static", static_length=3),
                   dict(mode="global+monotonic", threshold=8.0, relative_threshold=2.5, max_patch_length=2)):
        rule = PatchConfig(**fields)
        explicit = patch_starts(e, width=8, threshold=rule.threshold, max_patch_length=rule.max_patch_length,
                                mode=rule.mode, alignment=rule.alignment, static_length=rule.static_length,
                                relative_threshold=rule.relative_threshold or None)
        assert torch.equal(patch_rule(rule, 8)(e), explicit), fields
    # θ_rel is required by global+monotonic and refused elsewhere (it would be silently ignored), in the config too
    with pytest.raises(ConfigError, match=r"model\.patch\.mode=global\+monotonic needs model\.patch\."
                                          r"relative_threshold > 0.*got 0\.0"):
        patch_kwargs(PatchConfig(mode="global+monotonic"))
    with pytest.raises(ConfigError, match=r"needs model\.patch\.relative_threshold > 0"):
        load_config(None, ["model.patch.mode=global+monotonic", "model.patch.relative_threshold=-1"])
    with pytest.raises(ConfigError, match=r"relative_threshold=1\.5 is read only by model\.patch\.mode=global\+"
                                          r"monotonic, not by mode=monotonic \(whose rise threshold is "
                                          r"model\.patch\.threshold\)"):
        load_config(None, ["model.patch.mode=monotonic", "model.patch.relative_threshold=1.5"])
    cfg = load_config(None, ["model.patch.mode=global+monotonic", "model.patch.relative_threshold=1.5"])
    assert patch_kwargs(cfg.model.patch)["relative_threshold"] == 1.5


def test_static_mode_restarts_every_row():
    e = torch.rand(2, 12)
    assert patch_lengths(e, width=6, threshold=0.0, max_patch_length=4, mode="static", static_length=4) == [
        [4, 2, 4, 2]] * 2
    assert patch_lengths(e, width=6, threshold=0.0, max_patch_length=2, mode="static", static_length=4) == [
        [2, 2, 2, 2, 2, 2]] * 2


@pytest.mark.parametrize("alignment", ["reference", "blt"])
@pytest.mark.parametrize("pmax", [1, 2, 4, 16])
def test_matches_loop_reference_on_random_entropies(alignment, pmax):
    g = torch.Generator().manual_seed(pmax)
    width = 16
    e = torch.rand(16, 256, generator=g) * 9.7
    got = patch_lengths(e, width=width, threshold=7.8, max_patch_length=pmax, alignment=alignment)
    for i in range(e.shape[0]):
        assert got[i] == reference_lengths(e[i].tolist(), width, 7.8, pmax, alignment)


@pytest.mark.parametrize("mode", ["global", "monotonic", "static"])
def test_properties(mode):
    g = torch.Generator().manual_seed(1)
    h, w, pmax = 24, 24, 4
    e = torch.rand(8, h * w, generator=g) * 9.7
    starts = patch_starts(e, width=w, threshold=7.0 if mode == "global" else 2.0, max_patch_length=pmax, mode=mode,
                          static_length=3)
    for lengths in starts_to_lengths(starts):
        assert sum(lengths) == h * w
        assert max(lengths) <= pmax and min(lengths) >= 1
    # no patch crosses a row: every row start is a patch start
    assert starts[:, ::w].all()
    # the tensor form (patch ids) agrees with the list form
    ids = starts_to_patch_ids(starts)
    for row_ids, lengths in zip(ids, starts_to_lengths(starts)):
        expected = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        assert torch.equal(row_ids, expected)


def test_pmax_one_and_infinite_threshold():
    e = torch.rand(3, 64) * 9.7
    assert patch_lengths(e, width=8, threshold=7.8, max_patch_length=1) == [[1] * 64] * 3
    # θ = +inf: only the forced starts (codes 0, 1, row starts), then P_max splitting.
    assert patch_lengths(e, width=8, threshold=math.inf, max_patch_length=8) == [[1, 7] + [8] * 7] * 3


def test_causality_of_boundaries():
    # Whether code k starts a patch depends only on e[:k] (reference) -- so only on codes < k-1... < k.
    g = torch.Generator().manual_seed(3)
    e = torch.rand(1, 64, generator=g) * 9.7
    base = patch_starts(e, width=8, threshold=6.0, max_patch_length=4)
    for k in range(64):
        e2 = e.clone()
        e2[0, k:] = torch.rand(64 - k, generator=g) * 9.7
        assert torch.equal(patch_starts(e2, width=8, threshold=6.0, max_patch_length=4)[0, : k + 1], base[0, : k + 1])


def test_calibration_hits_target():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(64, 256, generator=g) * 9.7
    cal = calibrate_threshold(e, PatchConfig(max_patch_length=4), width=16, target_mean_length=1.81)
    # distinct entropies: θ crossing one of them moves at most one patch start (a merged run may be split again by
    # P_max), so some achievable mean lies within one patch (N/P - N/(P+1) ≈ target²/N) of the target
    assert abs(cal.mean_patch_length - 1.81) <= 1.81 ** 2 / e.numel()
    assert sum(k * v for k, v in cal.histogram.items()) == 64 * 256
    # the reported θ reproduces the reported mean
    starts = patch_starts(e, width=16, threshold=cal.threshold, max_patch_length=4)
    assert starts.numel() / starts.sum().item() == cal.mean_patch_length
    # forced starts only: 1 + 4 patches in row 0, 4 in each other row
    with pytest.raises(ValueError, match=r"target mean patch length 5\.0 is unreachable: with only forced starts "
                                         rf"\(row resets, P_max=4\) the mean is {256 / 65:.3f}"):
        calibrate_threshold(e, PatchConfig(max_patch_length=4), width=16, target_mean_length=5.0)


def test_calibration_of_global_plus_monotonic():
    # θ_rel stays as given; θ is found so that both signals together give the target mean.
    g = torch.Generator().manual_seed(2)
    e = torch.rand(32, 256, generator=g) * 9.7
    rule = PatchConfig(mode="global+monotonic", max_patch_length=4, relative_threshold=3.0)
    cal = calibrate_threshold(e, rule, width=16, target_mean_length=1.8)
    assert abs(cal.mean_patch_length - 1.8) <= 1.8 ** 2 / e.numel()  # as in test_calibration_hits_target
    got = patch_starts(e, width=16, threshold=cal.threshold, max_patch_length=4, mode="global+monotonic",
                       relative_threshold=3.0)
    assert got.numel() / got.sum().item() == cal.mean_patch_length
    # the rise signal fires on its own: without it the same θ gives longer patches
    alone = patch_starts(e, width=16, threshold=cal.threshold, max_patch_length=4)
    assert alone.sum() < got.sum()
    with pytest.raises(ValueError, match=r"\(row resets, P_max=4, rises > θ_rel=3\.0\) the mean is"):
        calibrate_threshold(e, rule, width=16, target_mean_length=3.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not divide"):
        patch_lengths(torch.zeros(1, 10), width=4, threshold=1.0, max_patch_length=2)
    with pytest.raises(ValueError, match="mode"):
        patch_lengths(torch.zeros(1, 8), width=4, threshold=1.0, max_patch_length=2, mode="dynamic")


def test_without_row_reset_patches_cross_rows():
    # 2 rows of 4, all entropies low: with row reset code 4 starts a patch; without it only codes 0, 1 and the
    # P_max cuts do, so a run goes on across the row end (the paper's "no row reset" ablation).
    e = torch.zeros(1, 8)
    assert patch_lengths(e, width=4, threshold=1.0, max_patch_length=8, row_reset=False) == [[1, 7]]
    assert patch_lengths(e, width=4, threshold=1.0, max_patch_length=3, row_reset=False) == [[1, 3, 3, 1]]
    # "entropy only": no row reset and P_max >= H·W: only the entropy signal cuts
    e[0, 4] = 9.0  # e[4] > θ: code 5 starts a patch (reference alignment)
    assert patch_lengths(e, width=4, threshold=1.0, max_patch_length=8, row_reset=False) == [[1, 4, 3]]
    # the loop reference with its row-start clause removed agrees on random entropies
    g = torch.Generator().manual_seed(5)
    e = torch.rand(8, 64, generator=g) * 9.7
    got = patch_lengths(e, width=8, threshold=7.0, max_patch_length=64, row_reset=False)
    for i in range(8):
        assert got[i] == reference_lengths(e[i].tolist(), 64, 7.0, 64)  # width = N: no row starts after code 0


def test_static_without_row_reset_runs_over_the_raster_order():
    e = torch.rand(1, 12)
    assert patch_lengths(e, width=6, threshold=0.0, max_patch_length=4, mode="static", static_length=4,
                         row_reset=False) == [[4, 4, 4]]


def test_fractional_static_length_is_that_mean():
    # The paper's static baseline has length 1.81 (its dynamic layout's mean): on 16x16, round(256 / 1.81) = 141
    # patches of lengths 1 and 2, every row starting a patch, the same layout for every image.
    e = torch.rand(3, 256)
    lengths = patch_lengths(e, width=16, threshold=0.0, max_patch_length=4, mode="static", static_length=1.81)
    assert lengths[0] == lengths[1] == lengths[2]
    assert len(lengths[0]) == 141 and sum(lengths[0]) == 256 and set(lengths[0]) == {1, 2}
    rows = torch.tensor([0] + lengths[0][:-1]).cumsum(0)
    assert set(range(0, 256, 16)) <= set(rows.tolist())  # row reset holds
    # 384 px: 24x24 at the paper's 2.06 -> round(576 / 2.06) = 280 patches
    lengths = patch_lengths(torch.rand(1, 576), width=24, threshold=0.0, max_patch_length=4, mode="static",
                            static_length=2.06)[0]
    assert len(lengths) == 280 and max(lengths) <= 4
    # a whole length keeps its old meaning (runs of L from each row start)
    assert patch_lengths(e[:1], width=16, threshold=0.0, max_patch_length=4, mode="static",
                         static_length=2.0) == [[2] * 128]
    with pytest.raises(ValueError, match="needs row_reset"):
        patch_lengths(e, width=16, threshold=0.0, max_patch_length=4, mode="static", static_length=1.81,
                      row_reset=False)


def test_vectorised_rule_equals_the_code_by_code_reference_in_every_mode():
    g = torch.Generator().manual_seed(3)
    for trial in range(48):
        mode = ["global", "monotonic", "global+monotonic"][trial % 3]
        alignment, row_reset = ["reference", "blt"][trial % 2], trial % 4 < 2
        width, pmax = [1, 3, 8][trial % 3], [1, 2, 4, 64][trial // 3 % 4]
        e = torch.rand(5, width * [1, 4, 8][trial // 12 % 3], generator=g) * 6.3
        e = e.half() if trial % 5 == 0 else e  # stored entropies are float16
        theta = float(torch.rand(1, generator=g)) * (6.0 if mode == "global" else 2.0)
        relative = 0.5 + float(torch.rand(1, generator=g)) if mode == "global+monotonic" else None
        got = patch_lengths(e, width=width, threshold=theta, max_patch_length=pmax, mode=mode, alignment=alignment,
                            row_reset=row_reset, relative_threshold=relative)
        for i in range(e.shape[0]):
            assert got[i] == reference_lengths_any_rule(e[i].float().tolist(), width, theta, pmax, mode, alignment,
                                                        row_reset, relative), (trial, i)
