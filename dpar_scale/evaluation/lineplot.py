"""PNG line plots drawn with PIL: the demo's metric-against-training-FLOPs figure (the paper's Fig. 1b at toy scale).

Why PIL: matplotlib is not a dependency of this project and one figure does not justify adding it; Pillow already
is one (sample grids). `line_panels(panels, path)` draws panels side by side, each a list of named series of
(x, y) points, with linear axes, "nice" ticks, a legend and a title; that is all the demo needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Panel", "Series", "line_panels", "nice_ticks"]

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]; one tick when lo == hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t < hi + step * 0.5:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def line_panels(panels: list[Panel], path, *, title: str = "", panel_size: tuple[int, int] = (460, 340)) -> None:
    """Writes `panels` side by side as one PNG at `path`. Series with no points are listed in the legend only."""
    from PIL import Image, ImageDraw

    if not panels:
        raise ValueError("line_panels needs at least one panel")
    pw, ph = panel_size
    top = 34 if title else 8
    img = Image.new("RGB", (pw * len(panels), ph + top), "white")
    draw = ImageDraw.Draw(img)
    small, big = _font(12), _font(15)
    if title:
        w = draw.textbbox((0, 0), title, font=big)[2]
        draw.text(((img.width - w) // 2, 8), title, fill="black", font=big)
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, (i * pw, top, pw, ph), small, big)
    img.save(path)


def _draw_panel(draw, panel: Panel, box, small, big) -> None:
    x0, y0, pw, ph = box
    left, right, upper, lower = x0 + 70, x0 + pw - 16, y0 + 28, y0 + ph - 48  # plot area
    pts = [p for s in panel.series for p in s.points]
    xs, ys = [p[0] for p in pts] or [0.0, 1.0], [p[1] for p in pts] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    xlo, xhi = min(xt[0], min(xs)), max(xt[-1], max(xs))
    ylo, yhi = min(yt[0], min(ys)), max(yt[-1], max(ys))
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        ylo, yhi = ylo - 1, yhi + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xlo) / (xhi - xlo) * (right - left), lower - (y - ylo) / (yhi - ylo) * (lower - upper))

    w = draw.textbbox((0, 0), panel.title, font=big)[2]
    draw.text((x0 + (pw - w) // 2, y0 + 4), panel.title, fill="black", font=big)
    for t in xt:
        x, _ = at(t, ylo)
        draw.line([(x, upper), (x, lower)], fill=(232, 232, 232))
        label = _fmt(t)
        tw = draw.textbbox((0, 0), label, font=small)[2]
        draw.text((x - tw / 2, lower + 4), label, fill="black", font=small)
    for t in yt:
        _, y = at(xlo, t)
        draw.line([(left, y), (right, y)], fill=(232, 232, 232))
        label = _fmt(t)
        tw = draw.textbbox((0, 0), label, font=small)[2]
        draw.text((left - tw - 6, y - 7), label, fill="black", font=small)
    draw.rectangle([left, upper, right, lower], outline="black")
    xw = draw.textbbox((0, 0), panel.x_label, font=small)[2]
    draw.text(((left + right - xw) / 2, lower + 22), panel.x_label, fill="black", font=small)
    draw.text((x0 + 4, upper - 18), panel.y_label, fill="black", font=small)
    for k, s in enumerate(panel.series):
        colour = COLOURS[k % len(COLOURS)]
        xy = [at(x, y) for x, y in sorted(s.points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = upper + 6 + 16 * k  # legend, top right inside the plot area
        draw.line([(right - 90, ly + 7), (right - 70, ly + 7)], fill=colour, width=2)
        draw.text((right - 64, ly), s.name, fill="black", font=small)
