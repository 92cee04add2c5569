"""How the embedded dataset's pictures are drawn (dpar_scale.data.synthetic_scenes renders them): the `Detail`
presets (object and texture scale, per-pixel noise, colour palette) by name, and the colour draws that honour a
palette. Each draw consumes the same random numbers with or without a palette, so a picture's other draws (and
so its geometry) do not depend on it."""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detail:
    """How large the objects and their textures are drawn; `fine` is generator v1 exactly (factors of 1.0)."""

    object_scale: float = 1.0  # object sizes (radii, half-sides, arm lengths and widths)
    texture_scale: float = 1.0  # texture periods, cells, dot spacing, ring and line widths
    pixel_noise: float = 0.4  # share of per-pixel noise in the blob and ground textures (rest: value noise)
    dot_radius_min: float = 0.0  # smallest dot radius as a fraction of the dot spacing (fine: 1 pixel)
    # empty: hues, saturations and values drawn from continuous ranges; else hues (in [0, 1)): each object in the
    # nearest of them at one saturation and value, backgrounds too at one low saturation and four values (sky_sun
    # keeps its own colours). Fewer colours: fewer code combinations for a small model to learn each shape in.
    palette: tuple[float, ...] = ()


# the middle of each colour name's hue band (synthetic_captions: red orange yellow green cyan blue purple pink), so
# that every palette colour is named apart
NAMED_HUES = tuple(degrees / 360 for degrees in (0, 27.5, 55, 117.5, 180, 225, 272.5, 317.5))
DETAILS: dict[str, Detail] = {"fine": Detail(), "coarse": Detail(1.35, 2.5, 0.0, 0.25),
                              "coarse-palette": Detail(1.35, 3.2, 0.0, 0.25, palette=NAMED_HUES)}


def _on_palette(hue: float, d: Detail) -> float:
    """The palette hue nearest to `hue` around the colour circle."""
    return min(d.palette, key=lambda p: min(abs(hue % 1.0 - p), 1 - abs(hue % 1.0 - p)))


def vivid(rng: np.random.Generator, d: Detail, hue: float | None = None) -> np.ndarray:
    h = rng.random() if hue is None else hue % 1.0
    saturation, value = rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)
    if d.palette:  # drawn all the same, so that a picture's other draws do not change
        h, saturation, value = _on_palette(h, d), 0.85, 0.9
    return np.array(colorsys.hsv_to_rgb(h, saturation, value), np.float32)


def muted(rng: np.random.Generator, d: Detail, hue: float) -> np.ndarray:
    h, saturation, value = hue % 1.0, rng.uniform(0.05, 0.45), rng.uniform(0.15, 0.95)
    if d.palette:  # four brightness levels from dark to light
        h, saturation, value = _on_palette(h, d), 0.3, 0.2 + 0.7 * round(value * 3) / 3
    return np.array(colorsys.hsv_to_rgb(h, saturation, value), np.float32)


def hue_of(rgb: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*[float(c) for c in rgb])[0]
