"""Code shards: the format of a code folder, writing shards and their records, checking and fingerprinting them,
the manifest, and `CodeShards`, the read-only view training opens.

Layout of a code folder (written by tools/extract_codes.py):
    manifest.json                    written last; its presence means the folder is complete
    shard_00000.codes.npy            uint16 [n, H*W] codes, rows image-major: row = image_slot * V + view
    shard_00000.labels.npy           int64 [n] class labels
    shard_00000.source.npy           int64 [n, 2] (index of the image in the sorted listing, view index)
    shard_00000.json                 the shard's record (counts, sha256 of each file); written after its files
Every file is written under a temporary name and renamed, so a crash never leaves a file that looks complete,
and a shard counts as done only once its record exists and its files match the recorded checksums.

The file-level pieces every kind of shard uses (atomic writes, .npy checks, `RowArray`, `ShardError`) are
dpar_scale.data.shard_files, re-exported here. Per-row side arrays (entropies) with the same sharding live in
dpar_scale.data.side_arrays.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from dpar_scale.data.shard_files import (
    _REBUILD_HINT, RowArray, ShardError, _read_json, check_npy, read_npy_header, save_npy_atomic,
    write_json_atomic,
)
from dpar_scale.integrity import sha256_file

__all__ = [
    "CODES_DTYPE", "MANIFEST_NAME", "ShardError", "sha256_file", "save_npy_atomic", "write_json_atomic",
    "shard_stem", "code_shard_files", "write_code_shard", "read_shard_record", "check_shard_files",
    "codes_fingerprint", "side_fingerprint", "write_manifest", "load_code_manifest", "CodeShards", "RowArray",
    "read_npy_header", "check_npy",
]

CODES_DTYPE = np.uint16
MANIFEST_NAME = "manifest.json"
FORMAT = "dpar-code-shards"
SIDE_FORMAT = "dpar-side-shards"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# code shards: writing


def shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


def code_shard_files(index: int) -> dict[str, str]:
    s = shard_stem(index)
    return {"codes": f"{s}.codes.npy", "labels": f"{s}.labels.npy", "source": f"{s}.source.npy",
            "record": f"{s}.json"}


def to_codes_dtype(codes: np.ndarray) -> np.ndarray:
    """Validate integer codes and store them as uint16 (vocabularies up to 65536 entries)."""
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) > np.iinfo(CODES_DTYPE).max):
        raise ValueError(f"codes outside [0, 65535] cannot be stored as uint16 (min {codes.min()}, "
                         f"max {codes.max()}); vocabularies above 65536 entries are not supported")
    return codes.astype(CODES_DTYPE, copy=False)


def write_code_shard(out_dir: str, index: int, codes: np.ndarray, labels: np.ndarray,
                     source: np.ndarray | None = None, meta: dict | None = None) -> dict:
    """Write one shard (codes [n, T], labels [n], optional source [n, 2]) and then its record.

    The old record is removed first, so an interrupted rewrite leaves the shard visibly incomplete.
    Returns the record (also stored as shard_XXXXX.json).
    """
    files = code_shard_files(index)
    codes = to_codes_dtype(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, T], got shape {codes.shape}")
    n = codes.shape[0]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} rows, codes has {n}")
    record_path = os.path.join(out_dir, files["record"])
    if os.path.exists(record_path):
        os.remove(record_path)
    sha = {"codes": save_npy_atomic(os.path.join(out_dir, files["codes"]), codes),
           "labels": save_npy_atomic(os.path.join(out_dir, files["labels"]), labels)}
    out_files = {"codes": files["codes"], "labels": files["labels"]}
    if source is not None:
        source = np.asarray(source, dtype=np.int64).reshape(n, 2)
        sha["source"] = save_npy_atomic(os.path.join(out_dir, files["source"]), source)
        out_files["source"] = files["source"]
    record = {**(meta or {}), "index": index, "count": n, "seq_len": codes.shape[1], "files": out_files,
              "sha256": sha}
    write_json_atomic(record_path, record)
    return record


def read_shard_record(out_dir: str, index: int) -> dict | None:
    """The shard's record, or None if it was never completed (or the record is unreadable)."""
    rec = _read_json(os.path.join(out_dir, code_shard_files(index)["record"]))
    return rec if isinstance(rec, dict) and rec.get("index") == index else None


def _expected_shapes(record: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    n, t = record["count"], record["seq_len"]
    return {"codes": ((n, t), CODES_DTYPE), "labels": ((n,), np.int64), "source": ((n, 2), np.int64)}


def check_shard_files(out_dir: str, record: dict, verify_sha: bool = True) -> str | None:
    """None if every file of the shard exists, has the recorded shape and (optionally) checksum; else why not."""
    shapes = _expected_shapes(record)
    for key, fname in record["files"].items():
        path = os.path.join(out_dir, fname)
        try:
            check_npy(path, *shapes[key])
        except ShardError as e:
            return str(e)
        if verify_sha and sha256_file(path) != record["sha256"][key]:
            return f"shard file {path} does not match its recorded sha256 (corrupt); {_REBUILD_HINT}"
    return None


def codes_fingerprint(shards: list[dict]) -> str:
    """One hash naming the exact code data (shard order, counts and checksums); side arrays record it."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s['index']}:{s['count']}:{s['sha256']['codes']}:{s['sha256']['labels']};".encode())
    return h.hexdigest()


def side_fingerprint(manifest: dict) -> str:
    """One hash naming a side array (entropies, captions): its code fingerprint and each shard's count and
    checksum(s) (a shard of several files records a {file kind: sha256} mapping)."""
    h = hashlib.sha256(f"{manifest.get('name')}:{manifest.get('codes_fingerprint')};".encode())
    for s in manifest.get("shards", []):
        sha = s["sha256"]
        sha = ",".join(f"{k}={v}" for k, v in sorted(sha.items())) if isinstance(sha, dict) else sha
        h.update(f"{s['index']}:{s['count']}:{sha};".encode())
    return h.hexdigest()


def write_manifest(out_dir: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)


# ----------------------------------------------------------------------------------------------------------
# reading


_REQUIRED = ("format", "format_version", "num_images", "num_source_images", "grid", "vocab_size", "tokenizer",
             "image_size", "augmentation", "num_classes", "classes", "shards", "skipped")


def _load_manifest(folder: str, fmt: str, what: str) -> dict:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise ShardError(f"{what} folder {folder!r} does not exist")
    if not os.path.isfile(path):
        raise ShardError(f"{path} is missing: the {what} in {folder!r} are incomplete (interrupted or still "
                         f"running); re-run the tool that writes them with the same arguments to finish")
    m = _read_json(path)
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise ShardError(f"{path} is not a valid {what} manifest (format {None if m is None else m.get('format')!r},"
                         f" expected {fmt!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path} has format_version {m.get('format_version')}, this code reads {FORMAT_VERSION}")
    return m


def load_code_manifest(folder: str) -> dict:
    """A code folder's manifest.json, checked for format, version and the fields every reader needs."""
    m = _load_manifest(os.path.abspath(folder), FORMAT, "code shards")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ShardError(f"{os.path.join(os.path.abspath(folder), MANIFEST_NAME)} lacks fields {missing}")
    return m


class CodeShards:
    """Read-only view of an extracted code folder: `len()` rows, `codes(i)`, `labels`, `source`, `verify()`.

    Rows are image-major: the V = `copies_per_image` augmented views of one image are consecutive, so image
    slot s owns rows [s*V, (s+1)*V) (skipped images own none).
    """

    def __init__(self, folder: str, max_open: int = 256):
        self.folder = os.path.abspath(folder)
        m = load_code_manifest(self.folder)
        self.manifest = m
        self.grid = tuple(int(g) for g in m["grid"])
        self.seq_len = self.grid[0] * self.grid[1]
        self.vocab_size = int(m["vocab_size"])
        self.num_classes = int(m["num_classes"])
        self.classes = list(m["classes"])
        self.image_size = int(m["image_size"])
        self.copies_per_image = int(m["augmentation"]["copies_per_image"])
        self.tokenizer = dict(m["tokenizer"])
        shards = m["shards"]
        if sum(s["count"] for s in shards) != m["num_images"]:
            raise ShardError(f"{self.folder}: shard counts sum to {sum(s['count'] for s in shards)} but the "
                             f"manifest says num_images={m['num_images']}")
        if [s["index"] for s in shards] != list(range(len(shards))):
            raise ShardError(f"{self.folder}: manifest shards are not numbered 0..{len(shards) - 1} in order")
        self.shards = shards
        self.fingerprint = codes_fingerprint(shards)

        def arr(key, row_shape, dtype):
            return RowArray(self.folder, [s["files"][key] for s in shards], [s["count"] for s in shards],
                            row_shape, dtype, [s["sha256"][key] for s in shards], max_open)

        self._codes = arr("codes", (self.seq_len,), CODES_DTYPE)
        self._labels = arr("labels", (), np.int64)
        self._source = arr("source", (2,), np.int64) if all("source" in s["files"] for s in shards) else None
        self._labels_cache: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def num_source_images(self) -> int:
        return int(self.manifest["num_source_images"])

    def codes(self, idx) -> np.ndarray:
        """uint16 codes: [T] for an int, [k, T] for a slice or an index array (rows may span shards)."""
        return self._codes[idx]

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64 [n] (read once and cached: 8 bytes per row)."""
        if self._labels_cache is None:
            self._labels_cache = self._labels.read_all()
        return self._labels_cache

    def label(self, idx):
        return self._labels[idx]

    def source(self, idx) -> np.ndarray:
        """(image index in the sorted listing, view index) for the given rows."""
        if self._source is None:
            raise ShardError(f"{self.folder}: these shards were written without source indices")
        return self._source[idx]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self._codes[i], int(self._labels[i])

    def shard_range(self, k: int) -> tuple[int, int]:
        """Rows [start, stop) held by the k-th shard (shards are listed in index order 0..K-1).

        Tools that compute per-row side arrays (entropies) iterate shards with this and write one side
        shard per code shard: `write_side_shard(side_dir, k, values_for(codes(slice(*shard_range(k)))))`.
        """
        return int(self._codes.offsets[k]), int(self._codes.offsets[k + 1])

    def verify(self, raise_on_error: bool = True) -> list[str]:
        """Hash every shard file against the manifest; raise ShardError (or return problems) if any differ."""
        problems = self._codes.verify() + self._labels.verify() + (self._source.verify() if self._source else [])
        if problems and raise_on_error:
            raise ShardError(f"{len(problems)} problem(s) in {self.folder}:\n  " + "\n  ".join(problems))
        return problems

    def __repr__(self) -> str:
        return (f"CodeShards({self.folder!r}, rows={len(self)}, grid={self.grid}, vocab={self.vocab_size}, "
                f"shards={len(self.shards)})")
