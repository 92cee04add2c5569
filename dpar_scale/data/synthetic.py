"""Embedded class-conditional image dataset: small RGB pictures of simple objects and scenes, written as an
ImageFolder tree with classes.json, captions and attributes (`generate_dataset`).

Why it exists: every pipeline stage (tokenizer fit, code extraction, entropy model, DPAR training, sampling)
needs real images to run end to end without downloading anything. The classes are chosen so that
information content varies *inside* an image: flat or smoothly graded backgrounds (codes an entropy model
predicts easily) next to edges and fine texture (codes it cannot), which is exactly what entropy-based
patching needs to find.

The pictures themselves (class list, drawing, one renderer per class, `render_scene` / `render_image`, `Scene`)
are dpar_scale.data.synthetic_scenes, re-exported here. Each is a pure function of (seed, class, index), so the
dataset does not depend on how many images per class are generated or in which order, and two runs write
identical bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from dpar_scale.data.synthetic_scenes import (
    CLASS_DESCRIPTIONS, CLASS_NAMES, DETAILS, GENERATOR_VERSION, Scene, render_image, render_scene,
)

__all__ = ["CLASS_NAMES", "CLASS_DESCRIPTIONS", "Scene", "render_scene", "render_image", "class_folder_name", "generate_dataset"]


def class_folder_name(class_index: int) -> str:
    """ImageFolder directory of a class, e.g. "03_stripes"; sorts in class-index order."""
    return f"{class_index:02d}_{CLASS_NAMES[class_index]}"


def generate_dataset(out_dir: str, num_per_class: int, num_classes: int = 10, image_size: int = 64,
                     seed: int = 0, progress: bool = True, captions_per_image: int = 3,
                     detail: str = "fine") -> dict:
    """Write an ImageFolder tree `out_dir/<NN_class>/<index:05d>.png` plus `out_dir/classes.json`, and beside it
    `captions.jsonl` (`captions_per_image` captions per picture; 0 = none) and `attributes.jsonl` (what each
    picture shows: dpar_scale.data.synthetic_captions), paths relative to `out_dir`.

    Folder and file names are zero-padded so that sorted (ImageFolder) order equals class and index order.
    Returns the contents of classes.json ("classes": folder names in label order, "names": short names).
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"--classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    if num_per_class < 1:
        raise ValueError(f"--num-per-class must be >= 1, got {num_per_class}")
    if detail not in DETAILS:
        raise ValueError(f"--detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    if captions_per_image < 0:
        raise ValueError(f"--captions-per-image must be >= 0, got {captions_per_image}")
    from tqdm import tqdm

    from dpar_scale.data.synthetic_captions import CAPTION_STREAM, scene_attributes, scene_captions, write_caption_files

    names = CLASS_NAMES[:num_classes]
    # Folder names carry the class index so that ImageFolder's sorted order (which defines the labels at
    # extraction time) equals the generator's class order: label k <-> CLASS_NAMES[k].
    folders = [class_folder_name(c) for c in range(num_classes)]
    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(num_per_class - 1)))
    bar = tqdm(total=num_classes * num_per_class, desc="images", unit="img", disable=not progress)
    records = []
    for c, folder in enumerate(folders):
        cdir = os.path.join(out_dir, folder)
        os.makedirs(cdir, exist_ok=True)
        for i in range(num_per_class):
            arr, scene = render_scene(c, i, image_size, seed, detail)
            name = f"{i:0{width}d}.png"
            Image.fromarray(arr, "RGB").save(os.path.join(cdir, name), format="PNG")
            attributes = scene_attributes(c, scene)
            captions = scene_captions(attributes, captions_per_image,
                                      np.random.default_rng([seed, c, i, CAPTION_STREAM]))
            records.append((f"{folder}/{name}", attributes, captions))
            bar.update(1)
    bar.close()
    info = {
        "classes": folders,
        "names": names,
        "descriptions": {n: CLASS_DESCRIPTIONS[n] for n in names},
        "num_per_class": num_per_class,
        "image_size": image_size,
        "seed": seed,
        "detail": detail,
        "generator": f"dpar_scale.data.synthetic v{GENERATOR_VERSION}",
        **write_caption_files(out_dir, records),
    }
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info
