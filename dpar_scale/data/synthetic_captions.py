"""Captions and structured attributes of the embedded dataset, from what each picture shows.

Each picture's `Scene` (dpar_scale.data.synthetic: the object's visible coverage, colour(s), size within its
class's range, background) becomes
- attributes: shape (the class), colour (the object's main colour word), colours (every colour word of the
  object: two for stripes and checker, whose `colour` is the first of them), size (small / medium / large: the
  tercile of the class's size range), position (one of nine, from the centroid of the visible object), the
  background (flat / graded and its colour word) and the measured numbers behind the words (RGB, centroid, area);
- captions: several wordings of those attributes from varied templates ("a small red disc on a graded blue
  background, upper left"), chosen by an RNG seeded with (seed, class, index) — a stream separate from the
  picture's, so the pictures do not change and the captions are as deterministic as they are.

Colour words: the hue picks one of eight names (red orange yellow green cyan blue purple pink); colours with
little chroma (max - min of RGB below ACHROMATIC_CHROMA) are white, grey, dark grey or black by value; dark ones
(value below DARK_VALUE) get "dark", light unsaturated ones "pale". Object colours are vivid (saturation >= 0.55, value >= 0.6), so an object
colour is always one of the eight hue names; backgrounds are muted and often grey.

Class notes: sky_sun's object is the sun (its colour, size and position), the graded sky its background, and its
ground colour is in `extra`; blob is one hue with a texture of varying brightness (colour_kind "textured");
waves span the whole width, so their position is top / centre / bottom of the band.
"""
from __future__ import annotations

import colorsys
import json
import os

import numpy as np

from dpar_scale.data.synthetic import CLASS_NAMES, Scene

__all__ = ["COLOUR_NAMES", "POSITION_NAMES", "SIZE_NAMES", "colour_name", "position_name", "size_name",
           "scene_attributes", "scene_captions", "CAPTION_STREAM"]

COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
# upper hue bound (degrees) of each name, in order; red also takes the hues above pink's bound
_HUE_BOUNDS = (15, 40, 70, 165, 195, 255, 290, 345)
ACHROMATIC_CHROMA = 0.12
DARK_VALUE = 0.3
PALE_SATURATION = 0.35
SIZE_NAMES = ("small", "medium", "large")
# rows top to bottom, columns left to right
POSITION_NAMES = (("upper left", "top", "upper right"), ("left", "centre", "right"),
                  ("lower left", "bottom", "lower right"))
# a centroid further than this (fraction of the image side) from the centre is off-centre along that axis; the
# classes place their object's centre within 0.15 to 0.2 of the middle, so each third gets about a third
POSITION_OFFSET = 0.06
CAPTION_STREAM = 7  # the caption RNG is seeded with (seed, class, index, CAPTION_STREAM)


def colour_name(rgb) -> str:
    """The colour word of an RGB colour in [0, 1] (see the module docstring)."""
    r, g, b = (float(c) for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if max(r, g, b) - min(r, g, b) < ACHROMATIC_CHROMA:
        return "white" if v >= 0.8 else "grey" if v >= 0.4 else "dark grey" if v >= 0.18 else "black"
    degrees = h * 360
    name = next((n for n, top in zip(COLOUR_NAMES, _HUE_BOUNDS) if degrees < top), "red")
    if v < DARK_VALUE:
        return f"dark {name}"
    return f"pale {name}" if s < PALE_SATURATION and v >= 0.7 else name


def position_name(centroid_y: float, centroid_x: float) -> str:
    """One of POSITION_NAMES for a centroid given as fractions of the image height and width."""
    def third(t: float) -> int:
        return 0 if t < 0.5 - POSITION_OFFSET else 2 if t > 0.5 + POSITION_OFFSET else 1
    return POSITION_NAMES[third(centroid_y)][third(centroid_x)]


def size_name(size: float) -> str:
    return SIZE_NAMES[min(2, int(size * 3))]


def _rgb255(rgb) -> list[int]:
    return [int(round(float(c) * 255)) for c in rgb]


def scene_attributes(class_index: int, scene: Scene) -> dict:
    """The structured attributes of one picture (see the module docstring); JSON-ready."""
    h, w = scene.mask.shape
    total = float(scene.mask.sum())
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cy = float((scene.mask * yy).sum() / total / h) if total else 0.5
    cx = float((scene.mask * xx).sum() / total / w) if total else 0.5
    bg_mean = np.mean(scene.background["colours"], axis=0)
    out = {
        "class": class_index, "shape": CLASS_NAMES[class_index],
        "colour": colour_name(scene.colours[0]), "colours": [colour_name(c) for c in scene.colours],
        "colour_kind": scene.colour_kind, "rgb": [_rgb255(c) for c in scene.colours],
        "size": size_name(scene.size), "size_fraction": round(scene.size, 4),
        "position": position_name(cy, cx), "centroid": [round(cy, 4), round(cx, 4)],
        "area_fraction": round(total / (h * w), 4),
        "background": {"kind": scene.background["kind"], "colour": colour_name(bg_mean), "rgb": _rgb255(bg_mean)},
    }
    for key, rgb in scene.extra.items():
        out[key] = {"colour": colour_name(rgb), "rgb": _rgb255(rgb)}
    return out


# ----------------------------------------------------------------------------------------------------------
# wording

_NOUNS = {
    "disc": ("disc", "circle"), "square": ("square",), "ring": ("ring", "hoop"),
    "stripes": ("striped rectangle", "patch of stripes"), "checker": ("checkerboard square", "chequered square"),
    "triangle": ("triangle",), "cross": ("cross", "plus sign"), "blob": ("textured blob", "speckled blob"),
    "sky_sun": ("sun",), "dots": ("grid of dots", "dotted rectangle"), "star": ("star", "five-pointed star"),
    "waves": ("band of wavy lines", "set of wavy lines"),
}
_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
_PLACES = {"upper left": "in the upper left", "top": "at the top", "upper right": "in the upper right",
           "left": "on the left", "centre": "in the centre", "right": "on the right",
           "lower left": "in the lower left", "bottom": "at the bottom", "lower right": "in the lower right"}
_FLAT_BG = ("flat {c}", "plain {c}", "solid {c}")
_GRADED_BG = ("graded {c}", "{c} gradient", "shaded {c}")
_TEMPLATES = (
    "{a} {size} {colour} {noun} on {a_bg} {bg} background, {pos}",
    "{size} {colour} {noun} {place}, {bg} background",
    "{a_bg} {bg} background with {a} {size} {colour} {noun} {place}",
    "{a_colour} {colour} {noun}, {size}, {place} on {a_bg} {bg} background",
    "a picture of {a} {size} {colour} {noun} {place}",
    "{pos}: {a} {size} {colour} {noun} over {a_bg} {bg} backdrop",
)
_SKY_TEMPLATES = (
    "{a} {size} {colour} sun in {a_sky} {sky} sky above {ground} ground, {pos}",
    "{sky} sky with {a} {size} {colour} sun {place} over {ground} land",
    "a landscape: {a} {size} {colour} sun {place}, {sky} sky, {ground} ground",
    "{a} {size} {colour} sun {place} of {a_sky} {sky} sky, {ground} ground below",
)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def scene_captions(attributes: dict, count: int, rng: np.random.Generator) -> list[str]:
    """`count` captions of one picture (distinct templates while there are enough) worded from its attributes."""
    sky = attributes["shape"] == "sky_sun"
    templates = _SKY_TEMPLATES if sky else _TEMPLATES
    order = rng.permutation(len(templates))
    colours = attributes["colours"]
    colour = colours[0] if len(set(colours)) == 1 else " and ".join(colours)
    out = []
    for k in range(count):
        template = templates[order[k % len(templates)]]
        size = str(rng.choice(_SIZE_WORDS[attributes["size"]]))
        noun = str(rng.choice(_NOUNS[attributes["shape"]]))
        bg_word = attributes["background"]["colour"]
        bg = str(rng.choice(_GRADED_BG if attributes["background"]["kind"] == "graded" else _FLAT_BG)).format(c=bg_word)
        fields = {"size": size, "colour": colour, "noun": noun, "bg": bg, "pos": attributes["position"],
                  "place": _PLACES[attributes["position"]], "a": _article(size), "a_colour": _article(colour),
                  "a_bg": _article(bg)}
        if sky:
            fields.update(sky=attributes["sky"]["colour"], ground=attributes["ground"]["colour"],
                          a_sky=_article(attributes["sky"]["colour"]))
        text = template.format(**fields)
        out.append(text[0].upper() + text[1:] if k % 2 else text)  # some start with a capital, as people write
    return out


def write_caption_files(out_dir: str, records: list[tuple[str, dict, list[str]]]) -> dict:
    """Write `captions.jsonl` (one {"path", "caption"} line per caption, paths relative to `out_dir`) and
    `attributes.jsonl` (one {"path", **attributes} line per image) from (relative path, attributes, captions)."""
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        for path, _, captions in records:
            for caption in captions:
                f.write(json.dumps({"path": path, "caption": caption}) + "\n")
    with open(os.path.join(out_dir, "attributes.jsonl"), "w") as f:
        for path, attributes, _ in records:
            f.write(json.dumps({"path": path, **attributes}) + "\n")
    return {"captions": "captions.jsonl", "attributes": "attributes.jsonl",
            "captions_per_image": max((len(c) for _, _, c in records), default=0)}
