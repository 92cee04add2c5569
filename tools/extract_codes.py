#!/usr/bin/env python
"""Encode an ImageFolder into sharded VQ codes (LlamaGen's extract_codes_c2i, made resumable and sharded).

    python tools/extract_codes.py --images DIR --out DIR --tokenizer {llamagen-vq16,kmeans} \
        --tokenizer-path PATH --image-size N [--ten-crop] [--flip] [--shard-size 1024] [--batch-size 64] \
        [--device cpu] [--num-workers K] [--crop-range 1.1] [--captions captions.jsonl [--allow-unmatched-captions]]
    torchrun --nproc_per_node 8 tools/extract_codes.py ... --device cuda

Views per image (see dpar_scale/data/images.py for the facts): plain 1; --flip 2 (image, mirror: LlamaGen's
default); --ten-crop 10 (LlamaGen's --ten-crop: torchvision TenCrop of a crop_range-enlarged centre crop,
mirrors included, so --flip adds nothing there).

Sharding: shard k holds images [k*S, (k+1)*S) of the sorted listing (S = --shard-size), whatever the number
of processes; rank r builds shards r, r+W, r+2W, ... So a run can be resumed with any world size: finished
shards (record present, checksums verified) are kept, missing or corrupt ones rebuilt. The manifest is written
by rank 0 after a barrier, last. Unreadable images are reported, skipped and listed in the manifest.

Captions (--captions FILE, JSON lines {"path": ..., "caption": ...}; paths relative to --images or absolute;
several lines per image for several captions): written as text to OUT/captions/ with the same sharding, per code
row (every view of an image shares its captions). Images without a caption keep their codes and train on the empty
caption; they are counted and listed in captions/manifest.json, as are empty captions. A line naming no image is
an error unless --allow-unmatched-captions. Adding captions to a finished folder re-uses every code shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dpar_scale.cli import UsageError, entry_point, existing_dir, non_negative_int, parser, positive_int  # noqa: E402
from dpar_scale.tokenizer import TOKENIZER_NAMES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--images", required=True, type=existing_dir, help="ImageFolder root: DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--tokenizer", required=True, choices=TOKENIZER_NAMES)
    p.add_argument("--tokenizer-path", required=True, help="local tokenizer file (never downloaded)")
    p.add_argument("--image-size", type=positive_int, required=True)
    p.add_argument("--ten-crop", action="store_true", help="LlamaGen ten-crop: 10 views per image")
    p.add_argument("--flip", action="store_true", help="add the horizontal mirror (2 views; implied by ten-crop)")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop enlargement (LlamaGen: 1.1)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="source images per shard")
    p.add_argument("--batch-size", type=positive_int, default=64, help="views per tokenizer call")
    p.add_argument("--device", default="cpu", help="cpu, cuda (= cuda:LOCAL_RANK under torchrun), cuda:N")
    p.add_argument("--num-workers", type=non_negative_int, default=None,
                   help="image decoding processes per rank (default: min(8, cpus/ranks - 1))")
    p.add_argument("--captions", default="", help="caption file (JSON lines) to store beside the codes")
    p.add_argument("--allow-unmatched-captions", action="store_true",
                   help="count and list caption lines naming no listed image instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _read_captions(args, samples):
    """(matched captions, caption file sha256) on every rank, or (None, "") without --captions; every rank reads
    the file and they agree on any error before anything is encoded."""
    from dpar_scale.data.captions import CaptionFileError, match_captions, read_caption_file
    from dpar_scale.data.shards import sha256_file
    from dpar_scale.parallel import process_group as D

    if not args.captions:
        if args.allow_unmatched_captions:
            raise UsageError("--allow-unmatched-captions applies to a caption file: give --captions FILE too")
        return None, ""
    result, err = (None, ""), None
    try:
        lines = read_caption_file(args.captions)
        result = (match_captions(lines, args.images, [p for p, _ in samples], args.allow_unmatched_captions),
                  sha256_file(args.captions))
    except CaptionFileError as e:
        err = e
    first = next((e for e in D.all_gather_object(None if err is None else str(err)) if e), None)
    if first is not None:
        raise err if err is not None else CaptionFileError(first)
    return result


def run(args) -> int:
    from dpar_scale.data.caption_shards import CAPTIONS_SUBDIR
    from dpar_scale.data.extraction import (
        ExtractError, build_caption_shards, build_shards, extraction_identity, prepare_out_dir,
        print_caption_summary, print_summary, write_captions_manifest, write_codes_manifest,
    )
    from dpar_scale.data.images import list_image_folder
    from dpar_scale.data.shards import check_shard_files, read_shard_record, sha256_file, shard_stem
    from dpar_scale.parallel import process_group as D
    from dpar_scale.tokenizer import load_tokenizer

    t0 = time.time()
    # only barriers/objects cross ranks: gloo works anywhere; ranks wait for the slowest at barriers
    env = D.init_process_group(backend="gloo", timeout_s=2 * 3600)
    rank, world = env.rank, env.world_size
    try:
        if args.crop_range < 1.0:
            raise ExtractError(f"--crop-range must be >= 1 (ten-crop enlarges before cropping), got {args.crop_range}")
        try:
            classes, samples = list_image_folder(args.images)
        except FileNotFoundError as e:
            raise ExtractError(str(e)) from None
        if not samples:
            raise ExtractError(f"no images found under {args.images!r} (extensions: .jpg .jpeg .png .ppm .bmp "
                               f".pgm .tif .tiff .webp, in class sub-folders)")
        matched, captions_sha = _read_captions(args, samples)
        device = args.device
        if device == "cuda" and world > 1:
            device = f"cuda:{D.get_local_rank()}"
        try:
            tok = load_tokenizer(args.tokenizer, args.tokenizer_path, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise ExtractError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - e.g. a corrupt file: say which and why, no traceback
            raise ExtractError(f"cannot load the {args.tokenizer} tokenizer from {args.tokenizer_path!r}: "
                               f"{type(e).__name__}: {e}") from None
        if args.image_size % tok.downsample:
            raise ExtractError(f"--image-size {args.image_size} is not divisible by the {args.tokenizer} "
                               f"tokenizer's downsampling factor {tok.downsample}")
        if tok.vocab_size > 65536:
            raise ExtractError(f"vocab_size {tok.vocab_size} does not fit the uint16 code shards")

        # Rank 0 hashes the tokenizer and checks the folder; everyone gets the verdict (and exits together).
        verdict = None
        if rank == 0:
            identity = extraction_identity(args, tok, classes, samples, sha256_file(args.tokenizer_path))
            verdict = (prepare_out_dir(args.out, identity), identity)
        err, identity = D.broadcast_object(verdict)
        if err:
            raise ExtractError(err)
        captions_manifest = os.path.join(args.out, CAPTIONS_SUBDIR, "manifest.json")
        if rank == 0 and matched is not None and os.path.exists(captions_manifest):
            os.remove(captions_manifest)  # rebuilt below; until then readers see the captions as incomplete
        cfg_sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

        S, N = args.shard_size, len(samples)
        num_shards = math.ceil(N / S)
        todo, reused = [], 0
        for k in range(rank, num_shards, world):
            rec = read_shard_record(args.out, k)
            problem = "not built yet" if rec is None else (
                "made with other settings" if rec.get("config_sha256") != cfg_sha
                else check_shard_files(args.out, rec, verify_sha=True))
            if problem is None:
                reused += 1
            else:
                if rec is not None:
                    print(f"rank {rank}: rebuilding {shard_stem(k)}: {problem.split('; ')[0]}", file=sys.stderr)
                todo.append(k)
        build_shards(args, tok, samples, todo, identity, cfg_sha, device, rank, world)
        caption_counts = (0, 0)
        if matched is not None:
            caption_counts = build_caption_shards(args, matched, captions_sha, list(range(rank, num_shards, world)))

        counts = D.all_gather_object((len(todo), reused, *caption_counts))
        D.barrier()
        if rank == 0:
            write_codes_manifest(args, identity, num_shards, cfg_sha)
            built = sum(c[0] for c in counts)
            print_summary(args, identity, built, sum(c[1] for c in counts), time.time() - t0)
            if matched is not None:
                manifest = write_captions_manifest(args, matched, captions_sha, samples)
                print_caption_summary(manifest, sum(c[2] for c in counts), sum(c[3] for c in counts))
        D.barrier()
        return 0
    finally:
        D.destroy_process_group()


@entry_point
def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
