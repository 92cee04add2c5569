"""What is checked when code data is opened, before anything reads a batch: every shard file's size (at open, from
its .npy header), its sha256 against the manifest (`verify="full"`; `"size"` skips the hash), and its values —
codes in [0, vocab), labels in [0, num_classes) (the null class num_classes too where the model has one),
entropies finite and in [0, ln vocab] up to float16 rounding, caption shards consistent (each row's caption range
inside its shard, offsets rising from 0 to the byte count, the bytes UTF-8 with every caption starting on a
character). Values are read chunk by chunk from the memory
maps with vectorised min/max (no Python loop over rows), so a bad row anywhere fails at open, not when a step
first draws it.

The work is split over the ranks that open the data together (`share`, an integrity.WorkShare) and remembered in
a per-user cache (dpar_scale.integrity.VerifiedCache), so an unchanged file is checked once. An error names the
file, the first bad row and value, and the command that rebuilds only that shard.
"""
from __future__ import annotations

import math
import os
import shlex

import numpy as np

from dpar_scale.data.caption_shards import CaptionShards, caption_shard_files
from dpar_scale.data.shards import CODES_DTYPE, MANIFEST_NAME, CodeShards, RowArray, ShardError, _read_json, shard_stem
from dpar_scale.data.side_arrays import SideArray
from dpar_scale.integrity import FileCheck, VerifiedCache, WorkShare, check_files

__all__ = ["VERIFY_MODES", "check_code_shards", "check_side_array", "open_checked_side_array", "entropy_bounds",
           "check_entropy_values", "extract_command", "entropy_command", "check_caption_shards"]

VERIFY_MODES = ("full", "size")
CHUNK_BYTES = 32 << 20  # values are checked this many bytes of a shard at a time
FLOAT16_EPS = float(np.finfo(np.float16).eps)
SHOW_PROBLEMS = 3


def extract_command(shards: CodeShards) -> str:
    """The tools/extract_codes.py command that wrote `shards` (from its manifest), or a description of it."""
    m = shards.manifest
    tok, aug = m.get("tokenizer") or {}, m.get("augmentation") or {}
    if not (m.get("images_root") and tok.get("path")):
        return "tools/extract_codes.py with the arguments that wrote it"
    args = ["python", "tools/extract_codes.py", "--images", m["images_root"], "--out", shards.folder,
            "--tokenizer", tok.get("name", "?"), "--tokenizer-path", tok["path"], "--image-size",
            str(m["image_size"])]
    if aug.get("ten_crop"):
        args += ["--ten-crop", "--crop-range", str(aug.get("crop_range"))]
    elif aug.get("flip"):
        args.append("--flip")
    if m.get("shard_size"):
        args += ["--shard-size", str(m["shard_size"])]
    return shlex.join(args)


def entropy_command(side_dir: str, manifest: dict, codes_dir: str | None = None) -> str:
    """The tools/compute_entropy.py command that wrote the side array in `side_dir`."""
    args = ["python", "tools/compute_entropy.py", "--checkpoint", manifest.get("entropy_checkpoint") or "CHECKPOINT",
            "--codes", codes_dir or manifest.get("codes_dir") or "CODES", "--out", side_dir]
    return shlex.join(args)


def _rebuild(record: str, command: str) -> str:
    return f"to rebuild only this shard, delete {record} and re-run {command} (it rebuilds only shards whose " \
           f"record is missing or whose files do not match it)"


def _chunks(array: np.ndarray):
    """(first row, rows) of `array` in pieces of about CHUNK_BYTES."""
    per_row = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    step = max(1, CHUNK_BYTES // per_row)
    for lo in range(0, array.shape[0], step):
        yield lo, array[lo:lo + step]


def _where(path: str, row: int, first_row: int, position: int | None) -> str:
    at = f" at position {position}" if position is not None else ""
    return f"{path}: row {row} (row {first_row + row} of the data set){at} holds"


def _first_bad(bad: np.ndarray) -> tuple[int, int | None]:
    """(row, position) of the first True of a [rows] or [rows, T] mask."""
    idx = np.argwhere(bad)[0]
    return int(idx[0]), (int(idx[1]) if len(idx) > 1 else None)


def _code_check(vocab: int, first_row: int, fix: str):
    def check(path: str) -> str | None:
        array = np.load(path, mmap_mode="r")
        for lo, chunk in _chunks(array):
            if int(chunk.max(initial=0)) >= vocab:
                row, pos = _first_bad(chunk >= vocab)
                return (f"{_where(path, lo + row, first_row, pos)} code {int(chunk[row, pos])}, outside the "
                        f"vocabulary [0, {vocab}); {fix}")
        return None
    return check


def _label_check(limit: int, num_classes: int, first_row: int, fix: str):
    def check(path: str) -> str | None:
        array = np.load(path, mmap_mode="r")
        for lo, chunk in _chunks(array):
            if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) >= limit):
                row, _ = _first_bad((chunk < 0) | (chunk >= limit))
                allowed = f"[0, {num_classes})" + (f" or the null class {num_classes}" if limit > num_classes else "")
                return (f"{_where(path, lo + row, first_row, None)} label {int(chunk[row])}, outside the "
                        f"{num_classes} classes {allowed}; {fix}")
        return None
    return check


def entropy_bounds(vocab: int | None) -> tuple[float, float]:
    """[lo, hi] an entropy in nats may take: [0, ln vocab] widened by one float16 rounding step of ln vocab
    (float32 sums can land a hair outside, and float16 storage rounds by up to half a step); hi is inf without a
    vocabulary."""
    if not vocab:
        return -FLOAT16_EPS, math.inf
    top = math.log(vocab)
    return -FLOAT16_EPS * top, top * (1 + FLOAT16_EPS)


def _float16_bits_at_most(x: float) -> int:
    """Bit pattern of the largest float16 <= x (x >= 0)."""
    h = np.float16(min(x, float(np.finfo(np.float16).max)))
    if float(h) > x:
        h = np.nextafter(h, np.float16(0))
    return int(np.array(h).view(np.uint16))


def check_entropy_values(chunk: np.ndarray, vocab: int | None) -> tuple[int, int | None] | None:
    """(row, position) of the first entropy of `chunk` that is not finite or outside entropy_bounds, else None."""
    lo, hi = entropy_bounds(vocab)
    if chunk.dtype == np.float16:
        # Compare float16 bit patterns as integers: positive floats order like their bits, and inf / NaN have all
        # exponent bits set, so one integer max decides the usual all-good case.
        bits = chunk.view(np.uint16)
        hi_bits, lo_bits = _float16_bits_at_most(hi), _float16_bits_at_most(-lo)
        if bits.size == 0 or int(bits.max()) <= hi_bits:
            return None
        magnitude = bits & np.uint16(0x7FFF)
        bad = np.where(bits < 0x8000, bits > hi_bits, magnitude > lo_bits)
    else:
        values = np.asarray(chunk, dtype=np.float64)
        bad = ~np.isfinite(values) | (values < lo) | (values > hi)
    return _first_bad(bad) if bad.any() else None


def _entropy_check(vocab: int | None, first_row: int, fix: str):
    lo, hi = entropy_bounds(vocab)
    rule = f"in [0, ln {vocab} = {math.log(vocab):.4f}] nats" if vocab else "finite and >= 0"

    def check(path: str) -> str | None:
        array = np.load(path, mmap_mode="r")
        for start, chunk in _chunks(array):
            found = check_entropy_values(chunk, vocab)
            if found is not None:
                row, pos = found
                value = chunk[row] if pos is None else chunk[row, pos]
                return (f"{_where(path, start + row, first_row, pos)} entropy {float(value)}; entropies must be "
                        f"finite and {rule}; {fix}")
        return None
    return check, f"entropy[{lo:.6g},{hi:.6g}]"


def _raise(problems: list[str], folder: str, what: str) -> None:
    if problems:
        more = f" (and {len(problems) - SHOW_PROBLEMS} more)" if len(problems) > SHOW_PROBLEMS else ""
        raise ShardError(f"{len(problems)} bad {what} file(s) in {folder}{more}: " +
                         " | ".join(problems[:SHOW_PROBLEMS]))


def _run(checks: list[FileCheck], folder: str, share: WorkShare, what: str, progress: bool) -> None:
    cache = VerifiedCache(folder)
    pending = [c for c in share.mine(checks) if not cache.vouches(c)]
    total = sum(os.path.getsize(c.path) for c in pending)
    bar = None
    if progress and share.rank == 0 and total > (256 << 20):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {what} (rank 0's share)")
    try:
        problems = check_files(checks, share, cache, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    _raise(problems, folder, what)


def check_code_shards(shards: CodeShards, verify: str = "full", share: WorkShare = WorkShare(),
                      allow_null_label: bool = False, progress: bool = True) -> None:
    """Checksums (verify="full") and values of every codes / labels (/ source) file; ShardError naming the first
    problems. A collective when share.world > 1 (every rank of `share` calls it)."""
    if verify not in VERIFY_MODES:
        raise ShardError(f"data.verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    full = verify == "full"
    command = extract_command(shards)
    limit = shards.num_classes + (1 if allow_null_label else 0)
    checks = []
    for k, s in enumerate(shards.shards):
        first_row = shards.shard_range(k)[0]
        fix = _rebuild(os.path.join(shards.folder, f"{shard_stem(s['index'])}.json"), command)
        for key, fname in sorted(s["files"].items()):
            validate, tag = None, ""
            if key == "codes":
                validate, tag = _code_check(shards.vocab_size, first_row, fix), f"codes<{shards.vocab_size}"
            elif key == "labels":
                validate, tag = _label_check(limit, shards.num_classes, first_row, fix), f"labels<{limit}"
            elif not full:
                continue  # nothing but the checksum to check in this file
            checks.append(FileCheck(os.path.join(shards.folder, fname), s["sha256"][key] if full else None,
                                    validate, tag, what="shard file", fix=fix))
    _run(checks, shards.folder, share, "code shard", progress)


def check_side_array(side: RowArray, vocab: int | None, verify: str = "full", share: WorkShare = WorkShare(),
                     codes_dir: str | None = None, progress: bool = True) -> None:
    """Checksums and values (entropies: finite, in [0, ln vocab]) of every file of a side array (`SideArray`)."""
    if verify not in VERIFY_MODES:
        raise ShardError(f"data.verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    manifest = getattr(side, "manifest", {})
    name = manifest.get("name", "entropy")
    command = entropy_command(side.folder, manifest, codes_dir)
    checks = []
    for k, fname in enumerate(side.files):
        first_row = int(side.offsets[k])
        record = os.path.join(side.folder, fname[:-len(".npy")] + ".json")
        fix = _rebuild(record, command)
        validate, tag = _entropy_check(vocab, first_row, fix) if name == "entropy" else (None, "")
        sha = side.sha256[k] if verify == "full" and side.sha256 is not None else None
        checks.append(FileCheck(os.path.join(side.folder, fname), sha, validate, tag, what=f"{name} shard file",
                                fix=fix))
    _run(checks, side.folder, share, f"{name} shard", progress)


def open_checked_side_array(side_dir: str, verify: str = "full", share: WorkShare = WorkShare()) -> SideArray:
    """A side array opened on its own (calibration, FLOP counting), checked like CodeData.open checks it; the
    vocabulary bounding entropies comes from its manifest or its codes' manifest (None: finite and >= 0 only)."""
    side = SideArray(side_dir)
    vocab = side.manifest.get("vocab_size")
    if vocab is None and side.manifest.get("codes_dir"):
        vocab = (_read_json(os.path.join(side.manifest["codes_dir"], MANIFEST_NAME)) or {}).get("vocab_size")
    check_side_array(side, vocab, verify, share)
    return side


def _caption_rows_check(num_captions: int, fix: str):
    def check(path: str) -> str | None:
        rows = np.load(path, mmap_mode="r")
        for lo, chunk in _chunks(rows):
            bad = (chunk[:, 0] < 0) | (chunk[:, 1] < 0) | (chunk[:, 0] + chunk[:, 1] > num_captions)
            if bad.any():
                row = int(np.argmax(bad))
                return (f"{path}: row {lo + row} names captions {int(chunk[row, 0])} .. "
                        f"{int(chunk[row, 0] + chunk[row, 1]) - 1}, outside the shard's {num_captions}; {fix}")
        return None
    return check


def _caption_text_check(offsets_path: str, fix: str):
    def check(path: str) -> str | None:
        offsets, data = np.load(offsets_path, mmap_mode="r"), np.load(path, mmap_mode="r")
        steps = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != data.size or (steps.size and int(steps.min()) <= 0):
            return (f"{offsets_path}: caption offsets must rise strictly from 0 to {data.size} bytes (every stored "
                    f"caption non-empty); {fix}")
        starts = np.asarray(offsets[:-1])
        if starts.size and ((data[starts] & 0xC0) == 0x80).any():  # a caption starting inside a character
            c = int(np.argmax((data[starts] & 0xC0) == 0x80))
            return f"{path}: caption {c} starts in the middle of a UTF-8 character; {fix}"
        try:
            data.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            c = int(np.searchsorted(offsets, e.start, side="right")) - 1
            return f"{path}: caption {c} is not UTF-8 ({e.reason} at byte {e.start}); {fix}"
        return None
    return check


def check_caption_shards(captions: CaptionShards, verify: str = "full", share: WorkShare = WorkShare(),
                         command: str = "tools/extract_codes.py with --captions", progress: bool = True) -> None:
    """Checksums (verify="full") and consistency of every caption shard file; ShardError naming the first problems.
    A collective when share.world > 1. `command`: what rebuilds them (extract_command(codes) + --captions)."""
    if verify not in VERIFY_MODES:
        raise ShardError(f"data.verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    checks = []
    for s in captions.shards:
        fix = _rebuild(os.path.join(captions.folder, caption_shard_files(s["index"])["record"]), command)
        offsets = os.path.join(captions.folder, s["files"]["offsets"])
        validators = {"rows": (_caption_rows_check(s["num_captions"], fix), "caption-rows"),
                      "bytes": (_caption_text_check(offsets, fix), "caption-text"), "offsets": (None, "")}
        for key, (validate, tag) in validators.items():
            checks.append(FileCheck(os.path.join(captions.folder, s["files"][key]),
                                    s["sha256"][key] if verify == "full" else None, validate, tag,
                                    what="caption shard file", fix=fix))
    _run(checks, captions.folder, share, "caption shard", progress)


def captions_command(shards: CodeShards, captions: CaptionShards) -> str:
    """The extraction command that wrote these captions."""
    return f"{extract_command(shards)} --captions {shlex.quote(captions.manifest.get('captions_file', 'FILE'))}"


assert CODES_DTYPE == np.uint16  # _code_check relies on unsigned codes (no value below 0)
