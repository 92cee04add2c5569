"""Extraction of VQ codes from an ImageFolder into code shards (what tools/extract_codes.py runs on each rank).

Sharding: shard k holds images [k*S, (k+1)*S) of the sorted listing (S = shard size), whatever the number of
processes; the tool gives rank r shards r, r+W, r+2W, ... Everything that determines the codes (tokenizer and its
sha256, image size, augmentation, shard size, the image listing) is the folder's *identity*: a resumed run must
match it, finished shards whose record and checksums match are kept, others rebuilt. The manifest is written
last. Unreadable images are reported, skipped and listed in the manifest.

With a caption file (--captions) every code shard gets a caption shard beside it (dpar_scale.data.caption_shards),
built from the code shard's source rows, so captions follow the same sharding and resume: a caption shard is kept
when it was made from the same code shard and the same caption file, else rebuilt (cheaply: no image is read).
The captions are not part of the codes' identity: adding or changing captions never re-encodes an image.

`args` below is the tool's parsed arguments (images, out, tokenizer, tokenizer_path, image_size, ten_crop, flip,
crop_range, shard_size, batch_size, num_workers, quiet, captions, allow_unmatched_captions). The tokenizer is passed in (any object with `name`,
`vocab_size`, `downsample`, `encode`), so this room does not import dpar_scale.tokenizer.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch

from dpar_scale.data.caption_shards import (
    CAPTIONS_SUBDIR, caption_shard_complete, write_caption_manifest, write_caption_shard,
)
from dpar_scale.data.captions import MatchedCaptions
from dpar_scale.data.images import ImageViews, view_names
from dpar_scale.data.shards import (
    FORMAT, FORMAT_VERSION, MANIFEST_NAME, codes_fingerprint, read_shard_record, shard_stem, to_codes_dtype,
    write_code_shard, write_json_atomic, write_manifest,
)
from dpar_scale.errors import DparError

CONFIG_NAME = "extract_config.json"


class ExtractError(DparError, RuntimeError):
    """A user-facing problem with the images, the tokenizer or the output folder; printed as one line."""


def _listing_sha256(root: str, samples: list[tuple[str, int]]) -> str:
    # Relative paths, so the images folder may move between an interrupted run and its resumption.
    h = hashlib.sha256()
    root = os.path.abspath(root)
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()


def extraction_identity(args, tok, classes, samples, tok_sha: str) -> dict:
    """Everything that determines the codes; a resumed run must match it exactly."""
    views = view_names(args.ten_crop, args.flip)
    grid = args.image_size // tok.downsample
    return {
        "tokenizer": {"name": args.tokenizer, "sha256": tok_sha, "vocab_size": int(tok.vocab_size),
                      "downsample": int(tok.downsample)},
        "image_size": args.image_size,
        "grid": [grid, grid],
        "augmentation": {"ten_crop": bool(args.ten_crop), "flip": bool(args.flip or args.ten_crop),
                         "crop_range": args.crop_range if args.ten_crop else None,
                         "copies_per_image": len(views), "views": views},
        "shard_size": args.shard_size,
        "num_listed_images": len(samples),
        "image_list_sha256": _listing_sha256(args.images, samples),
        "classes": classes,
    }


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            show = (lambda v: v if not isinstance(v, list) or len(v) < 8 else f"[{len(v)} items]")
            out.append(f"{prefix}{k}: existing {show(a)!r} vs requested {show(b)!r}")
    return out


def prepare_out_dir(out: str, identity: dict) -> str | None:
    """Rank 0: refuse to resume into a folder made with other settings; record the identity. Error or None."""
    os.makedirs(out, exist_ok=True)
    for fname in (CONFIG_NAME, MANIFEST_NAME):
        path = os.path.join(out, fname)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            return f"cannot read {path} ({e}); remove it or use a fresh --out"
        old = old.get("identity", old) if fname == MANIFEST_NAME else old
        diffs = _diff({k: old.get(k) for k in identity}, identity)
        if diffs:
            return (f"{out} already holds codes made with different settings ({path}):\n  " + "\n  ".join(diffs)
                    + "\nuse a fresh --out folder (or delete this one) to extract with the new settings")
    write_json_atomic(os.path.join(out, CONFIG_NAME), identity)
    # The folder is being (re)built: until the new manifest lands, readers must see it as incomplete.
    if os.path.exists(os.path.join(out, MANIFEST_NAME)):
        os.remove(os.path.join(out, MANIFEST_NAME))
    return None


def _collate(items):
    return items


def encode_views(tok, views: torch.Tensor, batch_size: int, device: str, grid: list[int]) -> np.ndarray:
    outs = []
    for chunk in views.split(batch_size):
        with torch.inference_mode():
            codes = tok.encode(chunk.to(device))
        if tuple(codes.shape[1:]) != tuple(grid):
            raise ExtractError(f"tokenizer {tok.name} returned codes of shape {tuple(codes.shape[1:])} for "
                               f"{chunk.shape[-1]}px images, expected grid {tuple(grid)}")
        outs.append(to_codes_dtype(codes.reshape(codes.shape[0], -1).cpu().numpy()))  # uint16: 4x less RAM
    return np.concatenate(outs)


def build_shards(args, tok, samples, todo, identity, cfg_sha, device, rank, world_size=1) -> None:
    """Encode and write the shards in `todo` (ascending), one shard in memory at a time."""
    from tqdm import tqdm

    S, N, V = args.shard_size, len(samples), identity["augmentation"]["copies_per_image"]
    imgs_per_batch = max(1, args.batch_size // V)
    batches = []
    for k in todo:
        for lo in range(k * S, min(N, (k + 1) * S), imgs_per_batch):
            batches.append(list(range(lo, min(N, (k + 1) * S, lo + imgs_per_batch))))
    ds = ImageViews(samples, args.image_size, args.ten_crop, args.flip, args.crop_range)
    workers = args.num_workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) // world_size - 1))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc=f"extract (rank {rank}, {len(todo)} shards)",
               disable=args.quiet or rank != 0)
    state: dict | None = None

    def flush(st):
        k = st["k"]
        codes = np.concatenate(st["codes"]) if st["codes"] else np.zeros((0, math.prod(identity["grid"])), np.uint16)
        labels = np.asarray(st["labels"], np.int64)
        source = np.asarray(st["source"], np.int64).reshape(-1, 2)
        lo, hi = k * S, min(N, (k + 1) * S)
        write_code_shard(args.out, k, codes, labels, source, meta={
            "config_sha256": cfg_sha, "image_range": [lo, hi], "num_images": st["ok"], "skipped": st["skipped"]})

    for batch in loader:
        k = batch[0]["index"] // S
        if state is None or state["k"] != k:
            if state is not None:
                flush(state)
            for stale in glob.glob(os.path.join(args.out, f"{shard_stem(k)}.*.tmp.*")):
                os.remove(stale)  # leftovers of an interrupted writer
            state = {"k": k, "codes": [], "labels": [], "source": [], "skipped": [], "ok": 0}
        good = [it for it in batch if it["error"] is None]
        for it in batch:
            if it["error"] is not None:
                bar.write(f"warning: skipping unreadable image {it['path']}: {it['error']}", file=sys.stderr)
                state["skipped"].append({"path": it["path"], "reason": it["error"]})
        if good:
            views = torch.cat([it["views"] for it in good])
            state["codes"].append(encode_views(tok, views, args.batch_size, device, identity["grid"]))
            for it in good:
                state["labels"] += [it["label"]] * V
                state["source"] += [(it["index"], v) for v in range(V)]
            state["ok"] += len(good)
        bar.update(len(batch))
    if state is not None:
        flush(state)
    bar.close()


def write_codes_manifest(args, identity: dict, num_shards: int, cfg_sha: str) -> None:
    shards, skipped, missing = [], [], []
    for k in range(num_shards):
        rec = read_shard_record(args.out, k)
        if rec is None or rec.get("config_sha256") != cfg_sha:
            missing.append(shard_stem(k))
            continue
        shards.append({k2: rec[k2] for k2 in ("index", "files", "count", "num_images", "image_range", "sha256")})
        skipped += rec["skipped"]
    if missing:
        raise ExtractError(f"{len(missing)} shard(s) were not completed ({missing[:5]}...); did a rank fail? "
                           f"re-run the same command to finish")
    rows = sum(s["count"] for s in shards)
    tok = identity["tokenizer"]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "num_images": rows,
        "num_source_images": sum(s["num_images"] for s in shards),
        "num_listed_images": identity["num_listed_images"],
        "grid": identity["grid"], "seq_len": math.prod(identity["grid"]),
        "vocab_size": tok["vocab_size"], "codes_dtype": "uint16",
        "tokenizer": {"name": tok["name"], "path": os.path.abspath(args.tokenizer_path), "sha256": tok["sha256"],
                      "downsample": tok["downsample"]},
        "image_size": identity["image_size"],
        "augmentation": identity["augmentation"],
        "row_order": "image-major: the copies_per_image views of one image are consecutive rows",
        "num_classes": len(identity["classes"]), "classes": identity["classes"],
        "images_root": os.path.abspath(args.images),
        "shard_size": identity["shard_size"],
        "shards": shards,
        "skipped": skipped,
        "codes_fingerprint": codes_fingerprint(shards),
        "identity": identity,
    }
    write_manifest(args.out, manifest)


def build_caption_shards(args, matched: MatchedCaptions, captions_sha: str, shards: list[int]) -> tuple[int, int]:
    """Caption shards for the (finished) code shards `shards`: (built, reused)."""
    captions_dir = os.path.join(args.out, CAPTIONS_SUBDIR)
    built = reused = 0
    for k in shards:
        rec = read_shard_record(args.out, k)
        if rec is None or "source" not in rec.get("files", {}):
            raise ExtractError(f"code shard {shard_stem(k)} in {args.out} is not complete; re-run the same command")
        made_from = {"code_config_sha256": rec["config_sha256"], "source_sha256": rec["sha256"]["source"],
                     "captions_sha256": captions_sha}
        if caption_shard_complete(captions_dir, k, made_from):
            reused += 1
            continue
        source = np.load(os.path.join(args.out, rec["files"]["source"]))
        write_caption_shard(captions_dir, k, source[:, 0], matched.by_image, meta={"made_from": made_from})
        built += 1
    return built, reused


def write_captions_manifest(args, matched: MatchedCaptions, captions_sha: str, samples) -> dict:
    """Rank 0, after the code manifest: the caption manifest (totals, uncaptioned images, left-out lines)."""
    from dpar_scale.data.shards import CodeShards

    root = os.path.abspath(args.images)
    names = [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in samples]
    extra = {"captions_file": os.path.abspath(args.captions), "captions_sha256": captions_sha, "images_root": root,
             "paths": "relative to images_root ('/' between folders) or absolute"}
    return write_caption_manifest(os.path.join(args.out, CAPTIONS_SUBDIR), CodeShards(args.out), matched, extra,
                                  names)


def print_caption_summary(m: dict, built: int, reused: int) -> None:
    print(f"captions: {m['num_captioned_images']} of {m['num_images']} encoded images captioned ({m['num_captions']} "
          f"captions, at most {m['max_captions_per_image']} per image), {m['num_uncaptioned_images']} uncaptioned "
          f"({m['uncaptioned_policy']}), {m['num_empty_captions']} empty caption lines, "
          f"{m['num_unmatched_captions']} lines matching no image, {m['num_captions_of_skipped_images']} captions of "
          f"skipped images; {len(m['shards'])} caption shards ({built} built, {reused} reused)")
    for path in m["uncaptioned"][:5]:
        print(f"  uncaptioned: {path}")
    if m["num_uncaptioned_images"] > 5:
        print(f"  ... and {m['num_uncaptioned_images'] - 5} more (see captions/manifest.json 'uncaptioned')")


def print_summary(args, identity, built, reused, seconds) -> None:
    with open(os.path.join(args.out, MANIFEST_NAME)) as f:
        m = json.load(f)
    g = m["grid"]
    print(f"extract_codes: {m['num_listed_images']} images listed, {m['num_source_images']} encoded, "
          f"{len(m['skipped'])} skipped -> {m['num_images']} code rows ({m['augmentation']['copies_per_image']} "
          f"views/image), grid {g[0]}x{g[1]}, vocab {m['vocab_size']}, {len(m['shards'])} shards "
          f"({built} built, {reused} reused) in {seconds:.1f}s -> {os.path.abspath(args.out)}")
    for s in m["skipped"][:20]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if len(m["skipped"]) > 20:
        print(f"  ... and {len(m['skipped']) - 20} more (see manifest.json 'skipped')")
