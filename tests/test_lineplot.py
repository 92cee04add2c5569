"""The PIL line plot behind the demo's FID-domain / validation-loss-against-FLOPs figure."""
import numpy as np
import pytest
from PIL import Image

from dpar_scale.evaluation.lineplot import COLOURS, Panel, Series, line_panels, nice_ticks


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.0, 10.0) == [0, 5, 10]
    assert nice_ticks(0.0, 10.0, target=11) == [float(v) for v in range(11)]
    ticks = nice_ticks(1.3e12, 9.7e12)
    assert ticks[0] <= 1.3e12 and ticks[-1] >= 9.7e12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 5))
    assert nice_ticks(3.0, 3.0) == [3.0]
    with pytest.raises(ValueError):
        nice_ticks(0.0, float("nan"))


def test_each_series_is_drawn_in_its_colour_where_its_points_lie(tmp_path):
    # GPT falls from upper left to lower right, DPAR rises: their colours must fill opposite corners of the panel
    gpt = Series("GPT", [(0.0, 10.0), (1e12, 0.0)])
    dpar = Series("DPAR", [(0.0, 0.0), (1e12, 10.0)])
    path = tmp_path / "plot.png"
    line_panels([Panel("p", "x", "y", [gpt, dpar]), Panel("q", "x", "y", [])], path, title="t")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[1] == 2 * 460

    def where(colour):
        ys, xs = np.nonzero((np.abs(img - np.array(colour)).sum(-1) < 30))
        return ys, xs

    for colour, falling in ((COLOURS[0], True), (COLOURS[1], False)):
        ys, xs = where(colour)
        inside = xs < 460 - 100  # the first panel, legend swatches (top right) left out
        ys, xs = ys[inside], xs[inside]
        assert len(xs) > 100
        slope = np.polyfit(xs, ys, 1)[0]  # image y grows downwards
        assert (slope > 0.3) if falling else (slope < -0.3)
    assert not len(where(COLOURS[0])[1][where(COLOURS[0])[1] > 460])  # the empty panel has no lines
