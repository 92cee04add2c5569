"""Shared fixtures: small code datasets written in the real shard format (no images, no tokenizer)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dpar_scale.data import shards as S
from dpar_scale.data import side_arrays as SA

# Two CPU threads on a 2-core runner sometimes make the first large matmul ~100x slower (thread start-up
# contention), and on a loaded machine OpenMP threads that wait for each other make every step ~10x slower
# (measured on a loaded 2-core machine: 10 steps of the demo's entropy model, 17 s with one thread, 80 s with two).
# Tests check correctness, not speed: this process and every process it starts (tools, torchrun workers) use one thread.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _verified_files_cache(tmp_path_factory):
    """The per-user cache of verified data files (dpar_scale.integrity) lives in a temporary folder during tests,
    for every process they start, instead of ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DPAR_CACHE_DIR", str(tmp_path_factory.mktemp("dpar_cache")))
    yield
    patch.undo()


def write_code_dataset(folder, *, n_images=64, grid=(4, 4), vocab=32, num_classes=3, seed=0, shard_size=24,
                       entropy=True):
    """Codes with some structure (runs of repeated codes), labels, and optionally an entropy side array."""
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    labels = rng.integers(0, num_classes, size=n_images)
    codes = np.empty((n_images, n), dtype=np.int64)
    for i in range(n_images):
        row = rng.integers(0, vocab, size=n)
        flat = rng.random(n) < 0.5  # half the positions repeat the previous code: low-information runs
        for k in range(1, n):
            if flat[k]:
                row[k] = row[k - 1]
        row[0] = labels[i]  # the first code tells the class apart
        codes[i] = row
    folder.mkdir(parents=True, exist_ok=True)
    shard_records = []
    for index, start in enumerate(range(0, n_images, shard_size)):
        stop = min(start + shard_size, n_images)
        shard_records.append(S.write_code_shard(str(folder), index, codes[start:stop], labels[start:stop]))
    manifest = {
        "format": S.FORMAT, "format_version": S.FORMAT_VERSION, "num_images": n_images,
        "num_source_images": n_images, "grid": list(grid), "vocab_size": vocab,
        "tokenizer": {"name": "synthetic", "path": "", "sha256": ""}, "image_size": grid[0] * 4,
        "augmentation": {"ten_crop": False, "flip": False, "copies_per_image": 1},
        "num_classes": num_classes, "classes": [f"c{i}" for i in range(num_classes)], "shards": shard_records,
        "skipped": [],
    }
    S.write_manifest(str(folder), manifest)
    if entropy:
        shards = S.CodeShards(str(folder))
        ent = (rng.random((n_images, n)) * np.log(vocab)).astype(np.float16)
        for rec in shard_records:
            start = rec["index"] * shard_size
            SA.write_side_shard(str(folder / "entropy"), rec["index"], ent[start:start + rec["count"]])
        SA.write_side_manifest(str(folder / "entropy"), shards, extra={"grid": list(grid)})
    return folder


@pytest.fixture
def code_dataset(tmp_path):
    return write_code_dataset(tmp_path / "codes")


_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def text_caption(label: int, image: int, k: int) -> str:
    """A caption that names the class (so a text model can learn it) in a few templates; image 5 has a long one."""
    colour = _COLOURS[(image + k) % len(_COLOURS)]
    if image == 5:
        return " ".join([f"a very long caption about a {colour} thing of class {label}"] * 4)
    return (f"a {colour} thing of class {label}", f"class {label} in {colour}", f"{colour} {label}")[(image + k) % 3]


def add_text_captions(folder, *, captions_per_image: int = 2, uncaptioned=(3,), vocab_size: int = 36):
    """Caption shards beside the codes written by `write_code_dataset` (every image has captions_per_image
    captions naming its class, except `uncaptioned`), and a sentencepiece model trained on them at
    folder/text.model. Returns the model's path."""
    from dpar_scale.data.caption_shards import CAPTIONS_SUBDIR, write_caption_manifest, write_caption_shard
    from dpar_scale.data.captions import MatchedCaptions
    from dpar_scale.text import train_text_tokenizer

    codes = S.CodeShards(str(folder))
    labels = np.concatenate([np.load(os.path.join(str(folder), s["files"]["labels"])) for s in codes.shards])
    by_image = {i: [text_caption(int(labels[i]), i, k) for k in range(captions_per_image)]
                for i in range(len(codes)) if i not in uncaptioned}
    out = os.path.join(str(folder), CAPTIONS_SUBDIR)
    start = 0
    for s in codes.shards:
        write_caption_shard(out, s["index"], np.arange(start, start + s["count"]), by_image,
                            meta={"made_from": {"test": True}})
        start += s["count"]
    write_caption_manifest(out, codes, MatchedCaptions(by_image=by_image, num_lines=sum(map(len, by_image.values()))),
                           {}, [f"img{i}.png" for i in range(len(codes))])
    tok = train_text_tokenizer([c for v in by_image.values() for c in v], vocab_size)
    path = os.path.join(str(folder), "text.model")
    tok.save(path)
    return path
