"""Shard files, whatever they hold (code, side-array and caption shards are built from these): the `ShardError`
they raise, atomic writes (a .npy's sha256 computed while it is written; JSON records), .npy header and size
checks that catch a truncated file without reading it, and `RowArray`, rows of equal shape spread over .npy shard
files read as one array.

Every file is written under a temporary name and renamed, so a crash never leaves a file that looks complete.
Readers open shards lazily and keep at most `max_open` memory maps (each holds a file descriptor), so an
ImageNet-sized folder (>1000 shards) does not run into the open-file limit.

What the shards of a code folder are (names, records, manifest, `CodeShards`) is dpar_scale.data.shards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from dpar_scale.errors import DparError
from dpar_scale.integrity import FileCheck, check_files

_REBUILD_HINT = "re-run tools/extract_codes.py with the same arguments: it rebuilds only missing or bad shards"


class ShardError(DparError, RuntimeError):
    """A shard folder is missing, incomplete, corrupt or inconsistent; the message names the file."""


# ----------------------------------------------------------------------------------------------------------
# low-level atomic writing


class _HashingFile:
    """File wrapper that hashes what np.save writes, so checksums cost no second read."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def save_npy_atomic(path: str, array: np.ndarray) -> str:
    """np.save to a temporary name, fsync, rename into place; returns the file's sha256."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hf.h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file; ShardError if it is missing or not a valid .npy."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        raise ShardError(f"shard file {path} is missing; {_REBUILD_HINT}") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"shard file {path} is not a valid .npy file ({e}); delete it and "
                         f"{_REBUILD_HINT}") from None
    if fortran:
        raise ShardError(f"shard file {path} is Fortran-ordered; it was not written by this code")
    return tuple(shape), np.dtype(dtype), offset


def check_npy(path: str, shape: Sequence[int], dtype: Any) -> None:
    """Header and file size agree with the expected shape/dtype (catches truncation without hashing)."""
    got_shape, got_dtype, offset = read_npy_header(path)
    if got_shape != tuple(shape) or got_dtype != np.dtype(dtype):
        raise ShardError(f"shard file {path} holds {got_dtype}{list(got_shape)}, expected "
                         f"{np.dtype(dtype)}{list(shape)}; {_REBUILD_HINT}")
    expect = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != expect:
        raise ShardError(f"shard file {path} is truncated or padded ({size} bytes, expected {expect}); "
                         f"delete it and {_REBUILD_HINT}")


# ----------------------------------------------------------------------------------------------------------
# reading rows across shard files


class RowArray:
    """Rows of equal shape spread over .npy shard files, indexed as one array; shards memory-mapped lazily.

    Indexing: an int gives one row, a slice or an integer array gives a stacked copy; both may cross shard
    boundaries. Every file's header and size are checked at construction (cheap); `verify()` hashes them.
    """

    def __init__(self, folder: str, files: list[str], counts: list[int], row_shape: tuple[int, ...],
                 dtype: Any, sha256: list[str] | None = None, max_open: int = 256):
        self.folder, self.files, self.counts = folder, list(files), [int(c) for c in counts]
        self.row_shape, self.dtype, self.sha256 = tuple(row_shape), np.dtype(dtype), sha256
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.max_open = max_open
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        for fname, n in zip(self.files, self.counts):
            check_npy(os.path.join(folder, fname), (n, *self.row_shape), self.dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _map(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is None:
            m = np.load(os.path.join(self.folder, self.files[k]), mmap_mode="r")
            self._maps[k] = m
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return m

    def __getstate__(self):  # memory maps are reopened in the receiving process (e.g. DataLoader workers)
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _row(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        k = bisect.bisect_right(self.offsets, i) - 1
        return np.array(self._map(k)[i - self.offsets[k]])

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self._row(int(idx))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            idx = np.arange(start, stop, step)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((idx.size, *self.row_shape), self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._map(int(k))[idx[sel] - self.offsets[k]]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        k = max(0, bisect.bisect_right(self.offsets, start) - 1)
        while start < stop and k < len(self.files):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if hi > start:
                parts.append(self._map(k)[start - lo: min(stop, hi) - lo])
                start = min(stop, hi)
            k += 1
        if not parts:
            return np.empty((0, *self.row_shape), self.dtype)
        return np.concatenate(parts, axis=0)

    def read_all(self) -> np.ndarray:
        return self._range(0, len(self))

    def verify(self) -> list[str]:
        """Problems found (missing/truncated files, checksum mismatches); empty when all is well. Hashes every
        file in this process, uncached (dpar_scale.data.checks is what opening data for training runs)."""
        problems, checks = [], []
        for k, (fname, n) in enumerate(zip(self.files, self.counts)):
            path = os.path.join(self.folder, fname)
            try:
                check_npy(path, (n, *self.row_shape), self.dtype)
            except ShardError as e:
                problems.append(str(e))
                continue
            if self.sha256 is not None:
                checks.append(FileCheck(path, self.sha256[k], what="shard file", fix=f"delete it and {_REBUILD_HINT}"))
        return problems + check_files(checks)
