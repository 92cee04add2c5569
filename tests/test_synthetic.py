"""The embedded dataset: deterministic, class-dependent, and with flat next to detailed regions."""

import hashlib
import importlib.util
import itertools
import json
import os

import numpy as np
import pytest

from dpar_scale.data.images import list_image_folder
from dpar_scale.data.synthetic import CLASS_NAMES, class_folder_name, generate_dataset, render_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _block_var(img, b=4):
    """Per b x b block variance (mean over channels) of a uint8 image, in [0, 1] units."""
    x = img.astype(np.float32) / 255
    h, w, _ = x.shape
    blocks = x.reshape(h // b, b, w // b, b, 3).transpose(0, 2, 1, 3, 4).reshape(-1, b * b, 3)
    return blocks.var(1).mean(1)


def _features(img):
    x = img.astype(np.float32) / 255
    v = _block_var(img)
    g = x.mean(2)
    gy, gx = np.gradient(g)
    w, th = np.hypot(gx, gy), np.arctan2(gy, gx)
    # Rotation-invariant edge-orientation symmetry (k-fold): separates discs, triangles, squares, stars.
    sym = [np.abs((w * np.exp(1j * k * th)).sum()) / (w.sum() + 1e-9) for k in (2, 3, 4, 5)]
    return np.array([(v < 1e-3).mean(), (v > 1e-2).mean(), (v > 3e-2).mean(), np.abs(gx).mean(),
                     np.abs(gy).mean(), x.std(), *sym])


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_dataset(str(a), num_per_class=4, num_classes=3, image_size=64, seed=0, progress=False)
    generate_dataset(str(b), num_per_class=4, num_classes=3, image_size=64, seed=0, progress=False)
    da, db = _tree_digest(a), _tree_digest(b)
    assert len(da) == 3 * 4 + 3 and da == db  # images, classes.json, captions.jsonl, attributes.jsonl


def test_layout_and_classes_json(tmp_path):
    info = generate_dataset(str(tmp_path), num_per_class=3, num_classes=10, image_size=64, seed=0, progress=False)
    folders = [class_folder_name(c) for c in range(10)]
    assert info["classes"] == folders and folders[3] == "03_stripes" and info["names"] == CLASS_NAMES[:10]
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == folders
    # ImageFolder labels (sorted folders) follow the generator's class order
    assert list_image_folder(str(tmp_path))[0] == folders
    for name in folders:
        assert sorted(os.listdir(tmp_path / name)) == ["00000.png", "00001.png", "00002.png"]


def test_different_seeds_and_indices_differ():
    for c in range(len(CLASS_NAMES)):
        a = render_image(c, 0, 64, seed=0)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert not np.array_equal(a, render_image(c, 0, 64, seed=1))
        assert not np.array_equal(a, render_image(c, 1, 64, seed=0))
        assert np.array_equal(a, render_image(c, 0, 64, seed=0))


def test_image_independent_of_dataset_size(tmp_path):
    generate_dataset(str(tmp_path / "small"), num_per_class=2, num_classes=2, seed=3, progress=False)
    generate_dataset(str(tmp_path / "big"), num_per_class=5, num_classes=2, seed=3, progress=False)
    small, big = _tree_digest(tmp_path / "small"), _tree_digest(tmp_path / "big")
    assert all(big[k] == v for k, v in small.items() if k.endswith(".png"))
    # captions and attributes too: seeded by (seed, class, index)
    for name in ("captions.jsonl", "attributes.jsonl"):
        lines = {json.dumps(json.loads(x)) for x in open(tmp_path / "big" / name)}
        assert all(json.dumps(json.loads(x)) in lines for x in open(tmp_path / "small" / name))
    generate_dataset(str(tmp_path / "other"), num_per_class=2, num_classes=2, seed=4, progress=False)
    assert (tmp_path / "other" / "captions.jsonl").read_text() != (tmp_path / "small" / "captions.jsonl").read_text()


def test_classes_differ_in_statistics():
    n = 16
    feats = np.array([[_features(render_image(c, i)) for i in range(n)] for c in range(len(CLASS_NAMES))])
    mean, se = feats.mean(1), feats.std(1, ddof=1) / np.sqrt(n)
    for a, b in itertools.combinations(range(len(CLASS_NAMES)), 2):
        z = np.abs(mean[a] - mean[b]) / np.sqrt(se[a] ** 2 + se[b] ** 2 + 1e-12)
        assert z.max() > 2.0, (CLASS_NAMES[a], CLASS_NAMES[b], z)
    # fine-texture classes carry clearly more detailed blocks than plain flat shapes
    detailed = dict(zip(CLASS_NAMES, mean[:, 1]))
    for textured in ("stripes", "checker", "dots", "waves"):
        for plain in ("disc", "square", "triangle"):
            assert detailed[textured] > 2 * detailed[plain], (textured, plain)


def test_flat_and_detailed_regions_in_every_image():
    for c in range(len(CLASS_NAMES)):
        for i in range(6):
            v = _block_var(render_image(c, i))
            assert (v < 1e-3).mean() > 0.3, (CLASS_NAMES[c], i)  # many (near) flat blocks
            assert (v > 1e-2).mean() > 0.02, (CLASS_NAMES[c], i)  # and some detailed ones
    # across the dataset the block variance spans orders of magnitude (what entropy patching needs)
    allv = np.concatenate([_block_var(render_image(c, i)) for c in range(10) for i in range(4)])
    assert np.quantile(allv, 0.5) < 1e-4 and np.quantile(allv, 0.95) > 1e-2


def test_make_dataset_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_dataset", os.path.join(ROOT, "tools", "make_dataset.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--num-per-class", "2", "--classes", "3", "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["00_disc", "01_square", "02_ring", "attributes.jsonl", "captions.jsonl",
                                           "classes.json"]
    assert mod.main(["--out", str(tmp_path), "--classes", "99", "--quiet"]) == 2  # a user error: one line, exit 2


def test_bad_arguments():
    with pytest.raises(ValueError, match=rf"class_index must be in \[0, {len(CLASS_NAMES)}\), got {len(CLASS_NAMES)}"):
        render_image(len(CLASS_NAMES), 0)
    with pytest.raises(ValueError, match=rf"--classes must be in \[1, {len(CLASS_NAMES)}\], got 0"):
        generate_dataset("/nonexistent-never-written", 1, num_classes=0, progress=False)


# ---------------------------------------------------------------------------------------------------------
# captions and attributes of the embedded dataset


def test_colour_and_position_words():
    from dpar_scale.data.synthetic_captions import colour_name, position_name

    cases = {(1, 0, 0): "red", (1, 0.55, 0): "orange", (0.9, 0.9, 0.1): "yellow", (0, 0.8, 0): "green",
             (0, 0.8, 0.8): "cyan", (0.1, 0.1, 0.9): "blue", (0.6, 0.1, 0.9): "purple", (0.9, 0.1, 0.6): "pink",
             (0.5, 0.5, 0.5): "grey", (0.95, 0.95, 0.95): "white", (0.05, 0.05, 0.05): "black",
             (0.25, 0.05, 0.05): "dark red", (1, 0.8, 0.8): "pale red", (0.3, 0.3, 0.32): "dark grey"}
    assert {rgb: colour_name(rgb) for rgb in cases} == cases
    assert [position_name(0.2, 0.8), position_name(0.5, 0.5), position_name(0.9, 0.45)] == \
        ["upper right", "centre", "bottom"]


def _vivid_mask(img, shape):
    """Pixels of the object, found from the picture alone: objects are vivid (saturation >= 0.55, value >= 0.6),
    backgrounds muted (saturation <= 0.45); the sun is the only orange-yellow full-value region of sky_sun."""
    import colorsys

    x = img.reshape(-1, 3).astype(np.float64) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in x]).reshape(img.shape)
    vivid = (hsv[..., 1] >= 0.5) & (hsv[..., 2] >= 0.55)
    if shape == "sky_sun":
        vivid &= (hsv[..., 0] > 0.05) & (hsv[..., 0] < 0.18) & (hsv[..., 2] >= 0.97)
    return vivid


def test_captions_and_attributes_say_what_the_pictures_show(tmp_path):
    from PIL import Image

    from dpar_scale.data.synthetic_captions import _NOUNS, _SIZE_WORDS, colour_name, position_name

    per_class, size = 5, 64
    generate_dataset(str(tmp_path), per_class, len(CLASS_NAMES), size, seed=0, progress=False)
    attributes = [json.loads(line) for line in open(tmp_path / "attributes.jsonl")]
    captions = {}
    for line in open(tmp_path / "captions.jsonl"):
        item = json.loads(line)
        captions.setdefault(item["path"], []).append(item["caption"])
    assert len(attributes) == len(captions) == per_class * len(CLASS_NAMES)
    for a in attributes:
        img = np.asarray(Image.open(tmp_path / a["path"]).convert("RGB"))
        assert a["shape"] == CLASS_NAMES[a["class"]] and a["path"].startswith(class_folder_name(a["class"]))
        # every caption words the attributes: colour, size, shape and position
        colour = a["colour"] if len(set(a["colours"])) == 1 else " and ".join(a["colours"])
        for text in captions[a["path"]]:
            low = text.lower()
            assert colour in low and any(w in low for w in _SIZE_WORDS[a["size"]]), text
            assert any(n in low for n in _NOUNS[a["shape"]]) and a["position"].split()[-1] in low, text
        assert len(set(captions[a["path"]])) == 3
        # the pixels agree: the object's measured colour has the stated name, its centroid the stated place
        mask = _vivid_mask(img, a["shape"])
        assert mask.sum() >= 8, a["path"]
        measured = np.median(img[mask], axis=0) / 255
        if a["colour_kind"] == "two-colour":  # the stated main colour covers a good part of the object
            names = [colour_name(p / 255) for p in img[mask]]
            assert names.count(a["colour"]) > 0.2 * len(names), (a["path"], a["colours"])
        else:
            assert colour_name(measured) == a["colour"], (a["path"], measured, a["colour"])
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.mean() + 0.5) / size, (xs.mean() + 0.5) / size
        # the measured centroid is where the attributes say (anti-aliased thin lines and dots move it ~0.015) and
        # lies in the stated ninth of the picture, up to that much
        assert abs(cy - a["centroid"][0]) < 0.025 and abs(cx - a["centroid"][1]) < 0.025, (a["path"], cy, cx)
        near = {position_name(cy + dy, cx + dx) for dy in (-0.02, 0, 0.02) for dx in (-0.02, 0, 0.02)}
        assert a["position"] in near, (a["path"], cy, cx, a["position"])
    # the words are spread out: sizes and positions all occur, colours are many
    assert {a["size"] for a in attributes} == {"small", "medium", "large"}
    assert len({a["position"] for a in attributes}) >= 8 and len({a["colour"] for a in attributes}) >= 6


def test_coarse_detail_keeps_what_is_drawn_and_moves_texture_above_the_code_scale(tmp_path):
    """detail="coarse" draws the same random numbers (same attributes: shape, colour, size, position words) with
    larger objects and coarser textures: the share of a texture class's pixel-to-pixel contrast that lives inside
    8x8 blocks (what an 8x8-pixel code cannot keep) drops, and the object covers more of the picture."""
    from dpar_scale.data.synthetic_captions import scene_attributes
    from dpar_scale.data.synthetic_scenes import render_scene

    def fine_energy(img):  # mean |neighbour difference| within the picture, i.e. sub-block detail
        x = img.astype(np.float32) / 255
        return np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=0)).mean()

    for name in ("stripes", "checker", "dots", "blob"):
        c = CLASS_NAMES.index(name)
        fine_e, coarse_e = [], []
        for i in range(8):
            fine, fs = render_scene(c, i, 64, 0, "fine")
            coarse, cs = render_scene(c, i, 64, 0, "coarse")
            fa, ca = scene_attributes(c, fs), scene_attributes(c, cs)
            assert fa["shape"] == ca["shape"] and fa["colour"] == ca["colour"] and fa["size"] == ca["size"]
            assert cs.mask.sum() > fs.mask.sum()  # the object is drawn larger
            fine_e.append(fine_energy(fine) / max(fs.mask.mean(), 1e-6))
            coarse_e.append(fine_energy(coarse) / max(cs.mask.mean(), 1e-6))
        assert np.mean(coarse_e) < 0.7 * np.mean(fine_e), (name, np.mean(coarse_e), np.mean(fine_e))
    info = generate_dataset(str(tmp_path / "c"), num_per_class=1, num_classes=2, seed=0, progress=False,
                            detail="coarse")
    assert info["detail"] == "coarse"
    with pytest.raises(ValueError, match="detail"):
        generate_dataset(str(tmp_path / "x"), num_per_class=1, num_classes=2, progress=False, detail="medium")


def test_a_palette_keeps_each_picture_and_draws_its_colours_from_eight(tmp_path, monkeypatch):
    """detail="coarse-palette" draws the same random numbers as the same sizes without a palette: every object
    covers the same pixels, and its colour is one of 8 (8 hues at one saturation and value, each its own colour
    name) instead of one of a continuum."""
    import dataclasses

    from dpar_scale.data import synthetic_scenes
    from dpar_scale.data.synthetic_captions import COLOUR_NAMES, colour_name
    from dpar_scale.data.synthetic_scenes import render_scene

    unsnapped = dataclasses.replace(synthetic_scenes.DETAILS["coarse-palette"], palette=())
    monkeypatch.setitem(synthetic_scenes.DETAILS, "unsnapped", unsnapped)

    on_palette, continuous = set(), set()
    for name in ("disc", "square", "ring", "triangle", "cross", "checker"):
        c = CLASS_NAMES.index(name)
        for i in range(10):
            _, cs = render_scene(c, i, 64, 0, "unsnapped")
            _, ps = render_scene(c, i, 64, 0, "coarse-palette")
            np.testing.assert_array_equal(ps.mask, cs.mask)
            on_palette.add(tuple(np.round(ps.colours[0], 5)))
            continuous.add(tuple(np.round(cs.colours[0], 5)))
    assert len(continuous) == 60 and 4 <= len(on_palette) <= 8
    assert {colour_name(np.array(rgb)) for rgb in on_palette} <= set(COLOUR_NAMES)  # no "pale" or "dark" ones
    assert len({colour_name(np.array(rgb)) for rgb in on_palette}) == len(on_palette)
    assert generate_dataset(str(tmp_path / "p"), num_per_class=1, num_classes=2, seed=0, progress=False,
                            detail="coarse-palette")["detail"] == "coarse-palette"
