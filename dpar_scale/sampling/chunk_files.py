"""The files of a chunked sampling run: one npz per chunk (the unit of resume), and the assembled samples.npz.

A chunk file `chunks/chunk-KKKKKK.npz` holds, for samples [first, first + count): `images` uint8 [count, H, W, 3],
`labels` int64, `codes` int64 [count, N], for DPAR `num_patches` int64 [count] and `global_positions` (the
(row, position) pairs its global model ran, both CFG halves), and `settings`: the JSON of everything that
determines the bytes (weights fingerprints, seed, guidance, filters, patch rule, batch size, ...). It is written
under a temporary name, flushed and renamed, so a chunk either exists complete or not at all.

`samples.npz` is written the same way, as a zip NumPy reads (`arr_0` uint8 [N, H, W, 3], `labels` int64 [N]),
streamed chunk by chunk (never the whole array in memory) with fixed member timestamps: np.savez stamps the
current time into the zip, so two identical runs would not give identical bytes.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from dpar_scale.errors import DparError

CHUNK_DIR = "chunks"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: fixed, so the bytes depend on content only


class ChunkSettingsError(DparError, RuntimeError):
    """Output from other settings is in the way; the message says which settings differ and what to do."""


def chunk_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / CHUNK_DIR / f"chunk-{index:06d}.npz"


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def settings_diff(recorded: dict, current: dict) -> str:
    """'key: recorded X, now Y; ...' over the (flattened) keys that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(recorded), flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: recorded {a.get(k)!r}, now {b.get(k)!r}" for k in keys)


def atomic_write(path: Path, write) -> None:
    """write(handle) into a temporary file next to `path`, fsync, rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _npy_member(zf: zipfile.ZipFile, name: str, value) -> None:
    """Writes the member `name`.npy: an array, or (shape, dtype, parts) streamed part by part (the parts'
    concatenation along axis 0 has `shape`)."""
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    with zf.open(info, "w", force_zip64=True) as member:
        if isinstance(value, np.ndarray):
            np.lib.format.write_array(member, value, allow_pickle=False)
            return
        shape, dtype, parts = value
        dtype = np.dtype(dtype)
        np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": tuple(shape)})
        rows = 0
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            if part.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"{name}: part of shape {part.shape} does not fit {shape}")
            member.write(part.tobytes())
            rows += part.shape[0]
        if rows != shape[0]:
            raise ValueError(f"{name}: {rows} rows written, {shape[0]} declared")


def write_npz(path: Path, members: dict) -> None:
    """An npz at `path`, atomically, with fixed timestamps; members: name -> array or (shape, dtype, parts)."""
    def write(handle):
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in members.items():
                _npy_member(zf, name, value)

    atomic_write(Path(path), write)


def write_chunk(path: Path, arrays: dict, settings: dict) -> None:
    members = {k: np.asarray(v) for k, v in arrays.items()}
    members["settings"] = np.frombuffer(settings_json(settings).encode(), dtype=np.uint8)
    write_npz(path, members)


def read_chunk_settings(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return json.loads(f["settings"].tobytes().decode())


def read_chunk(path: Path, *, settings: dict, first: int, labels: np.ndarray, image_shape: tuple,
               num_codes: int, dpar: bool) -> dict | None:
    """The arrays of a complete chunk written with `settings` for samples [first, first + len(labels)); None when
    the file is unreadable or incomplete (it is then regenerated); ChunkSettingsError when it was written with
    other settings (it must not be reused, nor silently replaced)."""
    count = len(labels)
    try:
        with np.load(path, allow_pickle=False) as f:
            recorded = json.loads(f["settings"].tobytes().decode())
            if recorded != settings:
                raise ChunkSettingsError(
                    f"{path} was written with other settings ({settings_diff(recorded, settings)}): sample into "
                    f"another --out, or delete {path.parent} (and samples.npz) to start over")
            arrays = {k: f[k] for k in f.files if k != "settings"}
    except ChunkSettingsError:
        raise
    except Exception:  # a torn or corrupt file (zip CRC, truncated member, bad JSON): redo the chunk
        return None
    expect = {"images": ((count, *image_shape), np.uint8), "labels": ((count,), np.int64),
              "codes": ((count, num_codes), np.int64)}
    if dpar:
        expect.update(num_patches=((count,), np.int64), global_positions=((), np.int64))
    for key, (shape, dtype) in expect.items():
        a = arrays.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            return None
    if int(arrays["first"]) != first or not np.array_equal(arrays["labels"], labels):
        return None
    return arrays
