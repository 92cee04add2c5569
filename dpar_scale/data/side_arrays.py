"""Per-row side arrays beside code shards (e.g. entropies [n, H*W] float16 from tools/compute_entropy.py).

A side array lives in a subfolder of the code folder with the same sharding: `<sub>/shard_00000.<name>.npy` +
`<sub>/shard_00000.<name>.json` + `<sub>/manifest.json`, whose `codes_fingerprint` ties it to the exact code
shards it was computed from. Written atomically like the codes (dpar_scale.data.shards).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from dpar_scale.data.shards import (
    FORMAT_VERSION, SIDE_FORMAT, CodeShards, RowArray, ShardError, _load_manifest, _read_json, check_npy,
    save_npy_atomic, sha256_file, shard_stem, write_json_atomic, write_manifest,
)

__all__ = ["write_side_shard", "read_side_shard_record", "side_shard_complete", "write_side_manifest", "SideArray",
           "open_side_array"]

def _side_files(index: int, name: str) -> tuple[str, str]:
    s = shard_stem(index)
    return f"{s}.{name}.npy", f"{s}.{name}.json"


def write_side_shard(side_dir: str, index: int, array: np.ndarray, name: str = "entropy",
                     dtype: Any = np.float16, meta: dict | None = None) -> dict:
    """Write side array rows for code shard `index` (same row count), then its record; atomic like codes."""
    os.makedirs(side_dir, exist_ok=True)
    npy, rec = _side_files(index, name)
    rec_path = os.path.join(side_dir, rec)
    if os.path.exists(rec_path):
        os.remove(rec_path)
    array = np.asarray(array).astype(dtype, copy=False)
    sha = save_npy_atomic(os.path.join(side_dir, npy), array)
    record = {**(meta or {}), "index": index, "count": int(array.shape[0]), "row_shape": list(array.shape[1:]),
              "dtype": np.dtype(dtype).name, "file": npy, "sha256": sha}
    write_json_atomic(rec_path, record)
    return record


def read_side_shard_record(side_dir: str, index: int, name: str = "entropy") -> dict | None:
    rec = _read_json(os.path.join(side_dir, _side_files(index, name)[1]))
    return rec if isinstance(rec, dict) and rec.get("index") == index else None


def side_shard_complete(side_dir: str, index: int, expected_count: int, name: str = "entropy",
                        verify_sha: bool = True, codes_sha256: str | None = None) -> bool:
    """True if side shard `index` was completed with `expected_count` rows and its file is intact (and, given
    `codes_sha256`, was computed from that code shard: a rebuilt code shard gets its side shard recomputed)."""
    rec = read_side_shard_record(side_dir, index, name)
    if rec is None or rec["count"] != expected_count:
        return False
    if codes_sha256 is not None and rec.get("codes_sha256", codes_sha256) != codes_sha256:
        return False
    path = os.path.join(side_dir, rec["file"])
    try:
        check_npy(path, (rec["count"], *rec["row_shape"]), rec["dtype"])
    except ShardError:
        return False
    return not verify_sha or sha256_file(path) == rec["sha256"]


def write_side_manifest(side_dir: str, codes: CodeShards, name: str = "entropy",
                        extra: dict | None = None) -> dict:
    """Collect the side shard records for every code shard into `side_dir/manifest.json` (written last)."""
    records, missing = [], []
    for s in codes.shards:
        rec = read_side_shard_record(side_dir, s["index"], name)
        if rec is None or rec["count"] != s["count"]:
            missing.append(shard_stem(s["index"]))
        else:
            records.append({k: rec[k] for k in ("index", "count", "file", "sha256")})
    if missing:
        raise ShardError(f"{side_dir}: {len(missing)} {name} shard(s) missing or with wrong row count "
                         f"(first: {missing[:5]}); finish computing them before writing the manifest")
    shapes = {tuple(read_side_shard_record(side_dir, r["index"], name)["row_shape"]) for r in records} or {()}
    dtypes = {read_side_shard_record(side_dir, r["index"], name)["dtype"] for r in records} or {"float16"}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ShardError(f"{side_dir}: {name} shards disagree on row shape {shapes} or dtype {dtypes}")
    manifest = {"format": SIDE_FORMAT, "format_version": FORMAT_VERSION, "name": name,
                "dtype": dtypes.pop(), "row_shape": list(shapes.pop()), "num_rows": len(codes),
                "codes_dir": codes.folder, "codes_fingerprint": codes.fingerprint, "shards": records,
                **(extra or {})}
    write_manifest(side_dir, manifest)
    return manifest


class SideArray(RowArray):
    """Memory-mapped per-row side array (e.g. entropies); `manifest` holds what the writer recorded."""

    def __init__(self, side_dir: str, codes: CodeShards | str | None = None, max_open: int = 256):
        side_dir = os.path.abspath(side_dir)
        m = _load_manifest(side_dir, SIDE_FORMAT, "side array")
        self.manifest, self.name = m, m["name"]
        super().__init__(side_dir, [s["file"] for s in m["shards"]], [s["count"] for s in m["shards"]],
                         tuple(m["row_shape"]), m["dtype"], [s["sha256"] for s in m["shards"]], max_open)
        if isinstance(codes, str):
            codes = CodeShards(codes)
        if codes is not None and codes.fingerprint != m["codes_fingerprint"]:
            raise ShardError(f"{side_dir}: the {self.name} array was computed from different code shards than "
                             f"{codes.folder} (fingerprint mismatch); recompute it")
        if len(self) != m["num_rows"]:
            raise ShardError(f"{side_dir}: shards hold {len(self)} rows, manifest says {m['num_rows']}")


def open_side_array(side_dir: str, codes: CodeShards | str | None = None) -> SideArray:
    return SideArray(side_dir, codes)
