"""The embedded dataset's pictures: its class list, the drawing helpers, one renderer per class, and
`render_scene` / `render_image`, pure functions from (class, index, size, seed) to an image and the `Scene` it
shows. Writing the dataset to disk (ImageFolder tree, classes.json, captions) is dpar_scale.data.synthetic, which
re-exports these names.

Determinism: image (class c, index i) is drawn from numpy's PCG64 seeded with (seed, c, i), so it does not
depend on how many images per class are generated or in which order, and two runs write identical bytes.

Detail (presets in dpar_scale.data.scene_style): `detail="fine"` (the default) draws generator v1's pictures, whose textures (stripe periods, checker cells,
dot spacing, ring widths, noise) are 1-5 pixels at 64 px; `detail="coarse"` draws the same random numbers with the
objects 1.35x larger and every texture 2.5x coarser and free of per-pixel noise, so that what tells the classes apart
lies at the scale of an 8x8-pixel code (the embedded demo's tokenizer), not below it (see README, demo);
`detail="coarse-palette"` (the demo's) draws its textures coarser still (3.2x: checker cells of 6-13 px, stripe
periods of 8-16 px, where coarse's 5-px cells fell below a code) and its colours from a palette of 8 hues, one per
colour name (`Detail.palette`).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dpar_scale.data.scene_style import DETAILS, Detail, hue_of, muted, vivid

GENERATOR_VERSION = 1


# (name, what the class looks like). Order defines the label index.
_CLASSES: list[tuple[str, str]] = [
    ("disc", "one flat-coloured disc on a flat or graded background"),
    ("square", "a rotated flat-coloured square"),
    ("ring", "an annulus (ring) of random radius and thickness"),
    ("stripes", "a rectangle filled with fine stripes of random period and orientation"),
    ("checker", "a square object filled with a fine two-colour checkerboard"),
    ("triangle", "a rotated flat-coloured triangle"),
    ("cross", "a rotated plus-shaped cross"),
    ("blob", "an irregular blob filled with fine random texture"),
    ("sky_sun", "graded sky with a sun disc above a textured ground strip"),
    ("dots", "a rectangular grid of small dots"),
    ("star", "a rotated five-pointed star"),
    ("waves", "a band of wavy parallel lines"),
]
CLASS_NAMES: list[str] = [n for n, _ in _CLASSES]
CLASS_DESCRIPTIONS: dict[str, str] = dict(_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# drawing helpers (all in float32 RGB in [0, 1], coordinates in pixels, pixel centres at k + 0.5)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")  # yy, xx


def _background(rng: np.random.Generator, size: int, fg_hue: float, d: Detail) -> tuple[np.ndarray, dict]:
    """Flat (half the time) or a smooth linear gradient, in a hue far from the foreground's; and what it is."""
    hue = fg_hue + rng.uniform(0.3, 0.7)
    c0 = muted(rng, d, hue)
    img = np.empty((size, size, 3), np.float32)
    if rng.random() < 0.5:
        img[:] = c0
        return img, {"kind": "flat", "colours": [c0]}
    c1 = muted(rng, d, hue + rng.uniform(-0.1, 0.1))
    yy, xx = _grid(size)
    ang = rng.uniform(0, 2 * np.pi)
    t = (np.cos(ang) * xx + np.sin(ang) * yy) / size
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 * (1 - t[..., None]) + c1 * t[..., None], {"kind": "graded", "colours": [c0, c1]}


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside): a one-pixel ramp."""
    return np.clip(0.5 - sdf, 0.0, 1.0)[..., None]


def _paint(img: np.ndarray, sdf: np.ndarray, colour: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """`img` with `colour` painted where sdf < 0, and the coverage [H, W, 1] it was painted with."""
    a = _coverage(sdf)
    return img * (1 - a) + np.asarray(colour, np.float32) * a, a


def _rotated(yy, xx, cy, cx, angle):
    """Coordinates relative to (cy, cx) in a frame rotated by `angle`."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy  # u (along), v (across)


def _box_sdf(u, v, hu, hv):
    qu, qv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _centre(rng, size, margin):
    return rng.uniform(margin, 1 - margin) * size, rng.uniform(margin, 1 - margin) * size


@dataclass
class Scene:
    """What one picture shows, as drawn: the object's visible coverage, its colour(s), how big it is within its
    class's range, and the background. dpar_scale.data.synthetic_captions turns it into words."""

    mask: np.ndarray  # float32 [H, W]: the object's visible coverage in [0, 1]
    colours: list[np.ndarray]  # the object's RGB colour(s) in [0, 1]; the first is its main one
    colour_kind: str  # flat (one colour) | two-colour (stripes, checker) | textured (one hue, varying value)
    size: float  # in [0, 1]: where the object's size parameter lies in the range its class draws it from
    background: dict  # kind: flat | graded; colours: its RGB colour(s)
    extra: dict = field(default_factory=dict)  # sky_sun: the sky and ground colours


def _mean_colour(pattern: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Coverage-weighted mean RGB of `pattern` [H, W, 3] under `coverage` [H, W, 1]."""
    return (pattern * coverage).sum((0, 1)) / max(float(coverage.sum()), 1e-6)


def _fraction(value: float, lo: float, hi: float) -> float:
    return float((value - lo) / (hi - lo))


# ----------------------------------------------------------------------------------------------------------
# one renderer per class: (rng, size) -> (float32 [size, size, 3], Scene). The random draws are those of
# generator v1 in the same order, so the pictures are unchanged; the Scene only records what was drawn.


def _flat(img, a, fg, bg, size) -> tuple[np.ndarray, Scene]:
    return img, Scene(a[..., 0], [fg], "flat", size, bg)


def _disc(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.3)
    rf = rng.uniform(0.12, 0.28)
    img, a = _paint(img, np.hypot(yy - cy, xx - cx) - rf * d.object_scale * s, fg)
    return _flat(img, a, fg, bg, _fraction(rf, 0.12, 0.28))


def _square(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.32)
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi / 2))
    hf = rng.uniform(0.1, 0.22)
    h = hf * d.object_scale * s
    img, a = _paint(img, _box_sdf(u, v, h, h), fg)
    return _flat(img, a, fg, bg, _fraction(hf, 0.1, 0.22))


def _ring(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.35)
    rf = rng.uniform(0.14, 0.3)
    t = rng.uniform(0.03, 0.08) * d.texture_scale * s
    img, a = _paint(img, np.abs(np.hypot(yy - cy, xx - cx) - rf * d.object_scale * s) - t / 2, fg)
    return _flat(img, a, fg, bg, _fraction(rf, 0.14, 0.3))


def _stripes(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.3)
    half = rng.uniform(0.15, 0.32, size=2)
    hu, hv = half * d.object_scale * s
    box = _box_sdf(xx - cx, yy - cy, hu, hv)
    period = rng.uniform(2.5, 5.0) * d.texture_scale * s / 64
    u, _ = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
    phase = (u / period) % 1.0
    alt = vivid(rng, d, hue_of(fg) + 0.5) * rng.uniform(0.2, 1.0)
    pattern = np.where(phase[..., None] < 0.5, fg, alt)
    a = _coverage(box)
    size = _fraction(float(half.mean()), 0.15, 0.32)
    return img * (1 - a) + pattern * a, Scene(a[..., 0], [fg, alt], "two-colour", size, bg)


def _checker(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.3)
    hf = rng.uniform(0.14, 0.28)
    h = hf * d.object_scale * s
    cell = float(rng.integers(2, 5)) * d.texture_scale * s / 64
    alt = vivid(rng, d, hue_of(fg) + rng.uniform(0.3, 0.7))
    parity = (np.floor((xx - cx) / cell) + np.floor((yy - cy) / cell)) % 2
    pattern = np.where(parity[..., None] < 0.5, fg, alt)
    a = _coverage(_box_sdf(xx - cx, yy - cy, h, h))
    return img * (1 - a) + pattern * a, Scene(a[..., 0], [fg, alt], "two-colour", _fraction(hf, 0.14, 0.28), bg)


def _polygon_sdf(yy, xx, cy, cx, radius, n, angle):
    """Approximate SDF of a regular n-gon: max of the signed distances to its edge lines."""
    d = np.full(yy.shape, -np.inf, np.float32)
    apothem = radius * np.cos(np.pi / n)
    for k in range(n):
        th = angle + 2 * np.pi * (k + 0.5) / n
        d = np.maximum(d, np.cos(th) * (xx - cx) + np.sin(th) * (yy - cy) - apothem)
    return d


def _triangle(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.33)
    rf = rng.uniform(0.16, 0.3)
    img, a = _paint(img, _polygon_sdf(yy, xx, cy, cx, rf * d.object_scale * s, 3, rng.uniform(0, 2 * np.pi)), fg)
    return _flat(img, a, fg, bg, _fraction(rf, 0.16, 0.3))


def _cross(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.33)
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi / 2))
    af = rng.uniform(0.15, 0.28)
    arm, half = af * d.object_scale * s, rng.uniform(0.04, 0.08) * d.object_scale * s
    img, a = _paint(img, np.minimum(_box_sdf(u, v, arm, half), _box_sdf(u, v, half, arm)), fg)
    return _flat(img, a, fg, bg, _fraction(af, 0.15, 0.28))


def _texture(rng, s, cell_px, pixel_noise):
    """Value noise at `cell_px` resolution (nearest upsampled) plus a `pixel_noise` share of per-pixel noise."""
    n = max(1, int(np.ceil(s / cell_px)))
    coarse = rng.random((n, n), dtype=np.float32)
    rep = int(np.ceil(s / n))
    up = np.repeat(np.repeat(coarse, rep, 0), rep, 1)[:s, :s]
    return (1 - pixel_noise) * up + pixel_noise * rng.random((s, s), dtype=np.float32)


def _blob(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.35)
    rf = rng.uniform(0.15, 0.26)
    r0 = rf * d.object_scale * s
    th = np.arctan2(yy - cy, xx - cx)
    r = r0 * (1 + 0.2 * np.sin(rng.integers(2, 5) * th + rng.uniform(0, 6.3))
              + 0.1 * np.sin(rng.integers(5, 8) * th + rng.uniform(0, 6.3)))
    tex = _texture(rng, s, 2 * d.texture_scale * s / 64, d.pixel_noise)
    pattern = fg * (0.45 + 0.9 * tex[..., None])
    a = _coverage(np.hypot(yy - cy, xx - cx) - r)
    img = np.clip(img * (1 - a) + pattern * a, 0, 1)
    # its colour is the mean of what is shown (bright texels clip, which shifts the hue a little from fg's)
    return img, Scene(a[..., 0], [_mean_colour(np.clip(pattern, 0, 1), a)], "textured", _fraction(rf, 0.15, 0.26), bg)


def _sky_sun(rng, s, d: Detail):
    yy, xx = _grid(s)
    top = np.array(colorsys.hsv_to_rgb(rng.uniform(0.55, 0.68), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)),
                   np.float32)
    low = np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 0.15), rng.uniform(0.1, 0.5), rng.uniform(0.8, 1.0)),
                   np.float32)
    horizon = rng.uniform(0.6, 0.8) * s
    t = np.clip(yy / horizon, 0, 1)[..., None]
    img = top * (1 - t) + low * t
    sun = np.array(colorsys.hsv_to_rgb(rng.uniform(0.08, 0.16), rng.uniform(0.6, 1.0), 1.0), np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * s, rng.uniform(0.15, 0.45) * horizon / 0.7
    rf = rng.uniform(0.06, 0.12)
    img, a_sun = _paint(img, np.hypot(yy - cy, xx - cx) - rf * d.object_scale * s, sun)
    ground = np.array(colorsys.hsv_to_rgb(rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.7)),
                      np.float32)
    tex = _texture(rng, s, 1.5 * d.texture_scale * s / 64, d.pixel_noise)
    edge = horizon + 1.5 * np.sin(xx / s * 2 * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6.3))
    a = _coverage(edge - yy)
    textured_ground = np.clip(ground * (0.5 + 0.8 * tex[..., None]), 0, 1)
    img = np.clip(img * (1 - a) + ground * (0.5 + 0.8 * tex[..., None]) * a, 0, 1)
    # the object is the sun (as far as the ground leaves it visible); the sky is the graded background
    scene = Scene((a_sun * (1 - a))[..., 0], [sun], "flat", _fraction(rf, 0.06, 0.12),
                  {"kind": "graded", "colours": [top, low]},
                  {"sky": top, "ground": _mean_colour(textured_ground, a)})
    return img, scene


def _dots(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.3)
    half = rng.uniform(0.18, 0.35, size=2)
    hu, hv = half * d.object_scale * s
    spacing = rng.uniform(4.0, 7.0) * d.texture_scale * s / 64
    # below ~48 px the dot spacing leaves no room above a 1-pixel radius: the dots are then 1 pixel in radius
    radius = rng.uniform(max(1.0, d.dot_radius_min * spacing), max(1.0, 0.35 * spacing))
    gy = (yy - cy) - spacing * np.round((yy - cy) / spacing)
    gx = (xx - cx) - spacing * np.round((xx - cx) / spacing)
    sdf = np.maximum(np.hypot(gy, gx) - radius, _box_sdf(xx - cx, yy - cy, hu, hv))
    img, a = _paint(img, sdf, fg)
    return _flat(img, a, fg, bg, _fraction(float(half.mean()), 0.18, 0.35))


def _star(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    cy, cx = _centre(rng, s, 0.33)
    rf = rng.uniform(0.17, 0.3)
    r_out = rf * d.object_scale * s
    r_in = r_out * rng.uniform(0.38, 0.5)
    th = np.arctan2(yy - cy, xx - cx) - rng.uniform(0, 2 * np.pi)
    frac = np.abs(((th / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 0 at an inner notch, 1 at a tip
    r = r_in + (r_out - r_in) * frac
    img, a = _paint(img, (np.hypot(yy - cy, xx - cx) - r) * 0.8, fg)
    return _flat(img, a, fg, bg, _fraction(rf, 0.17, 0.3))


def _waves(rng, s, d: Detail):
    fg = vivid(rng, d)
    img, bg = _background(rng, s, hue_of(fg), d)
    yy, xx = _grid(s)
    y0, y1 = sorted(rng.uniform(0.1, 0.9, size=2) * s)
    if y1 - y0 < 0.3 * s:
        y1 = min(s, y0 + 0.3 * s)
    spacing = rng.uniform(4.0, 8.0) * d.texture_scale * s / 64
    amp, wl = rng.uniform(1.0, 4.0) * s / 64, rng.uniform(0.2, 0.6) * s
    w = yy - amp * np.sin(2 * np.pi * xx / wl + rng.uniform(0, 6.3))
    line = np.abs(w - spacing * np.round(w / spacing)) - rng.uniform(0.6, 1.2) * d.texture_scale * s / 64
    band = np.maximum(y0 - yy, yy - y1)
    img, a = _paint(img, np.maximum(line, band), fg)
    # the band is 0.3 to 0.8 of the height (it spans the whole width)
    return _flat(img, a, fg, bg, min(1.0, max(0.0, _fraction((y1 - y0) / s, 0.3, 0.8))))


_RENDERERS: dict[str, Callable[[np.random.Generator, int, Detail], tuple[np.ndarray, Scene]]] = {
    "disc": _disc, "square": _square, "ring": _ring, "stripes": _stripes, "checker": _checker,
    "triangle": _triangle, "cross": _cross, "blob": _blob, "sky_sun": _sky_sun, "dots": _dots,
    "star": _star, "waves": _waves,
}
assert list(_RENDERERS) == CLASS_NAMES


# ----------------------------------------------------------------------------------------------------------
# one picture: the public API


def _check_image_args(class_index: int, image_size: int) -> None:
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")


def render_scene(class_index: int, index: int, image_size: int = 64, seed: int = 0,
                 detail: str = "fine") -> tuple[np.ndarray, Scene]:
    """Image `index` of class `class_index` as uint8 [image_size, image_size, 3] and the Scene it shows; a pure
    function of its arguments. `detail`: a key of DETAILS."""
    _check_image_args(class_index, image_size)
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    rng = np.random.default_rng([seed, class_index, index])
    img, scene = _RENDERERS[CLASS_NAMES[class_index]](rng, image_size, DETAILS[detail])
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), scene


def render_image(class_index: int, index: int, image_size: int = 64, seed: int = 0,
                 detail: str = "fine") -> np.ndarray:
    """Image `index` of class `class_index` as uint8 [image_size, image_size, 3]; a pure function."""
    return render_scene(class_index, index, image_size, seed, detail)[0]
